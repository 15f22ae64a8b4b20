"""Bone-local refinement: one rigid transform per bone, starting from the global registration.

Bones move between scans (vertebrae shift relative to each other), so one global transform cannot
align them all. Each bone of the fixed image (a connected component of the CT bone above a HU
threshold, or a label of a bone label map) is refined rigidly inside a dilated mask around it, from
which the other bones are cut out so that a neighbour does not pull the refinement back.
"""

from __future__ import annotations

import logging
import math
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.geometry import transform_points
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress, scaled
from SyntheticCTLib.registration.engine import (
    DEFAULT_SEED,
    RegistrationError,
    copy_transform,
    make_method,
    optimize,
    sampling_fraction,
)
from SyntheticCTLib.registration.initialization import mask_points
from SyntheticCTLib.registration.pyramid import crop_to_mask, level_spacing, mask_on_grid, plan_levels, shrink

logger = logging.getLogger(__name__)

DEFAULT_BONE_THRESHOLD_HU = BONE_THRESHOLD_HU
DEFAULT_DILATION_MM = 5.0
MIN_BONE_VOLUME_MM3 = 200.0
MAX_BONES = 40
LARGE_SHIFT_MM = 15.0


def bone_components(
    ct: sitk.Image,
    *,
    threshold_hu: float = DEFAULT_BONE_THRESHOLD_HU,
    min_volume_mm3: float = MIN_BONE_VOLUME_MM3,
    max_components: int = MAX_BONES,
) -> sitk.Image:
    """Label the connected pieces of CT bone (``> threshold_hu``), largest first (uint16, 0 = background).

    Pieces smaller than ``min_volume_mm3`` are dropped; at most ``max_components`` are kept.
    """
    binary = sitk.Cast(ct > float(threshold_hu), sitk.sitkUInt8)
    components = sitk.ConnectedComponent(binary, False)
    voxel_mm3 = float(np.prod(ct.GetSpacing()))
    min_voxels = max(1, int(math.ceil(min_volume_mm3 / voxel_mm3)))
    relabelled = sitk.RelabelComponent(components, minimumObjectSize=min_voxels, sortByObjectSize=True)
    array = sitk.GetArrayFromImage(relabelled)
    if array.max() > max_components:
        logger.info("Keeping the %d largest of %d bone pieces.", max_components, int(array.max()))
        array[array > max_components] = 0
    labels = sitk.GetImageFromArray(array.astype(np.uint16))
    labels.CopyInformation(ct)
    return labels


