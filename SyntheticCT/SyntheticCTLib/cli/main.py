"""Entry point of the ``syntheticct`` command: parses arguments, sets up progress, maps errors."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any, Optional, Sequence

from SyntheticCTLib import __version__
from SyntheticCTLib.kernel.errors import Cancelled, SyntheticCTError
from SyntheticCTLib.kernel.progress import JsonLinesProgress, TqdmProgress, no_progress

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = (
    "phantom",
    "inspect",
    "convert",
    "synthesize",
    "models",
    "register",
    "compare",
    "train",
    "evaluate",
    "demo",
)

EXIT_ERROR = 1
EXIT_CANCELLED = 130

logger = logging.getLogger("SyntheticCTLib")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syntheticct",
        description="Synthetic CT from MRI: phantom, synthesis, registration and bone-surface comparison. "
        "Not for diagnostic use.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_parser(subparsers)  # each subcommand's own module
    return parser


class _ConsoleHandler(logging.Handler):
    """Log records on stderr, written through the progress bar when one is shown (never glued onto it)."""

    def __init__(self, reporter: Any) -> None:
        super().__init__()
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            write = getattr(self.reporter, "write", None)
            if write is not None:
                write(text)
            else:
                sys.stderr.write(text + "\n")
        except Exception:  # logging must never raise
            self.handleError(record)


# Third-party loggers whose debug output is noise to a user (matplotlib's font lookups, PIL's plugins).
QUIET_LOGGERS = ("matplotlib", "PIL", "urllib3", "fsspec", "torch")


def _setup_logging(level: str, reporter: Any = None) -> None:
    handler = _ConsoleHandler(reporter)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit code (0 success, 1 error, 130 cancelled).

    The progress bar is closed before the last line is written, so an error or a cancellation is
    one clear line at the end, after every bar and log line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    reporter = {"bar": TqdmProgress, "json": JsonLinesProgress}.get(args.progress)
    report = reporter() if reporter else no_progress
    _setup_logging(args.log_level, report)
    last_line = ""
    try:
        code = int(args.run(args, report) or 0)
    except KeyboardInterrupt:
        code, last_line = EXIT_CANCELLED, "syntheticct: cancelled; no partial output was left."
    except Cancelled as e:
        code, last_line = EXIT_CANCELLED, f"syntheticct: cancelled: {e}"
    except SyntheticCTError as e:
        code, last_line = EXIT_ERROR, f"syntheticct {args.command}: error: {e}"
    finally:
        close = getattr(report, "close", None)
        if close:
            close()
    if last_line:
        sys.stderr.write(last_line + "\n")
    return code


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())
