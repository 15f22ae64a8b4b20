"""Compare a synthetic CT with a reference CT: image metrics, bone Dice and bone-surface distances.

:func:`compare` runs named stages: :func:`image_comparison` brings the synthetic CT onto the reference
grid (through a registration transform, if given) and measures the SynthRAD 2023 image metrics inside
the covered body; :func:`_bone_masks` segments the bone of both (:class:`NoBoneError` when one has
none); :func:`_surface_distances` extracts both bone surfaces in world coordinates and measures the
signed distances between them; :func:`_per_bone_rows` adds per-bone statistics; :func:`_metrics_record`
gathers everything into a :class:`~SyntheticCTLib.comparison.metric_registry.ComparisonMetrics`.
:func:`write_comparison` writes the metrics, the surfaces, a distance histogram, pictures and a
self-contained HTML report into a folder, each file atomically.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import vtk
from scipy import ndimage

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE, __version__
from SyntheticCTLib.comparison import rendering
from SyntheticCTLib.comparison.bone import dice, segment_bone
from SyntheticCTLib.comparison.metric_registry import REQUIRED_KEYS, ComparisonMetrics
from SyntheticCTLib.comparison.metrics import HU_RANGE, image_metrics
from SyntheticCTLib.comparison.report_html import comparison_report
from SyntheticCTLib.comparison.surfaces import (
    DISTANCE_ARRAY,
    LABEL_ARRAY,
    MEASURED_ARRAY,
    SPREAD_ARRAY,
    SurfaceDistances,
    affine_of,
    bone_row,
    bone_surface,
    label_surface_points,
    mapped_surface,
    per_bone_stats,
    points_in_mask,
    set_point_array,
    surface_distances,
    surface_points,
)
from SyntheticCTLib.comparison.uncertainty import check_spread, spread_quality
from SyntheticCTLib.kernel.errors import (
    GeometryMismatchError,
    InvalidParameterError,
    NoBoneError,
    VolumeWriteError,
)
from SyntheticCTLib.kernel.geometry import resample_like, same_grid
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU, CT_MIN_HU
from SyntheticCTLib.kernel.io import atomic_output, check_not_input, ensure_output_dir, validate_volume
from SyntheticCTLib.kernel.masks import ct_body_mask
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress, scaled

logger = logging.getLogger(__name__)

DEFAULT_BONE_THRESHOLD_HU = BONE_THRESHOLD_HU
"""Bone is segmented at this HU by default, in the reference CT and the synthetic CT alike (200 HU)."""
DEFAULT_BODY_THRESHOLD_HU = -500.0
"""The patient's body in the reference CT: objects above this HU (see :func:`~SyntheticCTLib.kernel.masks.ct_body_mask`)."""
AIR_HU = CT_MIN_HU
"""The synthetic CT's value outside its field of view once on the reference grid (those voxels are not measured)."""
MIN_OVERLAP = 0.01

__all__ = [
    "AIR_HU",
    "DEFAULT_BODY_THRESHOLD_HU",
    "DEFAULT_BONE_THRESHOLD_HU",
    "ComparisonMetrics",
    "ComparisonResult",
    "ImageComparison",
    "NoBoneError",
    "REQUIRED_KEYS",
    "compare",
    "distance_histogram",
    "image_comparison",
    "write_comparison",
    "write_surface",
]


@dataclass
class ComparisonResult:
    """Everything :func:`compare` measured, on the reference grid.

    ``metrics`` is the frozen record of the figures (its :meth:`~ComparisonMetrics.to_dict` is
    ``metrics.json``: :data:`REQUIRED_KEYS` first, then more; non-finite values, such as the PSNR of
    identical images, are None); ``synthetic`` is the synthetic CT resampled onto the reference grid;
    the surfaces carry ``SignedDistance_mm``.
    """

    metrics: ComparisonMetrics
    reference: sitk.Image
    synthetic: sitk.Image
    body_mask: sitk.Image
    reference_bone: sitk.Image
    synthetic_bone: sitk.Image
    reference_surface: vtk.vtkPolyData
    synthetic_surface: vtk.vtkPolyData
    distances: SurfaceDistances
    bone_labels: Optional[sitk.Image] = None
    per_bone: List[dict] = field(default_factory=list)


