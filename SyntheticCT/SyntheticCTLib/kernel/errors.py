"""Exception types shared by the whole library.

Every error the library raises on bad input derives from :class:`SyntheticCTError`, so that the
command line can map it to one clear line on stderr and a non-zero exit code.
"""

from __future__ import annotations


class SyntheticCTError(Exception):
    """Base class of every error that the library raises on bad input or a failed step."""


class VolumeReadError(SyntheticCTError, OSError):
    """A volume could not be read, or is not a valid scalar 3D image."""


class VolumeWriteError(SyntheticCTError, OSError):
    """A volume could not be written."""


class GeometryMismatchError(SyntheticCTError, ValueError):
    """Two images that must share a voxel grid do not."""


class InvalidParameterError(SyntheticCTError, ValueError):
    """An argument is out of its valid range."""


class Cancelled(SyntheticCTError):
    """Raised (typically from a progress callback) to stop a long operation cleanly."""


class NoBoneError(InvalidParameterError):
    """An image holds no bone at the bone threshold (inside the compared region): bone metrics cannot be measured."""
