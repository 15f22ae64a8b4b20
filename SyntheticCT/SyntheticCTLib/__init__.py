"""SyntheticCTLib: synthetic CT from MRI, without Slicer.

The logic of the SyntheticCT 3D Slicer module: volume I/O, the digital phantom, model packages
and downloads, inference, DICOM export and training. It imports neither Qt nor Slicer, and
imports torch only where a model runs. Not for diagnostic use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from SyntheticCTLib.kernel.errors import (
    Cancelled,
    GeometryMismatchError,
    InvalidParameterError,
    SyntheticCTError,
    VolumeReadError,
    VolumeWriteError,
)

NOT_FOR_DIAGNOSTIC_USE = "Synthetic CT - not for diagnostic use."

__all__ = [
    "__version__",
    "NOT_FOR_DIAGNOSTIC_USE",
    "Cancelled",
    "GeometryMismatchError",
    "InvalidParameterError",
    "SyntheticCTError",
    "VolumeReadError",
    "VolumeWriteError",
]
