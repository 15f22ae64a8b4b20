"""Bone masks from CT numbers or from a bone label map, and their Dice overlap."""

from __future__ import annotations

import logging
from typing import Optional, Union

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import GeometryMismatchError, InvalidParameterError
from SyntheticCTLib.kernel.geometry import check_same_grid
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU
from SyntheticCTLib.kernel.masks import above

logger = logging.getLogger(__name__)

MARROW_CAVITY_MM3 = 100_000.0
"""Default largest enclosed pocket filled in a bone mask (100 mL).

A thresholded CT is a sponge where trabecular bone falls below the threshold (fatty or osteoporotic
marrow, CT noise): its pockets join into cavities of several mL inside each vertebral body, whose walls
are not a bone surface but would be compared as one. Every such marrow cavity (a lumbar vertebral body
holds about 30 mL, a femoral head about 50 mL) is filled; the cranial cavity (about 1400 mL) is not.
"""


def _voxel_volume(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing()))


def _from_array(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.CopyInformation(like)
    return image


def keep_components(mask: sitk.Image, *, keep_largest: Optional[int] = None, min_size_mm3: float = 100.0) -> sitk.Image:
    """Keep the ``keep_largest`` largest connected components of ``mask`` (face connectivity),
    or, when None, every component of at least ``min_size_mm3``."""
    if keep_largest is not None and int(keep_largest) < 1:
        raise InvalidParameterError(f"keep_largest must be a positive number of components; got {keep_largest}.")
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    min_voxels = max(1, int(np.ceil(float(min_size_mm3) / _voxel_volume(mask))))
    labels = sitk.RelabelComponent(
        sitk.ConnectedComponent(binary),
        minimumObjectSize=min_voxels if keep_largest is None else 0,
        sortByObjectSize=True,
    )
    array = sitk.GetArrayViewFromImage(labels)
    if keep_largest is None:
        keep = array > 0
    else:
        keep = (array > 0) & (array <= int(keep_largest))
    return _from_array(keep, mask)


def fill_small_holes(mask: sitk.Image, *, max_hole_mm3: Optional[float] = MARROW_CAVITY_MM3) -> sitk.Image:
    """Fill the enclosed background pockets of ``mask`` up to ``max_hole_mm3`` (all when None).

    A pocket is a face-connected background component that does not touch the image border.
    """
    array = sitk.GetArrayViewFromImage(mask) > 0
    background = sitk.ConnectedComponent(_from_array(~array, mask), False)
    labels = sitk.GetArrayViewFromImage(background)
    border = np.unique(
        np.concatenate(
            [
                np.ravel(labels[0]),
                np.ravel(labels[-1]),
                np.ravel(labels[:, 0]),
                np.ravel(labels[:, -1]),
                np.ravel(labels[:, :, 0]),
                np.ravel(labels[:, :, -1]),
            ]
        )
    )
    sizes = np.bincount(labels.ravel())
    fill = np.ones(len(sizes), dtype=bool)
    fill[0] = False  # the mask itself
    fill[border] = False
    if max_hole_mm3 is not None:
        fill &= sizes * _voxel_volume(mask) <= float(max_hole_mm3)
    if not fill.any():
        return _from_array(array, mask)
    return _from_array(array | fill[labels], mask)


def segment_bone(
    ct: sitk.Image,
    *,
    threshold: float = BONE_THRESHOLD_HU,
    keep_largest: Optional[int] = None,
    min_size_mm3: float = 100.0,
    fill_holes: bool = True,
    max_hole_mm3: Optional[float] = MARROW_CAVITY_MM3,
) -> sitk.Image:
    """Bone of a CT (or sCT): voxels at or above ``threshold`` HU, cleaned.

    Parameters
    ----------
    ct
        A CT in HU.
    threshold
        The bone threshold in HU (200 by default).
    keep_largest
        Keep only this many largest connected components; by default every component of at least
        ``min_size_mm3`` is kept (the vertebrae of a spine are separate components).
    fill_holes, max_hole_mm3
        Fill enclosed pockets up to ``max_hole_mm3`` (None: any size) inside the bone; by default the
        marrow cavities (:data:`MARROW_CAVITY_MM3`), so that the compared surface is the outer one.

    Returns
    -------
    sitk.Image
        uint8 (1 = bone) on the grid of ``ct``; empty when no voxel reaches the threshold.
    """
    if ct.GetDimension() != 3:
        raise InvalidParameterError(f"A 3D CT is required; got a {ct.GetDimension()}D image.")
    mask = _from_array(above(ct, float(threshold)), ct)
    mask = keep_components(mask, keep_largest=keep_largest, min_size_mm3=min_size_mm3)
    if fill_holes:
        mask = fill_small_holes(mask, max_hole_mm3=max_hole_mm3)
    return mask


def dice(a: Union[sitk.Image, np.ndarray], b: Union[sitk.Image, np.ndarray]) -> float:
    """Dice overlap ``2|A∩B| / (|A| + |B|)`` of two masks (> 0 is inside); 1.0 when both are empty."""
    if isinstance(a, sitk.Image) and isinstance(b, sitk.Image):
        check_same_grid(a, b, names=("the first mask", "the second mask"))
    x = (sitk.GetArrayViewFromImage(a) if isinstance(a, sitk.Image) else np.asarray(a)) > 0
    y = (sitk.GetArrayViewFromImage(b) if isinstance(b, sitk.Image) else np.asarray(b)) > 0
    if x.shape != y.shape:
        raise GeometryMismatchError(f"Masks of shapes {x.shape} and {y.shape} cannot be compared.")
    total = int(x.sum()) + int(y.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(x, y).sum() / total)
