"""Type aliases shared by every layer."""

from __future__ import annotations

import os
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]
"""A file-system path: a ``str`` or any :class:`os.PathLike` (e.g. :class:`pathlib.Path`)."""

__all__ = ["PathLike"]
