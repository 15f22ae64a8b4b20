"""Entry point of the ``syntheticct`` command: parses arguments, sets up progress, maps errors."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from typing import Optional, Sequence

from SyntheticCTLib import __version__
from SyntheticCTLib.kernel.errors import Cancelled, SyntheticCTError
from SyntheticCTLib.kernel.progress import JsonLinesProgress, TqdmProgress, no_progress

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = ("phantom", "synthesize", "models", "register", "compare", "train", "evaluate", "demo")

EXIT_ERROR = 1
EXIT_CANCELLED = 130
EXIT_TERMINATED = 143

logger = logging.getLogger("SyntheticCTLib")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output options")
    group.add_argument(
        "--progress",
        choices=("bar", "json", "none"),
        default="bar",
        help="progress as a tqdm bar on stderr (default), JSON lines on stdout "
        "({stage, fraction, message}) for a GUI, or none",
    )
    group.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="logging level of messages on stderr (default: info)",
    )
    return common


_COMMON = _common_options()


def add_command(
    subparsers: argparse._SubParsersAction, name: str, *, help: str, description: Optional[str] = None
) -> argparse.ArgumentParser:
    """Register subcommand ``name`` with the options every subcommand shares (``--progress``, ``--log-level``)."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        parents=[_COMMON],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syntheticct",
        description="Synthetic CT from MRI: phantom, synthesis, registration and bone-surface comparison. "
        "Not for diagnostic use.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_parser(subparsers)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (not when it was made)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(level: str) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit code (0 success, 1 error, 130 cancelled, 143 terminated)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(args.log_level)
    reporter = {"bar": TqdmProgress, "json": JsonLinesProgress}.get(args.progress)
    report = reporter() if reporter else no_progress
    previous = _treat_sigterm_as_interrupt()
    try:
        return int(args.run(args, report) or 0)
    except Terminated:
        _close(report)
        sys.stderr.write("syntheticct: terminated (SIGTERM); no partial output was left.\n")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        _close(report)  # the bar's line ends before the error's
        sys.stderr.write("syntheticct: cancelled; no partial output was left.\n")
        return EXIT_CANCELLED
    except Cancelled as e:
        _close(report)  # the bar's line ends before the error's
        sys.stderr.write(f"syntheticct: cancelled: {one_line(e)}\n")
        return EXIT_CANCELLED
    except SyntheticCTError as e:
        _close(report)  # the bar's line ends before the error's
        sys.stderr.write(f"syntheticct {args.command}: error: {one_line(e)}\n")
        return EXIT_ERROR
    except OSError as e:  # a file system error the library did not name (permissions, a full disk)
        _close(report)  # the bar's line ends before the error's
        where = f"'{e.filename}': " if getattr(e, "filename", None) else ""
        sys.stderr.write(f"syntheticct {args.command}: error: {where}{one_line(e.strerror or e)}\n")
        return EXIT_ERROR
    except MemoryError:
        _close(report)  # the bar's line ends before the error's
        sys.stderr.write(
            f"syntheticct {args.command}: error: out of memory; the input is too large for this machine.\n"
        )
        return EXIT_ERROR
    except RecursionError:
        _close(report)  # the bar's line ends before the error's
        sys.stderr.write(f"syntheticct {args.command}: error: an input is nested too deeply to read.\n")
        return EXIT_ERROR
    finally:
        _restore_sigterm(previous)
        _close(report)


def _close(report) -> None:
    close = getattr(report, "close", None)
    if close:
        close()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and ``except BaseException`` cleans up."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _treat_sigterm_as_interrupt():
    """Make SIGTERM (a scheduler, ``timeout``, a GUI's kill) raise :class:`Terminated`; return the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, AttributeError):
        return None


def _restore_sigterm(previous) -> None:
    if previous is None:
        return
    try:
        signal.signal(signal.SIGTERM, previous)
    except (ValueError, OSError):
        pass


def one_line(message: object) -> str:
    """``message`` on one line (line breaks become spaces)."""
    return " ".join(str(message).split())


def entry_point() -> None:
    """Console-script entry point."""
    sys.exit(main())
