"""Known-truth test pairs for registration: an image "rescanned" in another position.

:func:`rescanned` builds what a second scan of the same object would look like after the object
moved by a known rigid (or affine) transform: a new voxel grid, rotated and shifted with the object,
offset by a fraction of a voxel and with a smaller field of view, sampled from the original with a
B-spline interpolator. No voxel of it lies outside the original, so no artificial padding appears
(padding would be a false edge that registration metrics latch on to). Registering the original
(fixed) to the result (moving) must recover ``transform`` itself, which maps fixed points to moving
points. Used by the tests, the benchmark and demos.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError


def rescanned(
    image: sitk.Image,
    transform: sitk.Transform,
    *,
    crop_voxels: Sequence[int] = (3, 3, 2),
    offset_voxels: Sequence[float] = (0.37, 0.61, 0.29),
    interpolator: int = sitk.sitkBSpline,
) -> sitk.Image:
    """``image`` as seen by a scan after its content moved by ``transform`` (fixed -> moving points).

    The new grid is ``image``'s grid mapped by the linear ``transform``, shifted by ``offset_voxels``
    (fractions of a voxel) and shrunk by ``crop_voxels`` on each side, so that it only samples inside
    ``image``. For a point ``x`` of ``image``, ``result(transform(x)) == image(x)`` up to interpolation.
    """
    t = transform.Downcast()
    if not hasattr(t, "GetMatrix"):
        raise InvalidParameterError("rescanned() needs a linear transform (Euler, versor, similarity or affine).")
    size = np.asarray(image.GetSize()) - 2 * np.asarray(crop_voxels, dtype=int)
    if np.any(size < 2):
        raise InvalidParameterError(
            f"Cropping {tuple(crop_voxels)} voxels per side leaves nothing of size {image.GetSize()}."
        )
    matrix = np.asarray(t.GetMatrix(), dtype=float).reshape(3, 3)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    start = np.asarray(crop_voxels, dtype=float) + np.asarray(offset_voxels, dtype=float)
    start_point = image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in start))
    # Column k of the new direction times spacing k must be matrix @ (old direction column k * spacing k).
    columns = matrix @ (direction * spacing[None, :])
    new_spacing = np.linalg.norm(columns, axis=0)
    grid = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(v) for v in new_spacing))
    grid.SetDirection(tuple(float(v) for v in (columns / new_spacing[None, :]).ravel()))
    grid.SetOrigin(t.TransformPoint(tuple(start_point)))
    result = sitk.Resample(image, grid, t.GetInverse(), interpolator, 0.0, sitk.sitkFloat32)
    if image.GetPixelID() != sitk.sitkFloat32:
        result = sitk.Cast(result, image.GetPixelID())
    return result