def bone_label_map(bone_labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A bone label map (0 = no bone) as uint16 on ``reference``'s grid (nearest neighbour when it differs)."""
    labels = sitk.Cast(bone_labels, sitk.sitkUInt16)
    same = (
        labels.GetSize() == reference.GetSize()
        and np.allclose(labels.GetSpacing(), reference.GetSpacing(), atol=1e-6)
        and np.allclose(labels.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        and np.allclose(labels.GetDirection(), reference.GetDirection(), atol=1e-6)
    )
    if not same:
        labels = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return labels


def local_mask(labels: sitk.Image, label: int, dilation_mm: float) -> sitk.Image:
    """Bone ``label`` dilated by ``dilation_mm``, minus every other bone (uint8)."""
    bone = sitk.Cast(labels == int(label), sitk.sitkUInt8)
    radius = [max(1, int(round(dilation_mm / s))) for s in labels.GetSpacing()]
    dilated = sitk.BinaryDilate(bone, radius, sitk.sitkBall)
    others = sitk.Cast((labels > 0) & (labels != int(label)), sitk.sitkUInt8)
    return sitk.Cast(dilated & (others == 0), sitk.sitkUInt8)


def refine_bones(
    fixed: sitk.Image,
    moving: sitk.Image,
    labels: sitk.Image,
    global_transform: sitk.Transform,
    *,
    metric: str,
    level_spacings_mm: Sequence[float],
    dilation_mm: float = DEFAULT_DILATION_MM,
    max_iterations: int = 100,
    max_samples: int = 50_000,
    seed: int = DEFAULT_SEED,
    moving_mask: Optional[sitk.Image] = None,
    progress: Optional[ProgressCallback] = None,
) -> List[dict]:
    """Refine ``global_transform`` (rigid, fixed -> moving) per bone of ``labels``.

    ``fixed`` and ``moving`` are the windowed full-resolution images; ``labels`` is on ``fixed``'s
    grid. Returns one dict per bone: ``label``, ``transform`` (Euler3DTransform), ``metric_value``,
    ``voxels`` (bone voxels), ``iterations``, ``shift_from_global_mm`` (mean distance between the
    local and the global mapping of the bone's voxels).
    """
    report = progress or no_progress
    if not isinstance(global_transform.Downcast(), sitk.Euler3DTransform):
        raise InvalidParameterError("Bone-local refinement starts from a rigid (Euler3D) transform.")
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel())
    values = [int(v) for v in np.flatnonzero(counts) if v != 0]
    if not values:
        raise RegistrationError(
            "Bone-local registration found no bone in the fixed image (no voxel above the bone "
            "threshold, or an empty bone label map)."
        )
    results = []
    for i, label in enumerate(values):
        bone_report = scaled(report, i / len(values), (i + 1) / len(values))
        mask = local_mask(labels, label, dilation_mm)
        transform, result, iterations = _refine_one_bone(
            fixed,
            moving,
            mask,
            global_transform,
            label,
            metric,
            level_spacings_mm,
            max_iterations,
            max_samples,
            seed,
            moving_mask,
            bone_report,
        )
        points = mask_points(mask_on_grid(labels == label, fixed), max_points=5000, seed=label)
        shift = _mean_shift(transform, global_transform, points)
        if shift > LARGE_SHIFT_MM:
            logger.warning(
                "Bone %d moved %.1f mm away from the global registration; check its local result.", label, shift
            )
        results.append(
            {
                "label": label,
                "transform": transform,
                "metric_value": float(result.metric_value),
                "voxels": int(counts[label]),
                "iterations": iterations,
                "shift_from_global_mm": shift,
            }
        )
        logger.info(
            "Bone %d: %d voxels, metric %.5g, %.2f mm from the global registration.",
            label,
            int(counts[label]),
            result.metric_value,
            shift,
        )
    return results


def _refine_one_bone(
    fixed: sitk.Image,
    moving: sitk.Image,
    mask: sitk.Image,
    global_transform: sitk.Transform,
    label: int,
    metric: str,
    level_spacings_mm: Sequence[float],
    max_iterations: int,
    max_samples: int,
    seed: int,
    moving_mask: Optional[sitk.Image],
    report: ProgressCallback,
):
    """The rigid transform of one bone (its dilated ``mask``), level by level: (transform, last result, iterations)."""
    fixed_crop = crop_to_mask(fixed, mask, margin_mm=2.0 * max(fixed.GetSpacing()))
    mask_crop = mask_on_grid(mask, fixed_crop)
    levels = plan_levels(fixed_crop, level_spacings_mm, min_size=4)
    transform = copy_transform(global_transform)
    result = None
    iterations = 0
    for j, factors in enumerate(levels):
        fixed_level = shrink(fixed_crop, factors)
        moving_factors = [
            max(1, int(round(f * sf / sm))) for f, sf, sm in zip(factors, fixed_crop.GetSpacing(), moving.GetSpacing())
        ]
        moving_level = shrink(moving, moving_factors)
        eligible = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask_crop))) // int(np.prod(factors))
        method = make_method(
            metric,
            sampling=sampling_fraction(eligible, max_samples),
            seed=seed,
            fixed_mask=mask_crop,
            moving_mask=moving_mask,
        )
        spacing = level_spacing(fixed_crop, factors)
        final = j == len(levels) - 1
        result = optimize(
            method,
            fixed_level,
            moving_level,
            transform,
            max_iterations=max_iterations,
            step=0.5 * spacing,
            min_step=spacing * (0.002 if final else 0.02),
            report=scaled(report, j / len(levels), (j + 1) / len(levels)),
            stage="bone-local registration",
            label=f"bone {label}: ",
        )
        transform = result.transform
        iterations += result.iterations
    return transform, result, iterations


def _mean_shift(transform: sitk.Transform, reference: sitk.Transform, points: np.ndarray) -> float:
    """Mean distance (mm) between where ``transform`` and ``reference`` map ``points`` (0 without points)."""
    if not len(points):
        return 0.0
    return float(
        np.mean(np.linalg.norm(transform_points(transform, points) - transform_points(reference, points), axis=1))
    )
