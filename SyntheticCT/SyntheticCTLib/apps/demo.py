"""The end-to-end demo: phantom MRI in; synthetic CT, its registration to a CT and a bone-surface report out.

:func:`run_demo` runs seven steps, each a progress stage of its own and timed:

1. **phantom** - generate a phantom case (multi-echo MRI, CT, tissue and bone labels);
2. **move CT** - move the CT by a random but recorded rigid transform (seeded; rotations up to
   ``max_rotation_deg`` about each axis, shifts up to ``max_shift_mm``), as if scanned another day in
   another position, and resample it onto a CT grid of its own (thicker slices, its own origin);
3. **synthesize** - the synthetic CT (sCT) from the MRI with a model package (the bundled default), and
   its spread (two passes: the MRI as is and flipped along all axes; the sCT is the first pass);
4. **register** - the sCT to the moved CT (mono-modal rigid), and the registration error against the
   known transform (target registration error over the CT's bone voxels);
5. **compare** - bone surfaces and image metrics of the sCT against the CT, through the registration; the
   spread on the sCT bone surface beside the deviation, and how well it predicts the error;
6. **baselines** - the two non-learning baselines through the same comparison and registration, so
   that the model is shown beside them;
7. **report** - ``report.html`` (self-contained) and ``metrics.json``.

Transform convention (ITK resampling, as everywhere in the project): the recorded transform maps
points of the moved CT's space (fixed) to points of the phantom/MRI space (moving), so
``moved_ct = resample(ct, ct_grid, true_transform)``. The registration of the sCT (moving) to the moved
CT (fixed) recovers the same direction, so the two are compared point by point.

The whole run is assembled in a hidden folder inside ``OUT_DIR`` and moved into place at the end: a
failed or cancelled run leaves no partial file behind. Not for diagnostic use.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE, __version__
from SyntheticCTLib.apps import report as report_lib
from SyntheticCTLib.apps.report import DIFFERENCE_WINDOW_HU, HU_WINDOW
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.geometry import resample_like
from SyntheticCTLib.kernel.hu import CT_MIN_HU
from SyntheticCTLib.kernel.io import ensure_output_dir, write_volume
from SyntheticCTLib.kernel.jsonio import json_safe, write_json
from SyntheticCTLib.kernel.progress import CancelToken, ProgressCallback, no_progress, with_cancel
from SyntheticCTLib.kernel.types import PathLike
from SyntheticCTLib.models import resolve_model
from SyntheticCTLib.registration import registration as registration_lib
from SyntheticCTLib.registration.initialization import mask_points
from SyntheticCTLib.registration.registration import target_registration_error
from SyntheticCTLib.synthesis import baselines

logger = logging.getLogger(__name__)

DEFAULT_SEED = 900
"""The demo's default phantom seed: a held-out seed of the bundled model (seeds 0-199 are its training and
validation range; 900-999 are held out), so the demo shows a case the model has never seen."""
DEFAULT_SIZE = (128, 128, 96)
"""Phantom size (x, y, z) in voxels for the demo: small enough for 2 CPU cores in well under 2 minutes."""
DEFAULT_SPACING_MM = 1.0
"""The phantom's spacing: the bundled model's working spacing (a 128 x 128 x 96 mm field of view)."""
MAX_ROTATION_DEG = 10.0
MAX_SHIFT_MM = 15.0
CT_SPACING_FACTOR = (1.0, 1.0, 1.25)
"""The moved CT's grid: the phantom's spacing times this (thicker slices, as a clinical CT often has)."""
TRE_MAX_POINTS = 20000

STEPS = ("phantom", "move CT", "synthesize", "register", "compare", "baselines", "report")
"""The demo's steps, in order; each is one progress stage."""

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"


