"""JSON that the standard library can always write: one sanitiser and one atomic writer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from SyntheticCTLib.kernel.io import atomic_output
from SyntheticCTLib.kernel.types import PathLike


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars and arrays, paths and tuples made plain, and NaN/inf made ``None``.

    Dictionary keys become strings. Anything else is returned unchanged.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: PathLike, data: Any, *, indent: int = 2) -> Path:
    """Write :func:`json_safe` of ``data`` to ``path`` atomically (strict JSON; other objects as ``str``)."""
    path = Path(path)
    text = json.dumps(json_safe(data), indent=indent, allow_nan=False, default=str) + "\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


__all__ = ["json_safe", "write_json"]
