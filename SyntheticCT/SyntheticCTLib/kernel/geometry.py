"""Voxel-grid helpers: comparing grids and resampling onto another grid or spacing."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import GeometryMismatchError, InvalidParameterError


def same_grid(a: sitk.Image, b: sitk.Image, *, tolerance: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` have the same size, and spacing, origin and direction within ``tolerance``."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance * max(1.0, max(map(abs, a.GetOrigin()))))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def describe_grid(image: sitk.Image) -> str:
    """A one-line description of an image's grid, for error messages."""
    return (
        f"size {image.GetSize()}, spacing {tuple(round(s, 4) for s in image.GetSpacing())} mm, "
        f"origin {tuple(round(o, 3) for o in image.GetOrigin())}"
    )


def check_same_grid(
    a: sitk.Image, b: sitk.Image, *, names: Sequence[str] = ("first image", "second image"), tolerance: float = 1e-4
) -> None:
    """Raise :class:`GeometryMismatchError` when ``a`` and ``b`` do not share a voxel grid."""
    if not same_grid(a, b, tolerance=tolerance):
        raise GeometryMismatchError(
            f"{names[0]} and {names[1]} must share a voxel grid; got {describe_grid(a)} vs {describe_grid(b)}. "
            "Resample with SyntheticCTLib.kernel.geometry.resample_like first."
        )


def resample_like(
    image: sitk.Image,
    reference: sitk.Image,
    *,
    transform: Optional[sitk.Transform] = None,
    interpolator: int = sitk.sitkLinear,
    default_value: float = 0.0,
    pixel_type: Optional[int] = None,
) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference``.

    ``transform`` maps points of the reference (fixed) space to the image (moving) space, as ITK
    resampling uses it.
    """
    return sitk.Resample(
        image,
        reference,
        transform or sitk.Transform(),
        interpolator,
        default_value,
        image.GetPixelID() if pixel_type is None else pixel_type,
    )


def grid_with_spacing(image: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """An empty image covering the same field of view as ``image``, with the new ``spacing``."""
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    new_spacing = np.array(spacing, dtype=float)
    old_size = np.array(image.GetSize(), dtype=float)
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    # Keep the physical centre of the field of view.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    old_centre = np.array(image.GetOrigin()) + direction @ (old_spacing * (old_size - 1) / 2)
    origin = old_centre - direction @ (new_spacing * (new_size - 1) / 2)
    grid = sitk.Image([int(s) for s in new_size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in new_spacing))
    grid.SetOrigin(tuple(float(o) for o in origin))
    grid.SetDirection(image.GetDirection())
    return grid


def resample_to_spacing(
    image: sitk.Image, spacing: Sequence[float], *, interpolator: int = sitk.sitkLinear, default_value: float = 0.0
) -> sitk.Image:
    """Resample ``image`` to a new voxel ``spacing``, keeping its field of view and direction."""
    if np.allclose(image.GetSpacing(), spacing, atol=1e-6):
        return image
    return resample_like(
        image, grid_with_spacing(image, spacing), interpolator=interpolator, default_value=default_value
    )


def linear_parts(transform: sitk.Transform) -> Tuple[np.ndarray, np.ndarray]:
    """(A, b) with ``transform(x) = A @ x + b`` for a linear transform (Euler, versor, similarity, affine)."""
    t = transform.Downcast()
    if not hasattr(t, "GetMatrix"):
        raise InvalidParameterError(f"{t.GetName()} is not a linear transform.")
    a = np.asarray(t.GetMatrix(), dtype=float).reshape(3, 3)
    centre = np.asarray(t.GetCenter(), dtype=float)
    translation = np.asarray(t.GetTranslation(), dtype=float)
    return a, translation + centre - a @ centre


def transform_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Apply ``transform`` to world points ``(n, 3)``; vectorized for linear transforms."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    try:
        a, b = linear_parts(transform)
    except InvalidParameterError:
        return np.array([transform.TransformPoint(tuple(p)) for p in points], dtype=float).reshape(-1, 3)
    return points @ a.T + b