@dataclass
class ImageComparison:
    """The synthetic CT on the reference grid and the image metrics in the body it covers.

    ``valid``: reference voxels (z, y, x) inside the synthetic CT's field of view after the transform;
    ``body_mask``: the measured body (the reference's body within ``valid``); ``overlap``: the share of
    the body that is measured; ``metrics``: ``mae_hu``, ``me_hu``, ``psnr_db`` and ``ssim``.
    """

    reference: sitk.Image
    synthetic: sitk.Image
    valid: np.ndarray
    body_mask: sitk.Image
    overlap: float
    metrics: Dict[str, float]


@dataclass
class _Surfaces:
    reference: vtk.vtkPolyData
    synthetic: vtk.vtkPolyData
    distances: SurfaceDistances


def _check_transform(transform: Optional[sitk.Transform], name: str) -> None:
    if transform is not None and not isinstance(transform, sitk.Transform):
        raise InvalidParameterError(f"{name} must be a SimpleITK transform; got {type(transform).__name__}.")
    if transform is not None and transform.GetDimension() != 3:
        raise InvalidParameterError(f"{name} must be a 3D transform; got a {transform.GetDimension()}D one.")


def _labels_on_grid(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    validate_volume(labels, "the bone label map")
    if labels.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(labels)
        if not np.array_equal(array, np.round(array)) or array.min() < 0:
            raise InvalidParameterError(
                "The bone label map must hold whole numbers >= 0 (0 = no bone, k = bone k); it holds fractions "
                "or negative values."
            )
    labels = sitk.Cast(labels, sitk.sitkUInt16) if labels.GetPixelID() != sitk.sitkUInt16 else labels
    if not same_grid(labels, reference):
        labels = resample_like(labels, reference, interpolator=sitk.sitkNearestNeighbor, default_value=0)
    if not np.any(sitk.GetArrayViewFromImage(labels) > 0):
        raise InvalidParameterError("The bone label map has no labelled voxel inside the reference CT's field of view.")
    return labels


def _near_labels(labels: sitk.Image, margin_mm: float) -> np.ndarray:
    """Voxels within ``margin_mm`` of a labelled voxel."""
    distance = sitk.SignedMaurerDistanceMap(
        sitk.Cast(labels > 0, sitk.sitkUInt8), insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return sitk.GetArrayViewFromImage(distance) <= margin_mm


def _restrict(mask: sitk.Image, region: np.ndarray) -> sitk.Image:
    array = (sitk.GetArrayViewFromImage(mask) > 0) & region
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(mask)
    return image


def compare(
    reference_ct: sitk.Image,
    synthetic_ct: sitk.Image,
    *,
    transform: Optional[sitk.Transform] = None,
    bone_threshold: float = DEFAULT_BONE_THRESHOLD_HU,
    bone_labels: Optional[sitk.Image] = None,
    bone_transforms: Optional[Mapping[int, sitk.Transform]] = None,
    body_threshold: float = DEFAULT_BODY_THRESHOLD_HU,
    label_margin_mm: float = 10.0,
    hu_range: Sequence[float] = HU_RANGE,
    registration_quality: Optional[Mapping[str, Any]] = None,
    spread: Optional[sitk.Image] = None,
    progress: Optional[ProgressCallback] = None,
) -> ComparisonResult:
    """Compare ``synthetic_ct`` with ``reference_ct``.

    Parameters
    ----------
    reference_ct, synthetic_ct
        CTs in HU. The synthetic CT is resampled (linearly, air outside its field of view) onto the
        reference grid through ``transform``.
    transform
        Maps reference (fixed) points to synthetic (moving) points, as ITK resampling and
        :func:`SyntheticCTLib.registration.registration.register` give it; None: identity.
    bone_threshold
        Bone is segmented in both images at this HU (see :func:`.bone.segment_bone`).
    bone_labels
        A bone label map on the reference's space (0 = no bone, k = bone k), e.g. vertebrae. Both
        bone masks are then limited to ``label_margin_mm`` around the labelled bones, and every
        surface point gets the label of the nearest labelled voxel, for per-bone statistics.
    bone_transforms
        With ``bone_labels``: a transform per label (from a bone-local registration); each bone's
        per-bone statistics then use the synthetic CT resampled through its own transform.
    body_threshold
        The patient's body in the reference: objects above this HU without the table, holders or
        devices (see :func:`SyntheticCTLib.kernel.masks.ct_body_mask`). The image metrics are measured
        inside it, and only bone inside it is compared.
    registration_quality
        The grade of the registration that gave ``transform`` (its record's ``quality``: ``verdict``
        and ``reasons``); recorded in the settings and shown beside the figures that depend on it.
    spread
        The synthetic CT's per-voxel spread (HU, on its grid, as ``syntheticct synthesize --uncertainty``
        writes it). It is sampled at the synthetic bone-surface points (point array ``Spread_HU``, beside
        ``SignedDistance_mm``) and its uncertainty quality (:mod:`.uncertainty`) goes into the metrics.
    progress
        ``report(fraction, stage, message)``; it may raise :class:`~SyntheticCTLib.kernel.errors.Cancelled`.

    Raises
    ------
    GeometryMismatchError
        The synthetic CT does not overlap the reference's body after the transform.
    NoBoneError
        No bone in one of the images at ``bone_threshold`` (inside the compared region).
    InvalidParameterError
        A bad label map or transform; no surface point left to measure.
    """
    report = progress or no_progress
    _check_transforms(transform, bone_labels, bone_transforms)
    if spread is not None:
        spread = check_spread(spread, synthetic_ct)
    options = dict(transform=transform, body_threshold=body_threshold, hu_range=hu_range, progress=report)
    images = image_comparison(reference_ct, synthetic_ct, **options)
    report(0.3, "bone", f"Segmenting bone at {bone_threshold:g} HU")
    labels = _labels_on_grid(bone_labels, images.reference) if bone_labels is not None else None
    region = sitk.GetArrayFromImage(images.body_mask) > 0  # the patient's bone only (no table), where covered
    if labels is not None:
        region &= _near_labels(labels, label_margin_mm)
    reference_bone, synthetic_bone = _bone_masks(images.reference, images.synthetic, region, bone_threshold)
    native = native_synthetic_surface(synthetic_ct, transform, images.reference, region, bone_threshold)
    surfaces = _surface_distances(reference_bone, synthetic_bone, region, report, synthetic_surface=native)
    per_bone: List[dict] = []
    if labels is not None:
        report(0.8, "per bone", "Per-bone statistics")
        per_bone = _per_bone_rows(surfaces, labels, label_margin_mm)
    if labels is not None and bone_transforms:
        per_bone = _bone_local_rows(
            per_bone,
            images,
            synthetic_ct,
            labels,
            bone_transforms,
            reference_bone=reference_bone,
            valid_region=region,
            bone_threshold=bone_threshold,
            margin_mm=label_margin_mm,
            progress=scaled(report, 0.85, 0.99),
        )
    settings = _settings(transform, bone_threshold, body_threshold, hu_range, labels, bone_transforms, label_margin_mm)
    settings.update(_surface_grid_settings(reference_ct, synthetic_ct, native is not None))
    if registration_quality:
        settings["registration_grade"] = str(registration_quality.get("verdict", "unknown"))
        settings["registration_grade_reasons"] = "; ".join(str(r) for r in registration_quality.get("reasons") or [])
    uncertainty = None
    if spread is not None:
        report(0.99, "uncertainty", "Spread on the bone surface")
        uncertainty = spread_quality(
            images.reference,
            images.synthetic,
            images.body_mask,
            surfaces.synthetic,
            spread,
            transform=transform,
            store=True,  # the point array Spread_HU, beside SignedDistance_mm
        )
    metrics = _metrics_record(
        images, dice(reference_bone, synthetic_bone), surfaces.distances, per_bone, settings, uncertainty
    )
    report(1.0, "done", f"Mean bone-surface distance {surfaces.distances.symmetric.mean_abs_mm:.2f} mm")
    return _result(metrics, images, (reference_bone, synthetic_bone), surfaces, labels, per_bone)


def _result(
    metrics: ComparisonMetrics,
    images: ImageComparison,
    bones: Tuple[sitk.Image, sitk.Image],
    surfaces: _Surfaces,
    labels: Optional[sitk.Image],
    per_bone: List[dict],
) -> ComparisonResult:
    return ComparisonResult(
        metrics=metrics,
        reference=images.reference,
        synthetic=images.synthetic,
        body_mask=images.body_mask,
        reference_bone=bones[0],
        synthetic_bone=bones[1],
        reference_surface=surfaces.reference,
        synthetic_surface=surfaces.synthetic,
        distances=surfaces.distances,
        bone_labels=labels,
        per_bone=per_bone,
    )


def _settings(
    transform: Optional[sitk.Transform],
    bone_threshold: float,
    body_threshold: float,
    hu_range: Sequence[float],
    labels: Optional[sitk.Image],
    bone_transforms: Optional[Mapping[int, sitk.Transform]],
    label_margin_mm: float,
) -> Dict[str, object]:
    """The settings a comparison records in ``metrics.json``."""
    return {
        "bone_threshold_hu": float(bone_threshold),
        "body_threshold_hu": float(body_threshold),
        "hu_range": [float(hu_range[0]), float(hu_range[1])],
        "bone_labels": labels is not None,
        "bone_local_transforms": bool(bone_transforms),
        "label_margin_mm": float(label_margin_mm) if labels is not None else None,
        "transform": None if transform is None else transform.GetName(),
    }


def _check_transforms(
    transform: Optional[sitk.Transform],
    bone_labels: Optional[sitk.Image],
    bone_transforms: Optional[Mapping[int, sitk.Transform]],
) -> None:
    _check_transform(transform, "transform")
    if bone_transforms and bone_labels is None:
        raise InvalidParameterError("bone_transforms needs bone_labels: the label of each bone's transform.")
    for label, bone_transform in (bone_transforms or {}).items():
        _check_transform(bone_transform, f"the transform of bone {label}")


def image_comparison(
    reference_ct: sitk.Image,
    synthetic_ct: sitk.Image,
    *,
    transform: Optional[sitk.Transform] = None,
    body_threshold: float = DEFAULT_BODY_THRESHOLD_HU,
    hu_range: Sequence[float] = HU_RANGE,
    progress: Optional[ProgressCallback] = None,
) -> ImageComparison:
    """The first stage of :func:`compare`: the synthetic CT on the reference grid and the image metrics.

    The synthetic CT is resampled linearly onto the reference grid through ``transform`` (reference
    points to synthetic points), :data:`AIR_HU` outside its field of view; MAE, ME, PSNR and SSIM are
    measured in the reference's body (:func:`~SyntheticCTLib.kernel.masks.ct_body_mask` at ``body_threshold``
    HU) where the synthetic CT covers it.
    This is the one definition of a comparison's image metrics, with or without bone.

    Raises
    ------
    GeometryMismatchError
        The synthetic CT covers less than 1 % of the reference's body after the transform.
    """
    report = progress or no_progress
    validate_volume(reference_ct, "the reference CT")
    validate_volume(synthetic_ct, "the synthetic CT")
    _check_transform(transform, "transform")
    report(0.0, "resample", "Bringing the synthetic CT onto the reference grid")
    reference = sitk.Cast(reference_ct, sitk.sitkFloat32)
    synthetic = resample_like(
        sitk.Cast(synthetic_ct, sitk.sitkFloat32), reference, transform=transform, default_value=CT_MIN_HU
    )
    coverage = _coverage(synthetic_ct, reference, transform)  # named: an array view does not keep its image alive
    valid = sitk.GetArrayFromImage(coverage) > 0

    report(0.05, "image metrics", "Body mask and SynthRAD 2023 image metrics")
    body_array = sitk.GetArrayFromImage(ct_body_mask(reference, threshold=body_threshold)) > 0
    overlap = float((body_array & valid).sum()) / max(1, int(body_array.sum()))
    if overlap < MIN_OVERLAP:
        raise GeometryMismatchError(
            f"The synthetic CT covers {overlap:.1%} of the reference CT's body after the transform: the images "
            "do not overlap. Register them first (syntheticct register) and pass the transform."
        )
    if overlap < 0.9:
        logger.warning(
            "The synthetic CT covers only %.0f%% of the reference body; metrics use that part.", 100 * overlap
        )
    measured = sitk.GetImageFromArray((body_array & valid).astype(np.uint8))
    measured.CopyInformation(reference)
    metrics = image_metrics(reference, synthetic, mask=measured, hu_range=hu_range)
    return ImageComparison(reference, synthetic, valid, measured, overlap, metrics)


def _bone_masks(
    reference: sitk.Image, synthetic: sitk.Image, region: np.ndarray, bone_threshold: float
) -> Tuple[sitk.Image, sitk.Image]:
    """The bone of both images at ``bone_threshold`` within ``region``; :class:`NoBoneError` if one has none."""
    reference_bone = _restrict(segment_bone(reference, threshold=bone_threshold), region)
    synthetic_bone = _restrict(segment_bone(synthetic, threshold=bone_threshold), region)
    for name, mask in (("reference", reference_bone), ("synthetic", synthetic_bone)):
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            raise NoBoneError(
                f"No bone found in the {name} CT at {bone_threshold:g} HU (inside the compared region); "
                "lower --bone-threshold or check the image."
            )
    return reference_bone, synthetic_bone


def _surface_distances(
    reference_bone: sitk.Image,
    synthetic_bone: sitk.Image,
    region: np.ndarray,
    report: ProgressCallback,
    *,
    synthetic_surface: Optional[vtk.vtkPolyData] = None,
) -> _Surfaces:
    """Both bone surfaces (world coordinates) and the signed distances between them.

    ``synthetic_surface``, when given, is the synthetic bone surface already in the reference frame
    (from :func:`native_synthetic_surface`); else it is extracted from ``synthetic_bone``.
    Points on a cut of the compared region (the image border, the synthetic CT's field of view, the
    label margin) lie on flat faces that both surfaces share: they are marked ``Measured = 0`` and left
    out of the statistics.
    """
    report(0.4, "surfaces", "Extracting the bone surfaces")
    reference_surface = bone_surface(reference_bone)
    report(0.5, "surfaces", "Extracting the bone surfaces")
    if synthetic_surface is None:
        synthetic_surface = bone_surface(synthetic_bone)
    report(0.6, "distances", "Signed point-wise surface distances")
    interior = _interior(region)
    syn_measured = points_in_mask(surface_points(synthetic_surface), interior, like=reference_bone)
    ref_measured = points_in_mask(surface_points(reference_surface), interior, like=reference_bone)
    set_point_array(synthetic_surface, MEASURED_ARRAY, syn_measured.astype(np.uint8))
    set_point_array(reference_surface, MEASURED_ARRAY, ref_measured.astype(np.uint8))
    distances = surface_distances(
        synthetic_surface, reference_surface, synthetic_measured=syn_measured, reference_measured=ref_measured
    )
    if distances.symmetric.n_points == 0:
        raise InvalidParameterError(
            "Every bone-surface point lies on a cut of the compared field of view: nothing to measure."
        )
    return _Surfaces(reference_surface, synthetic_surface, distances)


def native_synthetic_surface(
    synthetic_ct: sitk.Image,
    transform: Optional[sitk.Transform],
    reference: sitk.Image,
    region: np.ndarray,
    bone_threshold: float,
) -> Optional[vtk.vtkPolyData]:
    """The synthetic CT's bone surface extracted on its own grid, mapped into the reference frame.

    Resampling the synthetic CT onto the reference grid before thresholding it moves its bone
    surface by up to a voxel wherever the two grids differ (most at coarse voxels), which a
    comparison would report as deviation. Here the bone is segmented on the synthetic CT's own
    voxels (within ``region``, the compared part of the reference, brought onto the synthetic grid),
    its surface is extracted there, and its points are mapped through the inverse of ``transform``
    (reference to synthetic points) into the reference frame: a perfect alignment measures zero at
    any voxel size.

    Returns None, and the caller falls back to the resampled synthetic CT, when the transform is
    not linear (B-spline, displacement field: no exact inverse) or when nothing needs mapping
    (no transform and the same grid).
    """
    if transform is None and same_grid(synthetic_ct, reference):
        return None
    affine = affine_of(transform, reference)
    if affine is None:
        logger.info("The transform is not linear: the synthetic bone surface is taken from the resampled sCT.")
        return None
    matrix, offset = affine  # reference -> synthetic points
    inverse_matrix = np.linalg.inv(matrix)
    inverse_offset = -inverse_matrix @ offset  # synthetic -> reference points
    inverse = sitk.AffineTransform(3)
    inverse.SetMatrix(tuple(float(v) for v in inverse_matrix.ravel()))
    inverse.SetTranslation(tuple(float(v) for v in inverse_offset))
    region_image = sitk.GetImageFromArray(region.astype(np.uint8))
    region_image.CopyInformation(reference)
    region_native = resample_like(
        region_image, synthetic_ct, transform=inverse, interpolator=sitk.sitkNearestNeighbor, default_value=0
    )
    synthetic = sitk.Cast(synthetic_ct, sitk.sitkFloat32)
    bone = _restrict(segment_bone(synthetic, threshold=bone_threshold), sitk.GetArrayFromImage(region_native) > 0)
    if not np.any(sitk.GetArrayViewFromImage(bone)):
        return None
    return mapped_surface(bone_surface(bone), inverse_matrix, inverse_offset)


COARSE_VOXEL_MM = 1.5
"""Above this voxel size (mm, any axis) surface figures are limited by the voxels, and the record says so."""


def _surface_grid_settings(reference_ct: sitk.Image, synthetic_ct: sitk.Image, native: bool) -> Dict[str, object]:
    """The voxel sizes behind the surfaces, where each surface was extracted, and a note on coarse voxels."""
    reference_spacing = [round(float(v), 4) for v in reference_ct.GetSpacing()]
    synthetic_spacing = [round(float(v), 4) for v in synthetic_ct.GetSpacing()]
    settings: Dict[str, object] = {
        "reference_spacing_mm": reference_spacing,
        "synthetic_spacing_mm": synthetic_spacing,
        "synthetic_surface_grid": "its own (mapped through the transform)" if native else "the reference's",
    }
    coarse = max(reference_spacing + synthetic_spacing)
    if coarse > COARSE_VOXEL_MM:
        settings["voxel_size_note"] = (
            f"Voxels up to {coarse:g} mm: bone-surface figures are limited by the voxel size (a surface "
            f"extracted at a threshold moves by a fraction of a voxel with partial volume)."
        )
    return settings


def _per_bone_rows(surfaces: _Surfaces, labels: sitk.Image, margin_mm: float) -> List[dict]:
    """Label every surface point with its nearest labelled bone (point array ``BoneLabel``); one row per bone."""
    syn_labels = label_surface_points(surface_points(surfaces.synthetic), labels, max_distance_mm=margin_mm)
    ref_labels = label_surface_points(surface_points(surfaces.reference), labels, max_distance_mm=margin_mm)
    set_point_array(surfaces.synthetic, LABEL_ARRAY, syn_labels.astype(np.int32))
    set_point_array(surfaces.reference, LABEL_ARRAY, ref_labels.astype(np.int32))
    present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v > 0)
    return per_bone_stats(surfaces.distances, syn_labels, ref_labels, labels=present)


def _metrics_record(
    images: ImageComparison,
    bone_dice: float,
    distances: SurfaceDistances,
    per_bone: List[dict],
    settings: Mapping[str, object],
    uncertainty: Optional[Mapping[str, Any]] = None,
) -> ComparisonMetrics:
    """Gather the stages' figures, the settings and the versions into one :class:`ComparisonMetrics`."""
    symmetric = distances.symmetric
    return ComparisonMetrics(
        **images.metrics,
        bone_dice=bone_dice,
        surface_mean_mm=symmetric.mean_abs_mm,
        surface_median_mm=symmetric.median_mm,
        surface_rms_mm=symmetric.rms_mm,
        surface_p95_mm=symmetric.p95_mm,
        surface_max_mm=symmetric.max_mm,
        surface_within_1mm=symmetric.within_1mm,
        per_bone=tuple(per_bone),
        surface_within_2mm=symmetric.within_2mm,
        surface_hd95_mm=distances.hd95_mm,
        surface_mean_signed_mm=symmetric.mean_signed_mm,
        synthetic_to_reference=distances.synthetic_to_reference.to_dict(),
        reference_to_synthetic=distances.reference_to_synthetic.to_dict(),
        body_overlap_fraction=images.overlap,
        uncertainty=uncertainty,
        settings={
            **settings,
            "distance_sign": "positive outside the other bone surface",
            "statistics": "area-weighted over surface points; symmetric pools both directions; points on a cut "
            "of the field of view (point array Measured = 0) left out",
        },
        versions={
            "SyntheticCTLib": __version__,
            "SimpleITK": sitk.Version_VersionString(),
            "vtk": vtk.vtkVersion.GetVTKVersion(),
            "numpy": np.__version__,
        },
        note=NOT_FOR_DIAGNOSTIC_USE,
    )


def _interior(region: np.ndarray) -> np.ndarray:
    """``region`` without its outer voxel layer and without the image's border voxels."""

    inner = np.zeros_like(region, dtype=bool)
    inner[1:-1, 1:-1, 1:-1] = region[1:-1, 1:-1, 1:-1]
    return ndimage.binary_erosion(inner, iterations=1)


def _coverage(synthetic_ct: sitk.Image, reference: sitk.Image, transform: Optional[sitk.Transform]) -> sitk.Image:
    """1 where a reference voxel maps inside the synthetic CT's field of view."""
    ones = sitk.Image(synthetic_ct.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(synthetic_ct)
    return resample_like(ones, reference, transform=transform, interpolator=sitk.sitkNearestNeighbor, default_value=0)


def _bone_local_rows(
    rows: List[dict],
    images: ImageComparison,
    synthetic_ct: sitk.Image,
    labels: sitk.Image,
    bone_transforms: Mapping[int, sitk.Transform],
    *,
    reference_bone: sitk.Image,
    valid_region: np.ndarray,
    bone_threshold: float,
    margin_mm: float,
    progress: ProgressCallback,
) -> List[dict]:
    """Replace the rows of bones that have their own transform with bone-local measurements."""

    reference = images.reference

    label_array = sitk.GetArrayViewFromImage(labels)
    spacing_zyx = np.asarray(reference.GetSpacing())[::-1]
    # Each voxel within margin_mm of a bone belongs to the nearest bone; computed on the labels' bounding box.
    present = np.nonzero(label_array)
    pad = np.ceil(margin_mm / spacing_zyx).astype(int) + 1
    box = tuple(
        slice(max(0, int(p.min()) - q), min(n, int(p.max()) + 1 + q))
        for p, q, n in zip(present, pad, label_array.shape)
    )
    crop = label_array[box]
    distance, nearest = ndimage.distance_transform_edt(crop == 0, sampling=spacing_zyx, return_indices=True)
    owner = np.zeros(label_array.shape, dtype=label_array.dtype)
    owner_crop = crop[tuple(nearest)]
    owner_crop[distance > margin_mm] = 0
    owner[box] = owner_crop
    del distance, nearest
    by_label = {row["label"]: row for row in rows}
    items = sorted(bone_transforms.items())
    for i, (label, bone_transform) in enumerate(items):
        progress(i / max(1, len(items)), "per bone", f"Bone {label} with its own transform")
        zone = (owner == int(label)) & valid_region
        if not zone.any():
            logger.warning("Bone %s has no voxel in the label map; its transform is not used.", label)
            continue
        moved = resample_like(
            sitk.Cast(synthetic_ct, sitk.sitkFloat32), reference, transform=bone_transform, default_value=CT_MIN_HU
        )
        covered = sitk.GetArrayFromImage(_coverage(synthetic_ct, reference, bone_transform)) > 0
        zone &= covered
        syn = _restrict(segment_bone(moved, threshold=bone_threshold), zone)
        ref = _restrict(reference_bone, zone)
        if not np.any(sitk.GetArrayViewFromImage(syn)) or not np.any(sitk.GetArrayViewFromImage(ref)):
            logger.warning("Bone %s: no bone in its zone after its transform; kept the global measurement.", label)
            continue
        syn_surface, ref_surface = bone_surface(syn), bone_surface(ref)
        interior = _interior(zone)
        sub = surface_distances(
            syn_surface,
            ref_surface,
            store=False,
            synthetic_measured=points_in_mask(surface_points(syn_surface), interior, like=reference),
            reference_measured=points_in_mask(surface_points(ref_surface), interior, like=reference),
        )
        row = bone_row(int(label), sub, name=f"bone {int(label)}")
        row["transform"] = "bone-local"
        row["bone_dice"] = dice(ref, syn)
        by_label[int(label)] = row
    progress(1.0, "per bone", "")
    return [by_label[k] for k in sorted(by_label)]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

HISTOGRAM_LIMIT_MM = 10.0
HISTOGRAM_BIN_MM = 0.1


def distance_histogram(distances: SurfaceDistances) -> List[dict]:
    """Rows of the distance histogram: 0.1 mm bins over ±10 mm, plus an underflow and an overflow bin.

    Each row: ``lower_mm``, ``upper_mm``, and per direction the point count and the area fraction.
    """
    n_bins = int(round(2 * HISTOGRAM_LIMIT_MM / HISTOGRAM_BIN_MM))
    edges = np.concatenate([[-np.inf], np.linspace(-HISTOGRAM_LIMIT_MM, HISTOGRAM_LIMIT_MM, n_bins + 1), [np.inf]])
    rows = [{"lower_mm": float(edges[i]), "upper_mm": float(edges[i + 1])} for i in range(len(edges) - 1)]
    for key, values, weights in (
        ("synthetic_to_reference", distances.synthetic_distances, distances.synthetic_weights),
        ("reference_to_synthetic", distances.reference_distances, distances.reference_weights),
    ):
        measured = weights > 0
        values, weights = values[measured], weights[measured]
        index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(rows) - 1)
        counts = np.bincount(index, minlength=len(rows))
        area = np.bincount(index, weights=weights, minlength=len(rows))
        total = float(weights.sum()) or 1.0
        for i, row in enumerate(rows):
            row[f"{key}_count"] = int(counts[i])
            row[f"{key}_area_fraction"] = float(area[i] / total)
    return rows


def _write_bytes(path: Path, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path


def _histogram_csv(rows: List[dict]) -> bytes:
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue().encode("utf-8")


def write_surface(surface: vtk.vtkPolyData, path: Union[str, Path]) -> Path:
    """Write a surface as a VTK XML PolyData file (``.vtp``), atomically."""
    path = Path(path)
    with atomic_output(path) as tmp:
        writer = vtk.vtkXMLPolyDataWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputData(surface)
        writer.SetDataModeToBinary()
        writer.SetCompressorTypeToZLib()
        if writer.Write() != 1 or not tmp.exists():
            raise VolumeWriteError(f"Could not write the surface '{path}'.")
    return path


def write_comparison(
    result: ComparisonResult,
    out_dir: Union[str, Path],
    *,
    title: str = "Synthetic CT vs reference CT",
    inputs: Sequence[Union[str, Path]] = (),
    progress: Optional[ProgressCallback] = None,
) -> Dict[str, Path]:
    """Write the comparison into ``out_dir``; return ``{name: path}`` of the written files.

    Files: ``metrics.json``, ``synthetic_surface.vtp`` and ``reference_surface.vtp`` (point array
    ``SignedDistance_mm``; the synthetic one ``Spread_HU`` too when the comparison had a spread map),
    ``distance_histogram.csv``, PNGs (``surface_front.png``, ``surface_side.png``, ``surface_back.png``,
    with a spread map ``spread_front.png``, ``spread_side.png``, ``spread_back.png``, ``checkerboard.png``,
    ``difference.png``, ``distance_histogram.png``) and ``report.html``, each written atomically.
    """

    report = progress or no_progress
    out = ensure_output_dir(out_dir, what="comparison folder")
    written: Dict[str, Path] = {}

    def target(name: str) -> Path:
        path = out / name
        check_not_input(path, inputs)
        return path

    report(0.0, "writing", "metrics.json")
    text = json.dumps(result.metrics.to_dict(), indent=2, allow_nan=False)
    written["metrics"] = _write_bytes(target("metrics.json"), (text + "\n").encode("utf-8"))
    written["synthetic_surface"] = write_surface(result.synthetic_surface, target("synthetic_surface.vtp"))
    written["reference_surface"] = write_surface(result.reference_surface, target("reference_surface.vtp"))
    written["histogram_csv"] = _write_bytes(
        target("distance_histogram.csv"), _histogram_csv(distance_histogram(result.distances))
    )

    report(0.3, "writing", "pictures")
    images: Dict[str, bytes] = {}
    views = rendering.render_distance_views(result.synthetic_surface, array=DISTANCE_ARRAY)
    for view, png in views.items():
        images[f"surface_{view}"] = png
    if result.synthetic_surface.GetPointData().GetArray(SPREAD_ARRAY) is not None:
        for view, png in rendering.render_spread_views(result.synthetic_surface).items():
            images[f"spread_{view}"] = png
    report(0.6, "writing", "pictures")
    centre = rendering.mask_centre_index(result.reference_bone)
    images["checkerboard"] = rendering.checkerboard_png(result.reference, result.synthetic, centre=centre)
    images["difference"] = rendering.difference_png(
        result.reference, result.synthetic, centre=centre, mask=result.body_mask
    )
    images["distance_histogram"] = rendering.histogram_png(result.distances)
    for name, png in images.items():
        written[name] = _write_bytes(target(f"{name}.png"), png)

    report(0.9, "writing", "report.html")
    html = comparison_report(result.metrics.to_dict(), images, title=title)
    written["report"] = _write_bytes(target("report.html"), html.encode("utf-8"))
    report(1.0, "writing", f"Wrote {len(written)} files to {out}")
    return written