@dataclass
class StepRecord:
    """One step of the demo: its name, wall time, the code that ran it and its parameters."""

    name: str
    seconds: float = 0.0
    component: str = ""
    version: str = ""
    parameters: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 3),
            "component": self.component,
            "version": self.version,
            "parameters": json_safe(self.parameters),
        }


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: the output folder, its files and the content of ``metrics.json``."""

    out_dir: Path
    report_path: Path
    metrics_path: Path
    metrics: Dict[str, Any]
    steps: List[StepRecord]

    @property
    def total_seconds(self) -> float:
        return float(sum(s.seconds for s in self.steps))


# -- rigid transforms and their error ---------------------------------------------------------------


def random_rigid_transform(
    seed: int,
    center: Sequence[float],
    *,
    max_rotation_deg: float = MAX_ROTATION_DEG,
    max_shift_mm: float = MAX_SHIFT_MM,
) -> sitk.Euler3DTransform:
    """A seeded random rigid transform about ``center``: each angle in ±``max_rotation_deg``, each shift in ±``max_shift_mm``.

    The same ``seed`` always gives the same transform (a generator of its own, independent of the
    phantom's).
    """
    if max_rotation_deg < 0 or max_shift_mm < 0:
        raise InvalidParameterError(
            f"max_rotation_deg and max_shift_mm must be >= 0 (got {max_rotation_deg}, {max_shift_mm})."
        )
    rng = np.random.default_rng([int(seed), 20240607])
    angles = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3)
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(c) for c in center))
    transform.SetRotation(float(angles[0]), float(angles[1]), float(angles[2]))
    transform.SetTranslation(tuple(float(t) for t in shift))
    return transform


def grid_centre(image: sitk.Image) -> np.ndarray:
    """World coordinates (mm) of the centre of ``image``'s field of view."""
    size = np.array(image.GetSize(), dtype=float)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2)))


def moved_ct_grid(
    image: sitk.Image, transform: sitk.Transform, *, spacing_factor: Sequence[float] = CT_SPACING_FACTOR
) -> sitk.Image:
    """The moved CT's own grid: axis-aligned, spacing ``image``'s times ``spacing_factor``, covering the
    same field of view, centred where the anatomy at ``image``'s centre lies after the move.
    """
    spacing = np.array(image.GetSpacing(), dtype=float) * np.asarray(spacing_factor, dtype=float)
    extent = np.array(image.GetSize(), dtype=float) * np.array(image.GetSpacing(), dtype=float)
    size = np.maximum(1, np.ceil(extent / spacing - 1e-6)).astype(int)
    centre = np.array(transform.GetInverse().TransformPoint(tuple(grid_centre(image))))
    origin = centre - spacing * (size - 1) / 2
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetOrigin(tuple(float(o) for o in origin))
    return grid


def rigid_parameters(transform: sitk.Transform, center: Sequence[float]) -> Dict[str, Any]:
    """Describe a (rigid) transform about ``center``: ITK Euler angles (degrees), translation and matrix.

    Works for any transform that is affine (an Euler, a versor, a composite of them), by sampling it.
    ``rotation_deg`` is None when the linear part is not a rotation (an affine registration).
    """
    c = np.asarray(center, dtype=float)
    tc = np.array(transform.TransformPoint(tuple(c)))
    matrix = np.column_stack([np.array(transform.TransformPoint(tuple(c + e))) - tc for e in np.eye(3)])
    rotation: Optional[List[float]] = None
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(c))
    try:
        euler.SetMatrix(tuple(matrix.ravel()), 1e-4)
        rotation = [math.degrees(a) for a in (euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ())]
    except RuntimeError:
        rotation = None
    return {
        "center_mm": c.tolist(),
        "rotation_deg": rotation,
        "translation_mm": (tc - c).tolist(),
        "matrix": matrix.tolist(),
    }


