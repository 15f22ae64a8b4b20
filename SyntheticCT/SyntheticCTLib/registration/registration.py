"""Register a moving image (synthetic CT, CT or MRI) to a fixed CT with SimpleITK.

:func:`register` runs a multi-resolution registration:

1. **Preparation.** The modality of each image is detected (:func:`.modality.detect_modality`) and
   the metric chosen: correlation on the HU window [-200, 1500] for two CT-like images, Mattes mutual
   information otherwise (override with ``metric``). Both images are cropped to their body (or mask)
   plus a margin. Levels (default 8, 4, 2, 1 mm) average bins of voxels (:mod:`.pyramid`).
2. **Initialization** (:mod:`.initialization`): as-is, geometry centres and body centroids, each with a
   coarse grid of rotations, scored on the coarsest level; the best few are refined and the best kept.
3. **Rigid** (Euler 3D) on every level, coarse to fine (regular-step gradient descent, physical-shift
   parameter scales).
4. ``affine``: an affine transform on the finer levels, from the rigid result.
   ``deformable``: a B-spline (coarse control grid, bounded iterations, L-BFGS-B) on top of the affine.
   ``bone-local``: the global rigid result is refined per bone (:mod:`.bone_local`).

Accuracy for little time: the metric is sampled on a jittered regular grid (stratified, less noise
than random points), on the two finest levels only where the fixed image has edges (flat regions tell
nothing about the alignment), and for mono-modal metrics the finest level is smoothed by one voxel
(less noise and interpolation bias). Samples are drawn with a fixed seed: the same inputs give the
same transform.

The transform maps points of the **fixed** space to the **moving** space (ITK resampling convention);
see :mod:`.transforms_io` for the files and how 3D Slicer loads them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.hu import AIR_HU
from SyntheticCTLib.kernel.io import validate_volume
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress, scaled
from SyntheticCTLib.registration.bone_local import (
    DEFAULT_BONE_THRESHOLD_HU,
    DEFAULT_DILATION_MM,
    bone_components,
    bone_label_map,
    refine_bones,
)
from SyntheticCTLib.registration.engine import (
    DEFAULT_SEED,
    LevelResult,
    NonOverlapError,
    RegistrationError,
    make_method,
    optimize,
    sampling_fraction,
)
from SyntheticCTLib.registration.initialization import (
    INITIALIZATIONS,
    Initialization,
    check_overlap,
    initialize_rigid,
    mask_points,
    physical_centre,
    rigid_part,
    transform_points,
)
from SyntheticCTLib.registration.modality import (
    check_not_constant,
    choose_metric,
    detect_modality,
    foreground_mask,
    intensity_window,
    windowed,
)
from SyntheticCTLib.registration.pyramid import (
    crop_to_mask,
    informative_mask,
    level_spacing,
    mask_on_grid,
    plan_levels,
    shrink,
)
from SyntheticCTLib.registration.transforms_io import (
    TRANSFORM_DIRECTION,
    TransformIOError,
    read_transform,
    transform_from_dict,
    transform_to_dict,
    write_transform,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "RegistrationResult",
    "RegistrationError",
    "NonOverlapError",
    "TransformIOError",
    "register",
    "resample_moving",
    "write_transform",
    "read_transform",
    "transform_to_dict",
    "transform_from_dict",
    "transform_points",
    "target_registration_error",
    "TRANSFORM_DIRECTION",
]

MODES = ("rigid", "affine", "deformable", "bone-local")

DEFAULT_LEVELS_MM = (8.0, 4.0, 2.0, 1.0)
"""Target voxel spacings of the levels, coarse to fine (never finer than the fixed image)."""

AFFINE_COARSEST_MM = 4.0
DEFORMABLE_LEVELS_MM = (4.0, 2.0)
BONE_LOCAL_LEVELS_MM = (2.0, 1.0)
DEFAULT_BSPLINE_SPACING_MM = 50.0
BSPLINE_ITERATIONS = 30  # per level: bounded, part of the regularization
BSPLINE_SAMPLES = 5_000  # a B-spline sample costs ~5x a rigid one
CROP_MARGIN_MM = 10.0
SEARCH_MAX_SAMPLES = 3_000
BODY_VOXELS = 500_000  # body masks (centroids, overlap, crop) on a grid of at most about this many voxels
COARSE_MAX_SAMPLES = 25_000
EDGE_SAMPLING_LEVELS = 2
EDGE_FRACTION = 0.3
EDGE_MASK_MAX_VOXELS = 2_000_000
# Gaussian sigma of the finest level, in voxels, per metric: less noise and interpolation bias for mono-modal
# metrics; mutual information between modalities whose edges differ is biased by smoothing, so it gets none.
FINEST_SMOOTHING = {"correlation": 1.0, "meansquares": 1.0, "mattes": 0.0}
FINAL_SAMPLES = {"correlation": 10_000, "meansquares": 10_000, "mattes": 30_000}
"""Metric samples of the finest level (smoothed mono-modal metrics need few; a joint histogram needs more)."""
LEVEL_MIN_STEP = 0.005  # last step of the coarser levels, in voxels
LEVEL_RELAXATION = 0.6
FINAL_STEP = 0.5  # first step of the finest level, in voxels
FINAL_MIN_STEP = 0.0003  # last step of the finest level, in voxels
FINAL_RELAXATION = 0.7  # slower step decrease than the coarse levels: converges along the rotation/translation valley
POOR_CORRELATION = -0.25  # correlation metric = -NCC^2: above this, the images hardly agree


@dataclass
class RegistrationResult:
    """The outcome of :func:`register`.

    ``transform`` maps fixed-space points to moving-space points (ITK resampling convention).
    ``per_bone`` (bone-local mode) lists dicts ``{label, transform, metric_value, voxels, iterations,
    shift_from_global_mm}``; ``transform`` stays the global rigid one.
    """

    transform: sitk.Transform
    metric_value: float
    iterations: int
    elapsed_s: float
    mode: str
    metric: str
    per_bone: List[dict] = field(default_factory=list)
    converged: bool = True
    fixed_modality: str = ""
    moving_modality: str = ""
    initialization: Optional[dict] = None
    levels: List[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary (transform parameters included for linear transforms)."""
        transform = transform_to_dict(self.transform)
        if transform.get("type") == "CompositeTransform":
            transform = {
                "type": "CompositeTransform",
                "transforms": [
                    t
                    if "matrix" in t
                    else {
                        "type": t["type"],
                        "parameters": len(t.get("parameters", [])),
                        "fixed_parameters": t.get("fixed_parameters"),
                    }
                    for t in transform["transforms"]
                ],
            }
        return {
            "mode": self.mode,
            "metric": self.metric,
            "metric_value": float(self.metric_value),
            "iterations": int(self.iterations),
            "elapsed_s": round(float(self.elapsed_s), 3),
            "converged": bool(self.converged),
            "fixed_modality": self.fixed_modality,
            "moving_modality": self.moving_modality,
            "transform_direction": TRANSFORM_DIRECTION,
            "transform": transform,
            "initialization": self.initialization,
            "levels": self.levels,
            "per_bone": [
                {**{k: v for k, v in b.items() if k != "transform"}, "transform": transform_to_dict(b["transform"])}
                for b in self.per_bone
            ],
        }


