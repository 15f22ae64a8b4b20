"""Where a model runs: one list of device names for every face (command line, runner, training)."""

from __future__ import annotations

import re

from SyntheticCTLib.kernel.errors import InvalidParameterError

DEVICES = ("auto", "cpu", "cuda", "mps")
"""The device names every face accepts; ``cuda:N`` names one GPU as well."""

_CUDA_INDEX = re.compile(r"^cuda:\d+$")


def check_device(device: str) -> str:
    """Return ``device`` if it is one of :data:`DEVICES` or ``cuda:N``; else raise a clear error."""
    name = str(device).strip().lower()
    if name in DEVICES or _CUDA_INDEX.match(name):
        return name
    raise InvalidParameterError(f"Unknown device '{device}': choose one of {', '.join(DEVICES)} or cuda:N.")


__all__ = ["DEVICES", "check_device"]
