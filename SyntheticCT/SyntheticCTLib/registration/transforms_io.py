"""Reading and writing registration transforms in the ITK formats that 3D Slicer loads.

Direction
---------
Every transform of this library maps points of the **fixed** image space to the **moving** image
space (world coordinates, LPS, mm). That is the ITK *resampling* convention: resampling the moving
image onto the fixed grid with this transform aligns it with the fixed image
(``sitk.Resample(moving, fixed, transform)``).

Loading in 3D Slicer
--------------------
Load the file with *Add Data* (it becomes a transform node) and make it the parent transform of the
**moving** volume (Data module, or Transforms module "Apply transform"). The moving volume then
appears aligned with the fixed volume. Slicer converts LPS/RAS itself and stores an ITK file as the
node's *transform from parent* (the resampling transform, fixed -> moving points); its
*transform to parent*, which maps moving-image points to fixed-image points (what Slicer applies to
models and markups under the node), is the inverse. To move points of the moving image onto the
fixed image outside Slicer, use ``transform.GetInverse()`` (linear transforms) or an inverted
displacement field (deformable transforms).

Formats: ``.tfm`` / ``.txt`` (ITK text) and ``.h5`` / ``.hdf5`` (ITK HDF5; the compact choice for
B-spline and composite transforms). Writing is atomic; a failed write leaves no file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import SyntheticCTError
from SyntheticCTLib.kernel.io import atomic_output, check_not_input
from SyntheticCTLib.kernel.types import PathLike

logger = logging.getLogger(__name__)


TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5")

TRANSFORM_DIRECTION = (
    "fixed-to-moving points (ITK resampling convention; in 3D Slicer: the moving volume's "
    "parent transform, stored as 'from parent')"
)


class TransformIOError(SyntheticCTError, OSError):
    """A transform file could not be read or written."""


def transform_suffix(path: PathLike) -> str:
    """The transform-file suffix of ``path`` (lower case), or '' when it is not one of :data:`TRANSFORM_SUFFIXES`."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in TRANSFORM_SUFFIXES else ""


def write_transform(transform: sitk.Transform, path: PathLike, *, inputs: Iterable[PathLike] = ()) -> Path:
    """Write ``transform`` (fixed -> moving points) to ``path`` (``.tfm``, ``.txt``, ``.h5``), atomically.

    ``inputs`` lists files that must not be overwritten. Returns the written path.
    """
    path = Path(path)
    if not transform_suffix(path):
        raise TransformIOError(
            f"Cannot write the transform '{path}': unknown format; use one of {', '.join(TRANSFORM_SUFFIXES)}."
        )
    try:
        check_not_input(path, inputs)
    except SyntheticCTError as e:
        raise TransformIOError(str(e)) from e
    try:
        with atomic_output(path) as tmp:
            sitk.WriteTransform(transform, str(tmp))
    except RuntimeError as e:
        raise TransformIOError(f"Could not write the transform '{path}': {str(e).strip().splitlines()[-1]}") from e
    logger.debug("Wrote transform %s (%s) to %s", transform.GetName(), TRANSFORM_DIRECTION, path)
    return path


def read_transform(path: PathLike) -> sitk.Transform:
    """Read a transform file written by :func:`write_transform` (or any ITK transform file) with its concrete type."""
    path = Path(path)
    if not path.is_file():
        raise TransformIOError(f"No transform file at '{path}'.")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise TransformIOError(
            f"Could not read the transform '{path}': not a valid ITK transform file "
            f"({lines[-1] if lines else 'unknown cause'})."
        ) from e
    if transform.GetDimension() != 3:
        raise TransformIOError(f"'{path}' holds a {transform.GetDimension()}D transform; a 3D transform is required.")
    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0).Downcast()
    return transform


def transform_to_dict(transform: sitk.Transform) -> dict:
    """A JSON-ready description: type, parameters and fixed parameters (plus matrix/translation/centre if linear)."""
    t = transform.Downcast()
    if isinstance(t, sitk.CompositeTransform):
        return {
            "type": "CompositeTransform",
            "transforms": [transform_to_dict(t.GetNthTransform(i)) for i in range(t.GetNumberOfTransforms())],
        }
    out = {
        "type": t.GetName(),
        "parameters": [float(p) for p in t.GetParameters()],
        "fixed_parameters": [float(p) for p in t.GetFixedParameters()],
    }
    if hasattr(t, "GetMatrix"):
        out["matrix"] = [float(v) for v in t.GetMatrix()]
        out["translation"] = [float(v) for v in t.GetTranslation()]
        out["center"] = [float(v) for v in t.GetCenter()]
    if hasattr(t, "GetAngleX"):
        out["rotation_deg"] = [float(np.degrees(a)) for a in (t.GetAngleX(), t.GetAngleY(), t.GetAngleZ())]
    return out


def transform_from_dict(data: dict) -> sitk.Transform:
    """Rebuild a transform from :func:`transform_to_dict` output (Euler3D, affine, composite...)."""
    kind = data.get("type")
    if kind == "CompositeTransform":
        return sitk.CompositeTransform([transform_from_dict(d) for d in data["transforms"]])
    makers = {
        "Euler3DTransform": sitk.Euler3DTransform,
        "AffineTransform": lambda: sitk.AffineTransform(3),
        "VersorRigid3DTransform": sitk.VersorRigid3DTransform,
        "Similarity3DTransform": sitk.Similarity3DTransform,
        "TranslationTransform": lambda: sitk.TranslationTransform(3),
        "ScaleVersor3DTransform": sitk.ScaleVersor3DTransform,
    }
    if kind not in makers:
        raise TransformIOError(f"Cannot rebuild a transform of type '{kind}' from JSON.")
    t = makers[kind]()
    t.SetFixedParameters([float(v) for v in data["fixed_parameters"]])
    t.SetParameters([float(v) for v in data["parameters"]])
    return t