def target_registration_error(estimated: sitk.Transform, truth: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """Distances (mm) between where ``estimated`` and ``truth`` map each world point of ``points`` ``(n, 3)``."""
    return np.linalg.norm(transform_points(estimated, points) - transform_points(truth, points), axis=1)


def resample_moving(
    moving: sitk.Image,
    fixed: sitk.Image,
    transform: sitk.Transform,
    *,
    default_value: Optional[float] = None,
    interpolator: int = sitk.sitkLinear,
) -> sitk.Image:
    """The moving image resampled onto the fixed grid through ``transform`` (same pixel type as ``moving``).

    ``default_value`` (outside the moving field of view) defaults to -1000 HU for a CT-like image, else 0.
    """
    if default_value is None:
        default_value = AIR_HU if detect_modality(moving) == "ct" else 0.0
    return sitk.Resample(moving, fixed, transform, interpolator, float(default_value), moving.GetPixelID())


def _checked_mask(mask: Optional[sitk.Image], reference: sitk.Image, name: str) -> Optional[sitk.Image]:
    if mask is None:
        return None
    validate_volume(mask, name, check_finite=False)
    binary = mask_on_grid(mask, reference)
    if not np.any(sitk.GetArrayViewFromImage(binary)):
        raise InvalidParameterError(f"The {name} is empty inside the image's field of view (no nonzero voxel).")
    return binary


def _field_of_view(image: sitk.Image) -> sitk.Image:
    """A mask of ones over ``image``'s whole field of view, on a grid of at most about 64**3 voxels."""
    factors = [max(1, n // 64) for n in image.GetSize()]
    small = sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors)
    return sitk.Cast(small * 0 + 1, sitk.sitkUInt8)


def _moving_factors(fixed_factors: Sequence[int], fixed: sitk.Image, moving: sitk.Image) -> List[int]:
    target = max(s * f for s, f in zip(fixed.GetSpacing(), fixed_factors))
    return [max(1, min(int(round(target / s)), max(1, n // 8))) for s, n in zip(moving.GetSpacing(), moving.GetSize())]


class _Pyramid:
    """Level images of the (windowed, cropped) fixed and moving images, built on demand."""

    def __init__(self, fixed: sitk.Image, moving: sitk.Image, spacings_mm: Sequence[float], smoothing: float) -> None:
        self.fixed, self.moving, self.smoothing = fixed, moving, smoothing
        self.factors = plan_levels(fixed, spacings_mm)
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.factors)

    def level(self, i: int, *, smoothed: bool = True):
        """(fixed, moving) images of level ``i``; the finest level is smoothed (see :data:`FINEST_SMOOTHING`)."""
        if i not in self._cache:
            f = self.factors[i]
            self._cache[i] = (shrink(self.fixed, f), shrink(self.moving, _moving_factors(f, self.fixed, self.moving)))
        if not smoothed or i != len(self.factors) - 1 or self.smoothing <= 0:
            return self._cache[i]
        if "smoothed" not in self._cache:
            fixed, moving = self._cache[i]
            sigma = self.smoothing * float(np.mean(fixed.GetSpacing()))
            self._cache["smoothed"] = (
                sitk.SmoothingRecursiveGaussian(fixed, sigma),
                sitk.SmoothingRecursiveGaussian(moving, sigma),
            )
        return self._cache["smoothed"]

    def spacing(self, i: int) -> float:
        return level_spacing(self.fixed, self.factors[i])

    def voxels(self, i: int) -> int:
        return int(np.prod(self.level(i)[0].GetSize()))

    def edge_mask(self, i: int, mask: Optional[sitk.Image]) -> Tuple[sitk.Image, int]:
        """(mask of the informative voxels of level ``i``, within ``mask``; its number of level voxels)."""
        edges = informative_mask(self.level(i, smoothed=False)[0], EDGE_FRACTION, max_voxels=EDGE_MASK_MAX_VOXELS)
        if mask is not None:
            edges = sitk.Cast(edges & mask_on_grid(mask, edges), sitk.sitkUInt8)
        fraction = float(np.mean(sitk.GetArrayViewFromImage(edges) > 0))
        return edges, max(1, int(self.voxels(i) * fraction))


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    mode: str = "rigid",
    metric: str = "auto",
    fixed_mask: Optional[sitk.Image] = None,
    moving_mask: Optional[sitk.Image] = None,
    bone_labels: Optional[sitk.Image] = None,
    progress: Optional[ProgressCallback] = None,
    initialize: str = "auto",
    initial_transform: Optional[sitk.Transform] = None,
    level_spacings_mm: Sequence[float] = DEFAULT_LEVELS_MM,
    search_max_deg: float = 30.0,
    search_step_deg: float = 15.0,
    max_iterations: int = 200,
    max_samples: Optional[int] = None,
    seed: int = DEFAULT_SEED,
    bspline_spacing_mm: float = DEFAULT_BSPLINE_SPACING_MM,
    bone_threshold_hu: float = DEFAULT_BONE_THRESHOLD_HU,
    bone_dilation_mm: float = DEFAULT_DILATION_MM,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; the result's transform maps fixed points to moving points.

    Parameters
    ----------
    fixed, moving
        Scalar 3D images (the fixed one is normally the CT). Any geometry; they need not overlap at first.
    mode
        ``rigid`` (Euler 3D), ``affine``, ``deformable`` (B-spline over the affine) or ``bone-local``
        (global rigid, then one rigid transform per bone, in ``per_bone``).
    metric
        ``auto`` (correlation for two CT-like images, Mattes mutual information otherwise),
        ``correlation``, ``meansquares`` or ``mattes``.
    fixed_mask, moving_mask
        Optional masks (nonzero = use); the metric only samples there.
    bone_labels
        Bone label map in the fixed space (0 = no bone) for ``bone-local``; default: the connected
        components of the fixed CT above ``bone_threshold_hu``.
    progress
        ``report(fraction, stage, message)``; it may raise ``Cancelled`` to stop.
    initialize
        ``auto``, ``geometry``, ``moments`` or ``none`` (the physical space as given, no search).
    initial_transform
        A starting transform (fixed -> moving points, as the result's), e.g. a rough manual alignment made
        in Slicer; it replaces ``initialize`` and the rotation search, so any pose (prone to supine) can be
        registered. A linear transform: its rigid part (:func:`.initialization.rigid_part`) is the start.
    level_spacings_mm
        Target spacings of the resolution levels, coarse to fine.
    search_max_deg, search_step_deg
        The rotation grid of the initial search, about each axis (0 disables the search).
    max_iterations, max_samples, seed
        Optimizer iterations per level, metric samples per level, and the sampling seed.

    Raises
    ------
    InvalidParameterError
        Unknown mode/metric, constant image, empty mask, bone-local without a CT or labels.
    NonOverlapError
        The images do not overlap after initialization.
    RegistrationError
        SimpleITK failed.
    """
    started = time.perf_counter()
    report = progress or no_progress
    if mode not in MODES:
        raise InvalidParameterError(f"Unknown registration mode '{mode}'; choose one of {', '.join(MODES)}.")
    if initialize not in INITIALIZATIONS:
        raise InvalidParameterError(
            f"Unknown initialization '{initialize}'; choose one of {', '.join(INITIALIZATIONS)}."
        )
    if max_iterations < 1 or (max_samples is not None and max_samples < 100):
        raise InvalidParameterError("max_iterations must be >= 1 and max_samples >= 100.")
    validate_volume(fixed, "fixed image")
    validate_volume(moving, "moving image")
    check_not_constant(fixed, "fixed")
    check_not_constant(moving, "moving")

    report(0.0, "preparing", "detecting modalities")
    fixed_modality, moving_modality = detect_modality(fixed), detect_modality(moving)
    metric_name = choose_metric(fixed_modality, moving_modality, metric)
    if max_samples is None:
        max_samples = FINAL_SAMPLES[metric_name]
    logger.info(
        "Fixed image: %s-like, moving image: %s-like; metric: %s.",
        fixed_modality.upper(),
        moving_modality.upper(),
        metric_name,
    )
    if mode == "bone-local" and bone_labels is None and fixed_modality != "ct":
        raise InvalidParameterError(
            "Bone-local registration needs a CT as the fixed image (its bone is split into "
            "pieces) or a bone label map in the fixed space."
        )

    fixed_mask = _checked_mask(fixed_mask, fixed, "fixed mask")
    moving_mask = _checked_mask(moving_mask, moving, "moving mask")
    fixed_body = (
        fixed_mask if fixed_mask is not None else foreground_mask(fixed, fixed_modality, max_voxels=BODY_VOXELS)
    )
    moving_body = (
        moving_mask if moving_mask is not None else foreground_mask(moving, moving_modality, max_voxels=BODY_VOXELS)
    )
    fixed_window = intensity_window(fixed, fixed_modality)
    moving_window = intensity_window(moving, moving_modality)
    fixed_crop = windowed(crop_to_mask(fixed, fixed_body, CROP_MARGIN_MM), fixed_window)
    moving_crop = windowed(
        crop_to_mask(moving, moving_body, CROP_MARGIN_MM) if moving_mask is None else moving, moving_window
    )
    fixed_points = mask_points(fixed_body, max_points=5000, seed=seed)
    moving_points = mask_points(moving_body, max_points=5000, seed=seed + 1)
    if len(fixed_points) == 0:
        fixed_points = mask_points(_field_of_view(fixed), max_points=5000, seed=seed)
    if len(moving_points) == 0:
        moving_points = mask_points(_field_of_view(moving), max_points=5000, seed=seed)
    mask_f = mask_on_grid(fixed_mask, fixed_crop) if fixed_mask is not None else None

    pyramid = _Pyramid(fixed_crop, moving_crop, level_spacings_mm, FINEST_SMOOTHING.get(metric_name, 0.0))
    n_levels = len(pyramid)
    mask_fraction = 1.0 if mask_f is None else float(np.mean(sitk.GetArrayViewFromImage(mask_f) > 0))

    # Progress shares of the stages.
    shares = {"initialization": 0.2, "rigid": 0.45}
    if mode == "affine":
        shares["affine"] = 0.3
    elif mode == "deformable":
        shares.update(affine=0.2, deformable=0.3)
    elif mode == "bone-local":
        shares["bone-local"] = 0.3
    total_share = sum(shares.values())
    bounds, position = {}, 0.0
    for stage, share in shares.items():
        bounds[stage] = (position / total_share, (position + share) / total_share)
        position += share

    levels_log: List[dict] = []
    iterations = 0

    def run_level(
        i: int,
        transform: sitk.Transform,
        stage: str,
        stage_report: ProgressCallback,
        *,
        optimizer: str = "rsgd",
        moving_initial: Optional[sitk.Transform] = None,
        iteration_cap: Optional[int] = None,
        samples: Optional[int] = None,
        final: bool = False,
        log: bool = True,
    ) -> LevelResult:
        nonlocal iterations
        fixed_level, moving_level = pyramid.level(i)
        spacing = pyramid.spacing(i)
        level_mask, eligible = mask_f, int(pyramid.voxels(i) * mask_fraction)
        if EDGE_SAMPLING_LEVELS and i >= n_levels - EDGE_SAMPLING_LEVELS and i > 0:
            level_mask, eligible = pyramid.edge_mask(i, mask_f)
        method = make_method(
            metric_name,
            sampling=sampling_fraction(
                eligible, samples or (max_samples if final else min(max_samples, COARSE_MAX_SAMPLES))
            ),
            seed=seed + i,
            fixed_mask=level_mask,
            moving_mask=moving_mask,
        )
        result = optimize(
            method,
            fixed_level,
            moving_level,
            transform,
            optimizer=optimizer,
            max_iterations=iteration_cap or max_iterations,
            step=spacing * (FINAL_STEP if final else 1.0),
            min_step=spacing * (FINAL_MIN_STEP if final else LEVEL_MIN_STEP),
            relaxation=FINAL_RELAXATION if final else LEVEL_RELAXATION,
            moving_initial=moving_initial,
            report=stage_report,
            stage=f"{stage} registration",
            label=f"level {i + 1}/{n_levels} ({spacing:.1f} mm): ",
        )
        iterations += result.iterations
        if log:
            levels_log.append(
                {
                    "stage": stage,
                    "level": i + 1,
                    "spacing_mm": round(spacing, 3),
                    "iterations": result.iterations,
                    "metric_value": result.metric_value,
                    "stop": result.stop_condition,
                }
            )
        logger.debug(
            "%s level %d (%.1f mm): %d iterations, metric %.6g; %s",
            stage,
            i + 1,
            spacing,
            result.iterations,
            result.metric_value,
            result.stop_condition,
        )
        return result

    # 1. Initialization on the coarsest level.
    init_report = scaled(report, *bounds["initialization"])
    rigid_report = scaled(report, *bounds["rigid"])
    fixed_coarse, moving_coarse = pyramid.level(0)

    def search_method() -> sitk.ImageRegistrationMethod:
        return make_method(
            metric_name,
            sampling=sampling_fraction(int(pyramid.voxels(0) * mask_fraction), SEARCH_MAX_SAMPLES),
            seed=seed,
            fixed_mask=mask_f,
            moving_mask=moving_mask,
        )

    first_level_done = False
    if initial_transform is not None:
        centre = fixed_points.mean(axis=0) if len(fixed_points) else physical_centre(fixed_coarse)
        start = rigid_part(initial_transform, centre)
        angles = tuple(
            round(float(np.degrees(a)), 3) for a in (start.GetAngleX(), start.GetAngleY(), start.GetAngleZ())
        )
        init = Initialization(start, "user", angles, check_overlap(start, fixed_points, moving), 1)
    elif initialize == "none":
        init = initialize_rigid(
            fixed_coarse,
            moving_coarse,
            method="none",
            metric_factory=search_method,
            fixed_points=fixed_points,
            moving_points=moving_points,
        )
    else:
        refine_iterations = min(max_iterations, 100)

        def refine(t: sitk.Transform):
            r = run_level(0, t, "initialization", lambda *a, **k: None, iteration_cap=refine_iterations, log=False)
            return r.transform, r.metric_value

        init = initialize_rigid(
            fixed_coarse,
            moving_coarse,
            method=initialize,
            metric_factory=search_method,
            fixed_points=fixed_points,
            moving_points=moving_points,
            search_max_deg=search_max_deg,
            search_step_deg=search_step_deg,
            refine=refine,
            progress=lambda f, m: init_report(f, "initialization", m),
        )
        first_level_done = True
    check_overlap(init.transform, fixed_points, moving)
    _log_initialization(init)
    init_report(1.0, "initialization", f"{init.method}, rotation {init.rotation_deg} deg")

    # 2. Rigid, coarse to fine.
    transform = init.transform
    result: Optional[LevelResult] = None
    rigid_levels = list(range(1 if first_level_done else 0, n_levels))
    for k, i in enumerate(rigid_levels):
        result = run_level(
            i,
            transform,
            "rigid",
            scaled(rigid_report, k / len(rigid_levels), (k + 1) / len(rigid_levels)),
            final=i == n_levels - 1,
        )
        transform = result.transform
    if result is None:  # a single level, already optimized during the initialization
        result = run_level(0, transform, "rigid", rigid_report, final=True)
        transform = result.transform

    per_bone: List[dict] = []
    # 3. Affine / deformable / bone-local.
    if mode in ("affine", "deformable"):
        affine = sitk.AffineTransform(3)
        affine.SetCenter(transform.GetCenter())
        affine.SetMatrix(transform.GetMatrix())
        affine.SetTranslation(transform.GetTranslation())
        affine_levels = [i for i in range(n_levels) if pyramid.spacing(i) <= AFFINE_COARSEST_MM + 1e-6] or [
            n_levels - 1
        ]
        affine_report = scaled(report, *bounds["affine"])
        for k, i in enumerate(affine_levels):
            result = run_level(
                i,
                affine,
                "affine",
                scaled(affine_report, k / len(affine_levels), (k + 1) / len(affine_levels)),
                final=i == n_levels - 1,
            )
            affine = result.transform
        transform = affine
    if mode == "deformable":
        transform, result = _deformable(
            pyramid, transform, bspline_spacing_mm, run_level, scaled(report, *bounds["deformable"])
        )
    if mode == "bone-local":
        labels = (
            bone_label_map(bone_labels, fixed)
            if bone_labels is not None
            else bone_components(fixed, threshold_hu=bone_threshold_hu)
        )
        per_bone = refine_bones(
            windowed(fixed, fixed_window),
            windowed(moving, moving_window),
            labels,
            transform,
            metric=metric_name,
            level_spacings_mm=[s for s in BONE_LOCAL_LEVELS_MM],
            dilation_mm=bone_dilation_mm,
            max_iterations=max_iterations,
            max_samples=max(max_samples // 2, 1000),
            seed=seed,
            moving_mask=moving_mask,
            progress=scaled(report, *bounds["bone-local"]),
        )
        iterations += sum(b["iterations"] for b in per_bone)

    converged = _check_convergence(result, metric_name, bounded=mode == "deformable")
    elapsed = time.perf_counter() - started
    report(1.0, "done", f"metric {result.metric_value:.5g}, {iterations} iterations, {elapsed:.1f} s")
    logger.info(
        "Registration (%s, %s) finished in %.1f s: metric %.6g after %d iterations.",
        mode,
        metric_name,
        elapsed,
        result.metric_value,
        iterations,
    )
    return RegistrationResult(
        transform=transform,
        metric_value=float(result.metric_value),
        iterations=iterations,
        elapsed_s=elapsed,
        mode=mode,
        metric=metric_name,
        per_bone=per_bone,
        converged=converged,
        fixed_modality=fixed_modality,
        moving_modality=moving_modality,
        initialization=init.to_dict(),
        levels=levels_log,
    )


def _deformable(pyramid: _Pyramid, affine: sitk.Transform, control_spacing_mm: float, run_level, report):
    """A B-spline over ``affine`` on the levels of :data:`DEFORMABLE_LEVELS_MM` (L-BFGS-B, bounded iterations)."""
    if not control_spacing_mm > 0:
        raise InvalidParameterError("The B-spline control-point spacing must be positive.")
    fixed_full = pyramid.fixed
    extent = [n * s for n, s in zip(fixed_full.GetSize(), fixed_full.GetSpacing())]
    mesh = [max(1, int(round(e / control_spacing_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed_full, mesh, 3)
    candidates = [
        i
        for i in range(len(pyramid))
        if pyramid.spacing(i) >= min(DEFORMABLE_LEVELS_MM) - 1e-6
        and pyramid.spacing(i) <= max(DEFORMABLE_LEVELS_MM) + 1e-6
    ] or [len(pyramid) - 1]
    result = None
    for k, i in enumerate(candidates):
        result = run_level(
            i,
            bspline,
            "deformable",
            scaled(report, k / len(candidates), (k + 1) / len(candidates)),
            optimizer="lbfgsb",
            moving_initial=affine,
            iteration_cap=BSPLINE_ITERATIONS,
            samples=BSPLINE_SAMPLES,
        )
        bspline = result.transform
    composite = sitk.CompositeTransform([affine, bspline])
    return composite, result


def _log_initialization(init: Initialization) -> None:
    logger.info(
        "Initialization: %s translation, rotation (%.0f, %.0f, %.0f) deg, %.0f %% overlap, %d candidates.",
        init.method,
        *init.rotation_deg,
        100 * init.overlap,
        init.candidates,
    )


def _check_convergence(result: LevelResult, metric: str, *, bounded: bool = False) -> bool:
    """Warn (and return False) when the finest level ran out of iterations or the similarity is poor.

    ``bounded``: the iteration limit is part of the method (the B-spline stage), not a failure to converge.
    """
    converged = True
    if result.hit_iteration_limit and bounded:
        logger.info(
            "The B-spline stage used its %d iterations (metric %.6g).", result.max_iterations, result.metric_value
        )
    elif result.hit_iteration_limit:
        logger.warning(
            "The registration did not converge within %d iterations at the finest level "
            "(final metric value %.6g); the result may be imprecise.",
            result.max_iterations,
            result.metric_value,
        )
        converged = False
    if metric == "correlation" and result.metric_value > POOR_CORRELATION:
        logger.warning(
            "The registration ended with a poor similarity (correlation metric %.4f, where -1 is a "
            "perfect match); the images may not show the same anatomy.",
            result.metric_value,
        )
        converged = False
    return converged
