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
from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.hu import AIR_HU
from SyntheticCTLib.kernel.io import validate_volume
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress, scaled
from SyntheticCTLib.registration import MODES
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
    evaluate_metric,
    make_method,
    optimize,
    quiet_itk,
    sampling_fraction,
)
from SyntheticCTLib.registration.initialization import (
    INITIALIZATIONS,
    RIVAL_MIN_ANGLE_DEG,
    Initialization,
    check_overlap,
    initialize_rigid,
    mask_points,
    overlap_fraction,
    overlap_weighted,
    physical_centre,
    refined_poses,
    rigid_part,
    rotation_between_deg,
    rotation_matrix,
    transform_points,
)
from SyntheticCTLib.registration.modality import (
    METRICS,
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
from SyntheticCTLib.registration.quality import (
    Quality,
    grade,
    inverse_residual,
    overlaps,
    pose_margin,
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
    "RegistrationSettings",
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
RIVAL_POSES = 2  # right-angle poses refined for the grade when the pose search did not run
POSE_REFINE_ITERATIONS = 50  # a right-angle pose is refined on the coarsest level; the winner is searched again
POSE_REFINE_SAMPLES = 5_000
LEVEL_MIN_STEP = 0.005  # last step of the coarser levels, in voxels
LEVEL_RELAXATION = 0.6
FINAL_STEP = 0.5  # first step of the finest level, in voxels
FINAL_MIN_STEP = 0.0003  # last step of the finest level, in voxels
FINAL_RELAXATION = 0.7  # slower step decrease than the coarse levels: converges along the rotation/translation valley


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
    quality: Optional[Quality] = None

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
            "quality": None if self.quality is None else self.quality.to_dict(),
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


@dataclass(frozen=True)
class RegistrationSettings:
    """How :func:`register` registers: every option except the images, masks, labels and starting transform.

    mode
        ``rigid`` (Euler 3D), ``affine``, ``deformable`` (B-spline over the affine) or ``bone-local``
        (global rigid, then one rigid transform per bone, in ``per_bone``).
    metric
        ``auto`` (correlation for two CT-like images, Mattes mutual information otherwise),
        ``correlation``, ``meansquares`` or ``mattes``.
    initialize
        ``auto``, ``geometry``, ``moments`` or ``none`` (the physical space as given, no search).
    level_spacings_mm
        Target spacings of the resolution levels, coarse to fine.
    search_max_deg, search_step_deg
        The rotation grid of the initial search, about each axis (0 disables the search).
    pose_search
        Try the 24 right-angle poses first (turned-over scans: prone and supine, head and feet first);
        None (default): on when the fixed image is CT-like (MRI -> CT, CT -> CT), off otherwise. Only
        with the automatic initialization (not ``initialize="none"`` nor an initial transform).
    max_iterations, max_samples, seed
        Optimizer iterations per level, metric samples per level (default: :data:`FINAL_SAMPLES` of the
        metric), and the sampling seed.
    bspline_spacing_mm
        Control-point spacing of the ``deformable`` B-spline.
    bone_threshold_hu, bone_dilation_mm
        ``bone-local``: the HU threshold of the bone components (without a label map) and the margin
        around each bone that its metric samples.
    grade
        Grade the result (:mod:`.quality`: rival poses, body and bone overlap, convergence) into
        ``RegistrationResult.quality``.
    inverse_check
        Also register the other way from the inverse (rigid and affine modes) and measure how far the
        composition is from the identity over the fixed body (about doubles the time).
    """

    mode: str = "rigid"
    metric: str = "auto"
    initialize: str = "auto"
    level_spacings_mm: Tuple[float, ...] = DEFAULT_LEVELS_MM
    search_max_deg: float = 30.0
    search_step_deg: float = 15.0
    pose_search: Optional[bool] = None
    max_iterations: int = 200
    max_samples: Optional[int] = None
    seed: int = DEFAULT_SEED
    bspline_spacing_mm: float = DEFAULT_BSPLINE_SPACING_MM
    bone_threshold_hu: float = DEFAULT_BONE_THRESHOLD_HU
    bone_dilation_mm: float = DEFAULT_DILATION_MM
    grade: bool = True
    inverse_check: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "level_spacings_mm", tuple(float(s) for s in self.level_spacings_mm))
        if self.mode not in MODES:
            raise InvalidParameterError(f"Unknown registration mode '{self.mode}'; choose one of {', '.join(MODES)}.")
        if self.initialize not in INITIALIZATIONS:
            raise InvalidParameterError(
                f"Unknown initialization '{self.initialize}'; choose one of {', '.join(INITIALIZATIONS)}."
            )
        if self.metric not in METRICS:
            raise InvalidParameterError(f"Unknown metric '{self.metric}'; choose one of {', '.join(METRICS)}.")
        if self.max_iterations < 1 or (self.max_samples is not None and self.max_samples < 100):
            raise InvalidParameterError("max_iterations must be >= 1 and max_samples >= 100.")
        if not self.level_spacings_mm or any(not s > 0 for s in self.level_spacings_mm):
            raise InvalidParameterError("level_spacings_mm must list at least one positive spacing.")

    @classmethod
    def from_options(cls, settings: Optional[RegistrationSettings] = None, **options) -> RegistrationSettings:
        """``settings`` (default: the defaults) with ``options`` (field names) replaced.

        Raises
        ------
        TypeError
            An option that is not a field of :class:`RegistrationSettings`.
        """
        base = settings if settings is not None else cls()
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"register() got unknown option(s) {', '.join(unknown)}.")
        return replace(base, **options) if options else base


