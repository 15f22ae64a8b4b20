"""Multi-resolution levels for registration: plan shrink factors, shrink by averaging, crop to a mask.

Levels are given as target voxel spacings in mm (coarse to fine). Shrinking averages bins of voxels
(``sitk.BinShrink``), which smooths against aliasing and keeps the physical space exact.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError

Factors = Tuple[int, int, int]

MIN_LEVEL_SIZE = 16
"""A level keeps at least this many voxels along each axis (or the full size when the image is smaller)."""


def plan_levels(
    image: sitk.Image, level_spacings_mm: Sequence[float], *, min_size: int = MIN_LEVEL_SIZE
) -> List[Factors]:
    """Shrink factors per level (coarse to fine) for target spacings ``level_spacings_mm``.

    Each axis is shrunk by ``round(target / spacing)`` (at least 1), limited so that the level keeps
    ``min_size`` voxels along the axis. Levels that come out equal to the previous one are dropped.
    """
    if not level_spacings_mm:
        raise InvalidParameterError("At least one registration level (target spacing in mm) is required.")
    spacing = image.GetSpacing()
    size = image.GetSize()
    levels: List[Factors] = []
    for target in level_spacings_mm:
        if not target > 0:
            raise InvalidParameterError(f"Level spacings must be positive; got {list(level_spacings_mm)}.")
        factors = []
        for s, n in zip(spacing, size):
            f = max(1, int(round(target / s)))
            f = min(f, max(1, n // min_size))
            factors.append(f)
        if not levels or tuple(factors) != levels[-1]:
            levels.append(tuple(factors))
    return levels


def shrink(image: sitk.Image, factors: Sequence[int]) -> sitk.Image:
    """Average bins of ``factors`` voxels (no-op for all ones)."""
    factors = [int(f) for f in factors]
    if all(f == 1 for f in factors):
        return image
    return sitk.BinShrink(image, factors)


def level_spacing(image: sitk.Image, factors: Sequence[int]) -> float:
    """The largest voxel spacing (mm) of ``image`` shrunk by ``factors``."""
    return float(max(s * f for s, f in zip(image.GetSpacing(), factors)))


def mask_on_grid(mask: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``mask`` (nonzero = inside) as uint8 on the grid of ``reference``, by nearest neighbour."""
    binary = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    same = (
        binary.GetSize() == reference.GetSize()
        and np.allclose(binary.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        and np.allclose(binary.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        and np.allclose(binary.GetDirection(), reference.GetDirection(), atol=1e-6)
    )
    if same:
        return binary
    return sitk.Resample(binary, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def bounding_box(mask: sitk.Image) -> Optional[Tuple[Tuple[int, int, int], Tuple[int, int, int]]]:
    """(start index, size) of the nonzero voxels of ``mask``, or None when it is empty."""
    array = sitk.GetArrayViewFromImage(mask)
    nonzero = [np.flatnonzero(np.any(array, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(n.size == 0 for n in nonzero):
        return None
    start_zyx = [int(n[0]) for n in nonzero]
    stop_zyx = [int(n[-1]) + 1 for n in nonzero]
    start = tuple(start_zyx[::-1])
    size = tuple(b - a for a, b in zip(start_zyx[::-1], stop_zyx[::-1]))
    return start, size


def crop_to_mask(image: sitk.Image, mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """Crop ``image`` to the bounding box of ``mask`` (any grid over the same space) plus ``margin_mm``.

    The geometry is kept (a region of interest). An empty mask leaves ``image`` as it is.
    """
    box = bounding_box(mask)
    if box is None:
        return image
    start, size = box
    # The box's corners (voxel edges) in world space, then in image's continuous indices.
    corners = []
    for corner in np.ndindex(2, 2, 2):
        index = [start[a] - 0.5 + corner[a] * size[a] for a in range(3)]
        corners.append(
            image.TransformPhysicalPointToContinuousIndex(mask.TransformContinuousIndexToPhysicalPoint(index))
        )
    corners = np.asarray(corners)
    lo, hi = [], []
    for axis in range(3):
        margin = margin_mm / image.GetSpacing()[axis]
        lo.append(max(0, int(math.floor(corners[:, axis].min() - margin + 0.5))))
        hi.append(min(image.GetSize()[axis], int(math.ceil(corners[:, axis].max() + margin + 0.5))))
    if any(b <= a for a, b in zip(lo, hi)):
        return image
    if lo == [0, 0, 0] and hi == list(image.GetSize()):
        return image
    return sitk.RegionOfInterest(image, [b - a for a, b in zip(lo, hi)], lo)


def informative_mask(image: sitk.Image, keep_fraction: float, *, max_voxels: int = 2_000_000) -> sitk.Image:
    """Voxels of ``image`` whose gradient magnitude is in the top ``keep_fraction`` (uint8, possibly coarser grid).

    Flat regions carry no information about the alignment; sampling the metric at edges gives the same
    precision with far fewer samples. Large images are first shrunk so that the mask costs little.
    """
    factor = 1
    while int(np.prod(image.GetSize())) // factor**3 > max_voxels:
        factor += 1
    small = shrink(image, [min(factor, max(1, n // MIN_LEVEL_SIZE)) for n in image.GetSize()])
    magnitude = sitk.GradientMagnitude(small)
    values = sitk.GetArrayViewFromImage(magnitude).ravel()
    step = max(1, values.size // 200_000)
    threshold = float(np.quantile(values[::step], 1.0 - float(keep_fraction)))
    mask = sitk.Cast(magnitude > threshold, sitk.sitkUInt8)
    return sitk.BinaryDilate(mask, [1, 1, 1])
