"""The options every subcommand shares, and the helper that registers a subcommand with them."""

from __future__ import annotations

import argparse
from typing import Optional

from SyntheticCTLib.kernel.devices import DEVICES, check_device
from SyntheticCTLib.kernel.errors import InvalidParameterError


def _device(value: str) -> str:
    try:
        return check_device(value)
    except InvalidParameterError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_device_option(parser: argparse.ArgumentParser, *, default: Optional[str] = "auto", help: str = "") -> None:
    """``--device``, one definition for every subcommand: one of :data:`DEVICES` or ``cuda:N``."""
    choices = ", ".join(DEVICES[1:])
    parser.add_argument(
        "--device",
        default=default,
        type=_device,
        metavar="DEVICE",
        help=help or f"where the model runs: auto (cuda, then mps, then cpu; default), {choices} or cuda:N",
    )


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


__all__ = ["add_command", "add_device_option"]