@dataclass
class _Prepared:
    """The inputs as the stages use them: modalities, metric, windowed crops, body points, the pyramid."""

    moving: sitk.Image
    fixed_modality: str
    moving_modality: str
    metric: str
    max_samples: int
    fixed_window: Tuple[float, float]
    moving_window: Tuple[float, float]
    fixed_points: np.ndarray
    moving_points: np.ndarray
    level_mask: Optional[sitk.Image]
    moving_mask: Optional[sitk.Image]
    pyramid: _Pyramid
    mask_fraction: float


class _LevelRunner:
    """Runs one optimization on one pyramid level and keeps the count of iterations and the level log."""

    def __init__(self, prepared: _Prepared, settings: RegistrationSettings) -> None:
        self.prepared, self.settings = prepared, settings
        self.iterations = 0
        self.levels: List[dict] = []

    def run(
        self,
        i: int,
        transform: sitk.Transform,
        stage: str,
        report: ProgressCallback,
        *,
        optimizer: str = "rsgd",
        moving_initial: Optional[sitk.Transform] = None,
        iteration_cap: Optional[int] = None,
        samples: Optional[int] = None,
        final: bool = False,
        log: bool = True,
    ) -> LevelResult:
        """Optimize ``transform`` on level ``i`` (``final``: the finest level's smaller steps and more samples)."""
        p, s = self.prepared, self.settings
        pyramid, n_levels = p.pyramid, len(p.pyramid)
        fixed_level, moving_level = pyramid.level(i)
        spacing = pyramid.spacing(i)
        level_mask, eligible = p.level_mask, int(pyramid.voxels(i) * p.mask_fraction)
        if EDGE_SAMPLING_LEVELS and i >= n_levels - EDGE_SAMPLING_LEVELS and i > 0:
            level_mask, eligible = pyramid.edge_mask(i, p.level_mask)
        wanted = samples or (p.max_samples if final else min(p.max_samples, COARSE_MAX_SAMPLES))
        method = make_method(
            p.metric,
            sampling=sampling_fraction(eligible, wanted),
            seed=s.seed + i,
            fixed_mask=level_mask,
            moving_mask=p.moving_mask,
        )
        result = optimize(
            method,
            fixed_level,
            moving_level,
            transform,
            optimizer=optimizer,
            max_iterations=iteration_cap or s.max_iterations,
            step=spacing * (FINAL_STEP if final else 1.0),
            min_step=spacing * (FINAL_MIN_STEP if final else LEVEL_MIN_STEP),
            relaxation=FINAL_RELAXATION if final else LEVEL_RELAXATION,
            moving_initial=moving_initial,
            report=report,
            stage=f"{stage} registration",
            label=f"level {i + 1}/{n_levels} ({spacing:.1f} mm): ",
        )
        self.iterations += result.iterations
        if log:
            self.levels.append(
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

    def search_method(self) -> sitk.ImageRegistrationMethod:
        """A metric set-up that scores candidates on the coarsest level (few samples)."""
        p = self.prepared
        return make_method(
            p.metric,
            sampling=sampling_fraction(int(p.pyramid.voxels(0) * p.mask_fraction), SEARCH_MAX_SAMPLES),
            seed=self.settings.seed,
            fixed_mask=p.level_mask,
            moving_mask=p.moving_mask,
        )

    def refine(
        self, transform: sitk.Transform, cap: int = 100, samples: Optional[int] = None
    ) -> Tuple[sitk.Transform, float]:
        """A candidate start optimized on the coarsest level (not logged): (transform, metric value)."""
        cap = min(self.settings.max_iterations, cap)
        r = self.run(0, transform, "initialization", no_progress, iteration_cap=cap, samples=samples, log=False)
        return r.transform, r.metric_value

    def refine_pose(self, transform: sitk.Transform) -> Tuple[sitk.Transform, float]:
        """:meth:`refine` with fewer iterations and samples (:data:`POSE_REFINE_ITERATIONS`,
        :data:`POSE_REFINE_SAMPLES`), for the right-angle poses."""
        return self.refine(transform, POSE_REFINE_ITERATIONS, POSE_REFINE_SAMPLES)


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    settings: Optional[RegistrationSettings] = None,
    fixed_mask: Optional[sitk.Image] = None,
    moving_mask: Optional[sitk.Image] = None,
    bone_labels: Optional[sitk.Image] = None,
    initial_transform: Optional[sitk.Transform] = None,
    progress: Optional[ProgressCallback] = None,
    **options,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; the result's transform maps fixed points to moving points.

    Parameters
    ----------
    fixed, moving
        Scalar 3D images (the fixed one is normally the CT). Any geometry; they need not overlap at first.
    settings
        A :class:`RegistrationSettings`; ``options`` (its field names: ``mode``, ``metric``, ``initialize``,
        ``level_spacings_mm``, ``search_max_deg``, ``search_step_deg``, ``pose_search``, ``max_iterations``, ``max_samples``,
        ``seed``, ``bspline_spacing_mm``, ``bone_threshold_hu``, ``bone_dilation_mm``, ``grade``,
        ``inverse_check``) replace its fields.
    fixed_mask, moving_mask
        Optional masks (nonzero = use); the metric only samples there.
    bone_labels
        Bone label map in the fixed space (0 = no bone) for ``bone-local``; default: the connected
        components of the fixed CT above ``bone_threshold_hu``.
    initial_transform
        A starting transform (fixed -> moving points, as the result's), e.g. a rough manual alignment made
        in Slicer; it replaces ``initialize`` and the rotation search, so any pose (prone to supine) can be
        registered. A linear transform: its rigid part (:func:`.initialization.rigid_part`) is the start.
    progress
        ``report(fraction, stage, message)``; it may raise ``Cancelled`` to stop.

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
    settings = RegistrationSettings.from_options(settings, **options)
    prepared = _prepare(fixed, moving, settings, fixed_mask, moving_mask, bone_labels, report)
    runner = _LevelRunner(prepared, settings)
    bounds = _progress_bounds(settings.mode, settings.inverse_check)

    init, first_level_done = _initialise(runner, initial_transform, scaled(report, *bounds["initialization"]))
    result = _rigid_stage(runner, init.transform, first_level_done, scaled(report, *bounds["rigid"]))
    rigid = transform = result.transform
    per_bone: List[dict] = []
    if settings.mode in ("affine", "deformable"):
        result = _affine_stage(runner, transform, scaled(report, *bounds["affine"]))
        transform = result.transform
    if settings.mode == "deformable":
        transform, result = _deformable(
            prepared.pyramid, transform, settings.bspline_spacing_mm, runner, scaled(report, *bounds["deformable"])
        )
    if settings.mode == "bone-local":
        per_bone = _bone_local_stage(
            fixed, moving, prepared, settings, transform, bone_labels, scaled(report, *bounds["bone-local"])
        )
        runner.iterations += sum(b["iterations"] for b in per_bone)
    converged = _check_convergence(runner, result)
    quality = None
    if settings.grade:
        quality = _quality_stage(
            fixed,
            moving,
            fixed_mask,
            moving_mask,
            runner,
            init,
            rigid,
            transform,
            result,
            converged,
            scaled(report, *bounds["quality"]),
        )
    return _assemble(runner, init, transform, result, per_bone, converged, quality, started, report)


def _prepare(
    fixed: sitk.Image,
    moving: sitk.Image,
    settings: RegistrationSettings,
    fixed_mask: Optional[sitk.Image],
    moving_mask: Optional[sitk.Image],
    bone_labels: Optional[sitk.Image],
    report: ProgressCallback,
) -> _Prepared:
    """Check the inputs; detect the modalities and the metric; crop, window and build the pyramid."""
    validate_volume(fixed, "fixed image")
    validate_volume(moving, "moving image")
    check_not_constant(fixed, "fixed")
    check_not_constant(moving, "moving")

    report(0.0, "preparing", "detecting modalities")
    fixed_modality, moving_modality = detect_modality(fixed), detect_modality(moving)
    metric_name = choose_metric(fixed_modality, moving_modality, settings.metric)
    logger.info(
        "Fixed image: %s-like, moving image: %s-like; metric: %s.",
        fixed_modality.upper(),
        moving_modality.upper(),
        metric_name,
    )
    if settings.mode == "bone-local" and bone_labels is None and fixed_modality != "ct":
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
    seed = settings.seed
    fixed_points = mask_points(fixed_body, max_points=5000, seed=seed)
    moving_points = mask_points(moving_body, max_points=5000, seed=seed + 1)
    if len(fixed_points) == 0:
        fixed_points = mask_points(_field_of_view(fixed), max_points=5000, seed=seed)
    if len(moving_points) == 0:
        moving_points = mask_points(_field_of_view(moving), max_points=5000, seed=seed)
    level_mask = mask_on_grid(fixed_mask, fixed_crop) if fixed_mask is not None else None
    pyramid = _Pyramid(fixed_crop, moving_crop, settings.level_spacings_mm, FINEST_SMOOTHING.get(metric_name, 0.0))
    return _Prepared(
        moving=moving,
        fixed_modality=fixed_modality,
        moving_modality=moving_modality,
        metric=metric_name,
        max_samples=settings.max_samples if settings.max_samples is not None else FINAL_SAMPLES[metric_name],
        fixed_window=fixed_window,
        moving_window=moving_window,
        fixed_points=fixed_points,
        moving_points=moving_points,
        level_mask=level_mask,
        moving_mask=moving_mask,
        pyramid=pyramid,
        mask_fraction=1.0 if level_mask is None else float(np.mean(sitk.GetArrayViewFromImage(level_mask) > 0)),
    )


def _progress_bounds(mode: str, inverse_check: bool = False) -> dict:
    """The share of the progress bar of each stage: ``{stage: (start, stop)}``."""
    shares = {"initialization": 0.2, "rigid": 0.45}
    if mode == "affine":
        shares["affine"] = 0.3
    elif mode == "deformable":
        shares.update(affine=0.2, deformable=0.3)
    elif mode == "bone-local":
        shares["bone-local"] = 0.3
    shares["quality"] = 0.3 if inverse_check else 0.02
    total_share = sum(shares.values())
    bounds, position = {}, 0.0
    for stage, share in shares.items():
        bounds[stage] = (position / total_share, (position + share) / total_share)
        position += share
    return bounds


def _initialise(
    runner: _LevelRunner, initial_transform: Optional[sitk.Transform], report: ProgressCallback
) -> Tuple[Initialization, bool]:
    """The starting rigid transform: the user's, the images as they are, or the automatic search.

    Returns (initialization, whether the coarsest level is already optimized).
    """
    p, s = runner.prepared, runner.settings
    fixed_coarse, moving_coarse = p.pyramid.level(0)
    first_level_done = False
    if initial_transform is not None:
        init = _user_start(initial_transform, p, fixed_coarse)
    else:
        automatic = s.initialize != "none"
        init = initialize_rigid(
            fixed_coarse,
            moving_coarse,
            method=s.initialize,
            metric_factory=runner.search_method,
            fixed_points=p.fixed_points,
            moving_points=p.moving_points,
            search_max_deg=s.search_max_deg,
            search_step_deg=s.search_step_deg,
            pose_search=s.pose_search if s.pose_search is not None else p.fixed_modality == "ct",
            refine=runner.refine if automatic else None,
            pose_refine=runner.refine_pose,
            progress=(lambda f, m: report(f, "initialization", m)) if automatic else None,
        )
        first_level_done = automatic
    check_overlap(init.transform, p.fixed_points, p.moving)
    _log_initialization(init)
    report(1.0, "initialization", f"{init.method}, rotation {init.rotation_deg} deg")
    return init, first_level_done


def _user_start(initial_transform: sitk.Transform, p: _Prepared, fixed_coarse: sitk.Image) -> Initialization:
    """The rigid part of the user's starting transform, about the fixed body's centroid."""
    centre = p.fixed_points.mean(axis=0) if len(p.fixed_points) else physical_centre(fixed_coarse)
    start = rigid_part(initial_transform, centre)
    angles = tuple(round(float(np.degrees(a)), 3) for a in (start.GetAngleX(), start.GetAngleY(), start.GetAngleZ()))
    return Initialization(start, "user", angles, check_overlap(start, p.fixed_points, p.moving), 1)


def _rigid_stage(
    runner: _LevelRunner, start: sitk.Transform, first_level_done: bool, report: ProgressCallback
) -> LevelResult:
    """Rigid registration on every level, coarse to fine (from level 2 when the search optimized level 1)."""
    n_levels = len(runner.prepared.pyramid)
    transform, result = start, None
    levels = list(range(1 if first_level_done else 0, n_levels))
    for k, i in enumerate(levels):
        part = scaled(report, k / len(levels), (k + 1) / len(levels))
        result = runner.run(i, transform, "rigid", part, final=i == n_levels - 1)
        transform = result.transform
    if result is None:  # a single level, already optimized during the initialization
        result = runner.run(0, transform, "rigid", report, final=True)
    return result


def _affine_stage(runner: _LevelRunner, rigid: sitk.Transform, report: ProgressCallback) -> LevelResult:
    """An affine transform from the rigid one, on the levels at most :data:`AFFINE_COARSEST_MM` apart."""
    pyramid = runner.prepared.pyramid
    n_levels = len(pyramid)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    levels = [i for i in range(n_levels) if pyramid.spacing(i) <= AFFINE_COARSEST_MM + 1e-6] or [n_levels - 1]
    result = None
    for k, i in enumerate(levels):
        part = scaled(report, k / len(levels), (k + 1) / len(levels))
        result = runner.run(i, affine, "affine", part, final=i == n_levels - 1)
        affine = result.transform
    return result


def _bone_local_stage(
    fixed: sitk.Image,
    moving: sitk.Image,
    p: _Prepared,
    settings: RegistrationSettings,
    transform: sitk.Transform,
    bone_labels: Optional[sitk.Image],
    report: ProgressCallback,
) -> List[dict]:
    """One rigid refinement per bone (given labels, or the fixed CT's bone components), from ``transform``."""
    labels = (
        bone_label_map(bone_labels, fixed)
        if bone_labels is not None
        else bone_components(fixed, threshold_hu=settings.bone_threshold_hu)
    )
    return refine_bones(
        windowed(fixed, p.fixed_window),
        windowed(moving, p.moving_window),
        labels,
        transform,
        metric=p.metric,
        level_spacings_mm=list(BONE_LOCAL_LEVELS_MM),
        dilation_mm=settings.bone_dilation_mm,
        max_iterations=settings.max_iterations,
        max_samples=max(p.max_samples // 2, 1000),
        seed=settings.seed,
        moving_mask=p.moving_mask,
        progress=report,
    )


def _assemble(
    runner: _LevelRunner,
    init: Initialization,
    transform: sitk.Transform,
    result: LevelResult,
    per_bone: List[dict],
    converged: bool,
    quality: Optional[Quality],
    started: float,
    report: ProgressCallback,
) -> RegistrationResult:
    """The :class:`RegistrationResult` of the stages."""
    p, mode = runner.prepared, runner.settings.mode
    elapsed = time.perf_counter() - started
    report(1.0, "done", f"metric {result.metric_value:.5g}, {runner.iterations} iterations, {elapsed:.1f} s")
    logger.info(
        "Registration (%s, %s) finished in %.1f s: metric %.6g after %d iterations.",
        mode,
        p.metric,
        elapsed,
        result.metric_value,
        runner.iterations,
    )
    return RegistrationResult(
        transform=transform,
        metric_value=float(result.metric_value),
        iterations=runner.iterations,
        elapsed_s=elapsed,
        mode=mode,
        metric=p.metric,
        per_bone=per_bone,
        converged=converged,
        fixed_modality=p.fixed_modality,
        moving_modality=p.moving_modality,
        initialization=init.to_dict(),
        levels=runner.levels,
        quality=quality,
    )


def _deformable(
    pyramid: _Pyramid, affine: sitk.Transform, control_spacing_mm: float, runner: _LevelRunner, report: ProgressCallback
) -> Tuple[sitk.Transform, LevelResult]:
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
        result = runner.run(
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


def _quality_stage(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: Optional[sitk.Image],
    moving_mask: Optional[sitk.Image],
    runner: _LevelRunner,
    init: Initialization,
    rigid: sitk.Transform,
    transform: sitk.Transform,
    result: LevelResult,
    converged: bool,
    report: ProgressCallback,
) -> Quality:
    """Grade the result (:mod:`.quality`); the measures and the verdict are logged."""
    p, s = runner.prepared, runner.settings
    report(0.0, "grading", "overlap of bodies and bones after alignment")
    measures: Dict[str, object] = dict(
        overlaps(fixed, moving, transform, fixed_modality=p.fixed_modality, moving_modality=p.moving_modality)
    )
    measures.update(_rival_poses(runner, init, rigid))
    measures["inverse_residual_mm"] = None
    if s.inverse_check and s.mode in ("rigid", "affine"):
        report(0.05, "grading", "registering the other way")
        backward = register(
            moving,
            fixed,
            settings=replace(s, pose_search=False, inverse_check=False, grade=False),
            fixed_mask=moving_mask,
            moving_mask=fixed_mask,
            initial_transform=transform.GetInverse(),
            progress=scaled(report, 0.05, 1.0),
        )
        mean, worst = inverse_residual(transform, backward.transform, p.fixed_points)
        measures["inverse_residual_mm"] = round(mean, 3)
        measures["inverse_residual_max_mm"] = round(worst, 3)
    quality = grade(measures, converged=converged, metric=p.metric, metric_value=result.metric_value)
    log = logger.info if quality.verdict == "good" else logger.warning
    log("Registration graded %s%s", quality.verdict, (": " + "; ".join(quality.reasons)) if quality.reasons else ".")
    report(1.0, "grading", quality.verdict)
    return quality


def _rival_poses(runner: _LevelRunner, init: Initialization, rigid: sitk.Transform) -> Dict[str, object]:
    """The rigid result and the initialization's refined starts turned by more than
    :data:`.quality.RIVAL_MIN_ANGLE_DEG` from it, scored alike on the coarsest level."""
    p = runner.prepared
    fixed_coarse, moving_coarse = p.pyramid.level(0)
    method = runner.search_method()

    def score(t: sitk.Transform) -> Optional[float]:
        with quiet_itk():
            value = evaluate_metric(method, fixed_coarse, moving_coarse, t)
        return None if value is None else overlap_weighted(value, overlap_fraction(t, p.fixed_points, moving_coarse))

    final = score(rigid)
    rotation = rotation_matrix(rigid)
    alternatives = init.alternatives
    if not init.pose_search:  # the best right-angle poses away from the result, refined for the grade
        alternatives = [
            c.transform
            for c in refined_poses(
                runner.search_method,
                fixed_coarse,
                moving_coarse,
                p.fixed_points,
                p.moving_points,
                runner.refine_pose,
                keep=RIVAL_POSES,
                away_from=rotation,
            )
        ]
    rivals = []
    for t in alternatives:
        angle = rotation_between_deg(rotation, rotation_matrix(t))
        value = score(t) if angle > RIVAL_MIN_ANGLE_DEG else None
        if value is not None:
            rivals.append((value, angle))
    best = min(rivals, default=None)
    return {
        "coarse_score": None if final is None else round(final, 5),
        "rival_score": None if best is None else round(best[0], 5),
        "rival_rotation_deg": None if best is None else round(best[1], 1),
        "pose_margin": pose_margin(final, [r[0] for r in rivals]),
        "poses_compared": len(rivals),
    }


def _log_initialization(init: Initialization) -> None:
    logger.info(
        "Initialization: %s translation, rotation (%.0f, %.0f, %.0f) deg, %.0f %% overlap, %d candidates.",
        init.method,
        *init.rotation_deg,
        100 * init.overlap,
        init.candidates,
    )


def _check_convergence(runner: _LevelRunner, result: LevelResult) -> bool:
    """Whether the optimizer really converged: the finest level of the rigid and of the affine stage stopped
    on its step criterion, not on its iteration limit (the B-spline stage's bounded iterations are part of
    the method and do not count). Warns when not."""
    if result.hit_iteration_limit and result.stop_condition.startswith("LBFGSB"):
        logger.info(
            "The B-spline stage used its %d iterations (metric %.6g).", result.max_iterations, result.metric_value
        )
    last: Dict[str, dict] = {}
    for level in runner.levels:
        if level["stage"] in ("rigid", "affine"):
            last[level["stage"]] = level
    limited = [stage for stage, level in last.items() if "Maximum number of iterations" in str(level["stop"])]
    if limited:
        logger.warning(
            "The registration did not converge within %d iterations at the finest level (%s stage; final metric "
            "value %.6g); the result may be imprecise.",
            runner.settings.max_iterations,
            " and ".join(limited),
            result.metric_value,
        )
    return not limited