def transform_difference(recovered: sitk.Transform, true: sitk.Transform, center: Sequence[float]) -> Dict[str, float]:
    """The rotation angle (degrees) and the translation (mm, at ``center``) between two affine transforms."""
    a = rigid_parameters(recovered, center)
    b = rigid_parameters(true, center)
    relative = np.asarray(a["matrix"]) @ np.linalg.inv(np.asarray(b["matrix"]))
    cos_angle = np.clip((np.trace(relative) - 1.0) / 2.0, -1.0, 1.0)
    return {
        "rotation_error_deg": float(math.degrees(math.acos(cos_angle))),
        "translation_error_mm": float(np.linalg.norm(np.subtract(a["translation_mm"], b["translation_mm"]))),
    }


def bone_tre(
    recovered: sitk.Transform,
    true: sitk.Transform,
    mask: sitk.Image,
    *,
    max_points: int = TRE_MAX_POINTS,
) -> Dict[str, Any]:
    """Target registration error over the non-zero voxels of ``mask``: ``|recovered(p) - true(p)|`` in mm.

    Both transforms map points of ``mask``'s space. Up to ``max_points`` voxels are drawn (seeded);
    the distances are the registration library's
    :func:`~SyntheticCTLib.registration.registration.target_registration_error`. Returns mean, median,
    p95 and max (mm) and the number of points.
    """

    points = mask_points(mask, max_points=max_points)
    if len(points) == 0:
        raise InvalidParameterError("The target registration error needs a non-empty mask (no bone voxel found).")
    errors = target_registration_error(recovered, true, points)
    return {
        "mean_mm": float(errors.mean()),
        "median_mm": float(np.median(errors)),
        "p95_mm": float(np.percentile(errors, 95)),
        "max_mm": float(errors.max()),
        "n_points": int(len(points)),
    }


# -- helpers ------------------------------------------------------------------------------------------


def _publish(work: Path, out_dir: Path) -> None:
    """Move everything from ``work`` into ``out_dir``, replacing files and folders of the same name."""
    for item in sorted(work.iterdir(), key=lambda p: (p.name in (REPORT_FILE, METRICS_FILE), p.name)):
        target = out_dir / item.name
        if target.is_dir() and not target.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=f".{item.name}.", suffix=".old", dir=out_dir))
            os.replace(target, trash / item.name)
            os.replace(item, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(item, target)


class _Steps:
    """Time the demo's steps and give each its own progress stage ``"[i/n] name"``."""

    def __init__(self, report: ProgressCallback) -> None:
        self.report = report
        self.records: List[StepRecord] = []

    def stage(self, name: str) -> str:
        return f"[{STEPS.index(name) + 1}/{len(STEPS)}] {name}"

    def progress(self, name: str) -> ProgressCallback:
        """A callback for a sub-task: its own stage names become the message of this step's stage."""
        stage = self.stage(name)
        parent = self.report

        def _report(fraction: float, sub_stage: str = "", message: str = "") -> None:
            text = ": ".join(t for t in (sub_stage, message) if t)
            parent(min(max(float(fraction), 0.0), 1.0), stage, text)

        return _report

    def run(self, name: str, func: Callable[[ProgressCallback], Any], **record: Any) -> Any:
        progress = self.progress(name)
        progress(0.0, "", "starting")
        start = time.perf_counter()
        value = func(progress)
        elapsed = time.perf_counter() - start
        progress(1.0, "", f"done in {elapsed:.1f} s")
        self.records.append(StepRecord(name=name, seconds=elapsed, **record))
        logger.info("Demo step '%s' took %.1f s.", name, elapsed)
        return value


def _library_versions() -> Dict[str, str]:
    versions = {"SyntheticCTLib": __version__, "SimpleITK": sitk.Version.VersionString(), "numpy": np.__version__}

    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    if "vtkmodules" in sys.modules:
        from vtkmodules.vtkCommonCore import vtkVersion

        versions["vtk"] = vtkVersion.GetVTKVersion()
    versions["python"] = platform.python_version()
    return versions


def _baselines() -> List[Tuple[str, Callable[..., sitk.Image]]]:
    """The two non-learning baselines of :mod:`SyntheticCTLib.synthesis.baselines`, as (name, function) pairs."""

    return list(baselines.BASELINES.items())


# -- the demo -------------------------------------------------------------------------------------------


def run_demo(
    out_dir: PathLike,
    *,
    seed: int = DEFAULT_SEED,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: float = DEFAULT_SPACING_MM,
    device: str = "auto",
    model: Any = "default",
    max_rotation_deg: float = MAX_ROTATION_DEG,
    max_shift_mm: float = MAX_SHIFT_MM,
    run_baselines: bool = True,
    uncertainty: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> DemoResult:
    """Run the whole demo and write ``OUT_DIR/report.html``, ``OUT_DIR/metrics.json`` and their companions.

    Parameters
    ----------
    out_dir
        Output folder (created; files of the same names are replaced, nothing else is touched).
    seed
        Seeds the phantom and the rigid move of the CT.
    size, spacing
        The phantom's grid (voxels x, y, z; mm).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"mps"``) for the synthesis.
    model
        A model name in the catalog, a package folder or ``.zip``, or a loaded ``ModelPackage``.
    max_rotation_deg, max_shift_mm
        Bounds of the random rigid move of the CT.
    run_baselines
        Compare the two non-learning baselines too.
    uncertainty
        Synthesise in two passes (the MRI as is and flipped) for the sCT's spread (``uncertainty.nii.gz``),
        shown on the bone surface and measured against the error; False: one pass, no spread.
    progress, cancel
        Progress callback (one stage per step) and an optional cancel token.

    Returns
    -------
    DemoResult
        With the content of ``metrics.json``.
    """
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 16:
        raise InvalidParameterError(f"The phantom size must be 3 integers, each at least 16 (got {size}).")
    if not (spacing > 0):
        raise InvalidParameterError(f"The phantom spacing must be positive (got {spacing}).")
    out_path = Path(out_dir)
    if out_path.exists() and not out_path.is_dir():  # before any work; ensure_output_dir words it
        ensure_output_dir(out_path, what="demo's output folder (OUT_DIR)")
    # The model and the device next: a wrong name, a corrupt package or a missing GPU fails before any work.
    from SyntheticCTLib.synthesis.inference import select_device

    package = model if hasattr(model, "card") else resolve_model(model)
    device = select_device(device)
    out = ensure_output_dir(out_path, what="demo's output folder (OUT_DIR)")
    report = with_cancel(progress or no_progress, cancel)
    work = Path(tempfile.mkdtemp(prefix=".demo-", suffix=".partial", dir=out))
    settings = _Settings(
        work=work,
        seed=seed,
        size=size,
        spacing=float(spacing),
        device=device,
        package=package,
        max_rotation_deg=max_rotation_deg,
        max_shift_mm=max_shift_mm,
        run_baselines=run_baselines,
        uncertainty=uncertainty,
    )
    try:
        result = _run(settings, out, report)
        _publish(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


@dataclass(frozen=True)
class _Settings:
    """What one demo run was asked for, and the hidden folder it is assembled in."""

    work: Path
    seed: int
    size: Tuple[int, int, int]
    spacing: float
    device: str
    package: Any
    max_rotation_deg: float
    max_shift_mm: float
    run_baselines: bool
    uncertainty: bool = True


def _run(s: _Settings, out: Path, report: ProgressCallback) -> DemoResult:
    """The seven steps (:data:`STEPS`) in order, each timed and recorded, then ``metrics.json``."""
    steps = _Steps(report)
    (s.work / "images").mkdir()
    case = steps.run("phantom", lambda p: _make_case(s, p), **_step_record("phantom", s))
    true_transform, ct_moved, bones_moved = steps.run(
        "move CT", lambda p: _move_ct(s, case, p), **_step_record("move CT", s)
    )
    sct, spread = steps.run("synthesize", lambda p: _synthesize(s, case, p), **_step_record("synthesize", s))
    registration, tre = steps.run(
        "register",
        lambda p: _register(s, ct_moved, sct, bones_moved, true_transform, p),
        **_step_record("register", s),
    )
    comparison, comparison_files = steps.run(
        "compare",
        lambda p: _compare(s, ct_moved, sct, bones_moved, registration.transform, p, spread=spread),
        **_step_record("compare", s),
    )
    baseline_results = steps.run(
        "baselines",
        lambda p: _compare_baselines(s, case, ct_moved, bones_moved, registration.transform, p),
        **_step_record("baselines", s),
    )
    metrics = _metrics_document(
        s, case, ct_moved, true_transform, registration, tre, comparison.metrics.to_dict(), baseline_results
    )

    def _report(progress: ProgressCallback) -> None:
        _record_steps(metrics, steps)  # the report shows the steps done so far
        _write_report(s, metrics, case, ct_moved, comparison, registration.transform, comparison_files, progress)

    steps.run("report", _report, **_step_record("report", s))
    _record_steps(metrics, steps)
    write_json(s.work / METRICS_FILE, metrics)
    return DemoResult(
        out_dir=out,
        report_path=out / REPORT_FILE,
        metrics_path=out / METRICS_FILE,
        metrics=json_safe(metrics),
        steps=steps.records,
    )


def _step_record(name: str, s: _Settings) -> Dict[str, Any]:
    """What ``metrics.json`` records of step ``name``: the code that ran it, its version and its parameters."""
    records: Dict[str, Tuple[str, Dict[str, Any]]] = {
        "phantom": (
            "SyntheticCTLib.phantom.make_phantom",
            {"seed": s.seed, "size": list(s.size), "spacing_mm": s.spacing},
        ),
        "move CT": (
            "SyntheticCTLib.apps.demo.random_rigid_transform",
            {
                "max_rotation_deg": s.max_rotation_deg,
                "max_shift_mm": s.max_shift_mm,
                "ct_spacing_factor": list(CT_SPACING_FACTOR),
                "interpolator": "linear (CT), nearest (bone labels)",
            },
        ),
        "synthesize": (
            "SyntheticCTLib.synthesis.inference.synthesize",
            {
                "model": f"{s.package.name} {s.package.version}",
                "device": s.device,
                "working_spacing_mm": list(s.package.spacing_mm),
                "patch_size": list(s.package.patch_size),
                "overlap": s.package.overlap,
                "uncertainty": "spread over 2 passes (identity, all axes flipped)" if s.uncertainty else None,
            },
        ),
        "register": (
            "SyntheticCTLib.registration.registration.register",
            {"fixed": "moved CT", "moving": "sCT", "mode": "rigid", "metric": "auto"},
        ),
        "compare": (
            "SyntheticCTLib.comparison.compare.compare",
            {
                "reference": "moved CT",
                "synthetic": "sCT",
                "transform": "registration",
                "bone_labels": "phantom bone labels, moved",
                "uncertainty": "uncertainty.nii.gz" if s.uncertainty else None,
            },
        ),
        "baselines": (
            "SyntheticCTLib.synthesis.baselines",
            {"transform": "the model's registration (synthesis compared alone)", "run": s.run_baselines},
        ),
        "report": (
            "SyntheticCTLib.apps.report.write_demo_report",
            {"hu_window": list(HU_WINDOW), "difference_window_hu": DIFFERENCE_WINDOW_HU, "pictures": "embedded"},
        ),
    }
    component, parameters = records[name]
    return {"component": component, "version": __version__, "parameters": parameters}


# -- the steps ------------------------------------------------------------------------------------------


def _make_case(s: _Settings, progress: ProgressCallback):
    """1. phantom: generate the case and write it to ``case/``."""
    from SyntheticCTLib import phantom

    case = phantom.make_phantom(s.seed, size=s.size, spacing=s.spacing, progress=_scaled(progress, 0.0, 0.8, ""))
    progress(0.8, "", "writing the case")
    phantom.write_phantom(case, s.work / "case")
    return case


def _move_ct(s: _Settings, case: Any, progress: ProgressCallback) -> Tuple[sitk.Transform, sitk.Image, sitk.Image]:
    """2. move CT: the recorded random rigid move, the moved CT and bone labels on the CT's own grid."""

    centre = grid_centre(case.ct)
    true = random_rigid_transform(s.seed, centre, max_rotation_deg=s.max_rotation_deg, max_shift_mm=s.max_shift_mm)
    grid = moved_ct_grid(case.ct, true)
    ct = resample_like(case.ct, grid, transform=true, interpolator=sitk.sitkLinear, default_value=CT_MIN_HU)
    progress(0.4, "", "resampled the CT")
    bones = resample_like(case.bone_labels, grid, transform=true, interpolator=sitk.sitkNearestNeighbor)
    write_volume(ct, s.work / "ct_moved.nii.gz")
    write_volume(bones, s.work / "bone_labels_moved.nii.gz")
    registration_lib.write_transform(true, s.work / "transform_true.tfm")
    return true, ct, bones


def _synthesize(s: _Settings, case: Any, progress: ProgressCallback) -> Tuple[sitk.Image, Optional[sitk.Image]]:
    """3. synthesize: the sCT from the phantom's MRI echoes with the model package, and its spread (or None)."""
    from SyntheticCTLib.synthesis import inference

    result = inference.Synthesizer(s.package, device=s.device).run(list(case.mri), progress=progress, tta=s.uncertainty)
    write_volume(result.image, s.work / "sct.nii.gz")
    if result.uncertainty is not None:
        write_volume(result.uncertainty, s.work / "uncertainty.nii.gz")
    return result.image, result.uncertainty


def _register(
    s: _Settings,
    ct_moved: sitk.Image,
    sct: sitk.Image,
    bones_moved: sitk.Image,
    true_transform: sitk.Transform,
    progress: ProgressCallback,
) -> Tuple[Any, Dict[str, Any]]:
    """4. register: the sCT to the moved CT (rigid), and the TRE over the moved CT's bone voxels."""

    result = registration_lib.register(ct_moved, sct, mode="rigid", metric="auto", progress=progress)
    registration_lib.write_transform(result.transform, s.work / "transform_registration.tfm")
    progress(0.9, "", "target registration error")
    bone_mask = sitk.Cast(bones_moved > 0, sitk.sitkUInt8)
    tre = bone_tre(result.transform, true_transform, bone_mask)
    return result, tre


def _compare(
    s: _Settings,
    ct_moved: sitk.Image,
    sct: sitk.Image,
    bones_moved: sitk.Image,
    transform: sitk.Transform,
    progress: ProgressCallback,
    *,
    spread: Optional[sitk.Image] = None,
) -> Tuple[Any, Any]:
    """5. compare: bone surfaces and image metrics of the sCT against the moved CT, written to ``comparison/``;
    with the sCT's spread on its bone surface and its uncertainty quality when there is one."""
    from SyntheticCTLib.comparison import compare as compare_lib

    result = compare_lib.compare(
        ct_moved,
        sct,
        transform=transform,
        bone_labels=bones_moved,
        spread=spread,
        progress=_scaled(progress, 0.0, 0.8, ""),
    )
    files = compare_lib.write_comparison(result, s.work / "comparison", progress=_scaled(progress, 0.8, 1.0, ""))
    return result, files


def _compare_baselines(
    s: _Settings,
    case: Any,
    ct_moved: sitk.Image,
    bones_moved: sitk.Image,
    transform: sitk.Transform,
    progress: ProgressCallback,
) -> Dict[str, Any]:
    """6. baselines: each non-learning baseline through the same comparison (none unless ``run_baselines``)."""
    from SyntheticCTLib.comparison import compare as compare_lib

    results: Dict[str, Any] = {}
    pairs = _baselines() if s.run_baselines else []
    for i, (name, func) in enumerate(pairs):
        image = func(list(case.mri))
        sub = _scaled(progress, i / len(pairs), (i + 1) / len(pairs), name)
        results[name] = compare_lib.compare(ct_moved, image, transform=transform, bone_labels=bones_moved, progress=sub)
    return results


def _metrics_document(
    s: _Settings,
    case: Any,
    ct_moved: sitk.Image,
    true_transform: sitk.Transform,
    registration: Any,
    tre: Dict[str, Any],
    model_metrics: Dict[str, Any],
    baseline_results: Dict[str, Any],
) -> Dict[str, Any]:
    """The content of ``metrics.json`` (the steps and total time are added as they complete)."""
    centre = true_transform.GetCenter()
    true_params = rigid_parameters(true_transform, centre)
    recovered_params = rigid_parameters(registration.transform, centre)
    difference = transform_difference(registration.transform, true_transform, centre)
    return {
        "disclaimer": NOT_FOR_DIAGNOSTIC_USE,
        "syntheticct_version": __version__,
        "seed": s.seed,
        "case": {
            "phantom_size": list(s.size),
            "phantom_spacing_mm": s.spacing,
            "ct_size": list(ct_moved.GetSize()),
            "ct_spacing_mm": list(ct_moved.GetSpacing()),
            "echo_times_ms": case.params.get("echo_times_ms"),
            "parameters": case.params,
        },
        "model": _model_summary(s.package),
        "true_transform": {
            "type": "Euler3D",
            "convention": "maps points of the moved CT (fixed) to the phantom/MRI space (moving), ITK resampling",
            **{k: v for k, v in true_params.items() if k != "matrix"},
            "file": "transform_true.tfm",
        },
        "registration": {
            **json_safe(registration.to_dict()),
            "recovered": {k: v for k, v in recovered_params.items() if k != "matrix"},
            **difference,
            "tre_bone": tre,
            "file": "transform_registration.tfm",
        },
        "metrics": json_safe(model_metrics),
        "baselines": {name: json_safe(r.metrics.to_dict()) for name, r in baseline_results.items()},
        "versions": _library_versions(),
    }


def _record_steps(metrics: Dict[str, Any], steps: _Steps) -> None:
    """Put the steps done so far and their total time into ``metrics``."""
    metrics["steps"] = [r.to_dict() for r in steps.records]
    metrics["total_seconds"] = round(sum(r.seconds for r in steps.records), 3)


def _write_report(
    s: _Settings,
    metrics: Dict[str, Any],
    case: Any,
    ct_moved: sitk.Image,
    comparison: Any,
    transform: sitk.Transform,
    comparison_files: Any,
    progress: ProgressCallback,
) -> None:
    """7. report: the self-contained ``report.html``, its pictures in ``images/``."""

    report_lib.write_demo_report(
        s.work / REPORT_FILE,
        metrics,
        mri=case.mri[0],
        ct=ct_moved,
        synthetic_on_ct=comparison.synthetic,
        transform=transform,
        comparison_files=comparison_files,
        model_card=s.package.card,
        images_dir=s.work / "images",
        progress=progress,
    )


def _scaled(progress: ProgressCallback, start: float, stop: float, label: str) -> ProgressCallback:
    def _report(fraction: float, stage: str = "", message: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        progress(start + (stop - start) * fraction, label, ": ".join(t for t in (stage, message) if t))

    return _report


def _model_summary(package: Any) -> Dict[str, Any]:
    card = package.card
    return {
        "name": package.name,
        "version": package.version,
        "source": str(getattr(package, "source", "")),
        "description": card.get("description", ""),
        "intended_use": card.get("intended_use", ""),
        "training_data": card.get("training_data", {}),
        "validation_metrics": card.get("validation_metrics", {}),
    }


__all__ = [
    "DEFAULT_SEED",
    "DEFAULT_SIZE",
    "DEFAULT_SPACING_MM",
    "STEPS",
    "DemoResult",
    "StepRecord",
    "grid_centre",
    "moved_ct_grid",
    "random_rigid_transform",
    "rigid_parameters",
    "run_demo",
    "bone_tre",
    "transform_difference",
]
