"""Evaluation of a model on cases with a CT, beside two non-learning baselines (``syntheticct evaluate``).

For each case the model synthesizes a CT from the MRI (:func:`SyntheticCTLib.synthesis.inference.synthesize`);
the baselines (:mod:`SyntheticCTLib.synthesis.baselines`) make theirs from the same MRI; each is compared with
the case's CT by :func:`SyntheticCTLib.comparison.compare.compare`: MAE, ME, PSNR and SSIM inside the
body (SynthRAD conventions), bone Dice and bone-surface distances. When the CT is not aligned with
the MRI, ``align`` registers the MRI to the CT first (rigid, optionally affine) and every method is
compared through that one transform.

Outputs in ``out_dir``:

- ``metrics.json``: the model, per-case metrics of every method and the input check's warnings about the
  case (``input_warnings``: the model's input check, :func:`SyntheticCTLib.synthesis.input_check.review_inputs`,
  echo times and field strength included), and a summary per method (mean, standard deviation, median, min,
  max over the cases);
- ``metrics.csv`` (one row per case and method) and ``summary.csv`` (one row per method and metric);
- ``images/<case>.png``: orthogonal slices of the MRI, sCT, CT and sCT - CT;
- ``index.html``: the summary table and box plots (:func:`SyntheticCTLib.apps.report.write_index`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE, __version__
from SyntheticCTLib.apps.report import slices_png
from SyntheticCTLib.comparison.compare import compare
from SyntheticCTLib.comparison.metric_registry import EVALUATION_KEYS, GOALS, goal_check
from SyntheticCTLib.kernel.acquisition import Acquisition, acquisition_for_files
from SyntheticCTLib.kernel.errors import InvalidParameterError, NoBoneError, SyntheticCTError
from SyntheticCTLib.kernel.geometry import resample_like
from SyntheticCTLib.kernel.hu import AIR_HU, BONE_THRESHOLD_HU
from SyntheticCTLib.kernel.io import atomic_output, read_volume
from SyntheticCTLib.kernel.jsonio import json_safe
from SyntheticCTLib.kernel.progress import CancelToken, ProgressCallback, no_progress, scaled, with_cancel
from SyntheticCTLib.models.catalog import resolve_model
from SyntheticCTLib.models.package import MODEL_CARD, ModelPackage, read_card
from SyntheticCTLib.registration.registration import register
from SyntheticCTLib.synthesis.baselines import BASELINES
from SyntheticCTLib.synthesis.inference import synthesize, synthesize_with_uncertainty
from SyntheticCTLib.synthesis.input_check import review_inputs
from SyntheticCTLib.training.config import ConfigError
from SyntheticCTLib.training.data import case_acquisition, read_case_manifest, read_mri_channels
from SyntheticCTLib.training.validation import score

logger = logging.getLogger(__name__)

MODEL_METHOD = "model"
METRIC_KEYS = EVALUATION_KEYS
ALIGN_MODES = ("none", "rigid", "affine")


@dataclass
class EvaluationCase:
    """A case to evaluate: MRI channel files and the CT of the same patient (and the MRI's echo times and
    field strength, where known; None: read from the files' JSON sidecars or a ``case.json`` beside them)."""

    name: str
    mri: List[Path]
    ct: Path
    bone_labels: Optional[Path] = None
    group: str = ""
    """The case's group (a phantom set's group, else the folder above the case when cases are nested)."""
    expect: str = "served"
    """``served`` (held to the goals) or ``warning`` (the model's input check must warn; reported apart)."""
    acquisition: Optional[Acquisition] = None


@dataclass
class EvaluationResult:
    """Per-case metrics ``{case: {method: {metric: value}}}`` and the summary ``{method: {metric: stats}}``."""

    out_dir: Path
    cases: Dict[str, Dict[str, Dict[str, float]]]
    summary: Dict[str, Dict[str, Dict[str, float]]]
    files: Dict[str, Path] = field(default_factory=dict)
    groups: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Per group (:func:`summarize_groups`): cases, expectation, summary and the model's goals."""
    worst_group: Optional[str] = None
    """The served group farthest from a goal."""
    uncertainty: Dict[str, Dict[str, float]] = field(default_factory=dict)
    """With ``uncertainty=True``: per case, how well the model's spread map predicts its error."""
    input_warnings: Dict[str, List[str]] = field(default_factory=dict)
    """Per case, the input check's warnings about the model's inputs (empty: nothing stood out)."""


def find_evaluation_cases(paths: Sequence[Union[str, Path]]) -> List[EvaluationCase]:
    """Cases from ``case.json`` files, folders holding one, or folders of such folders (at any depth).

    A case's group is the ``group`` its ``case.json`` names (a phantom set's cases,
    :mod:`SyntheticCTLib.phantom.sets`), else the name of the folder above it when it lies deeper than one
    level under the folder given.

    A phantom's ``case.json`` works as it is; for one's own data, ``{"mri": ["echo1.nii.gz", ...], "ct":
    "ct.nii.gz"}`` beside the files is enough (see :func:`SyntheticCTLib.training.data.read_case_manifest`).

    Raises
    ------
    InvalidParameterError
        A path is missing or holds no case; two cases share a name.
    """

    cases: List[EvaluationCase] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InvalidParameterError(f"No case at '{path}' (a case.json, a folder with one, or a folder of cases).")
        if path.is_file() or (path / "case.json").is_file():
            targets = [path]
        else:
            targets = sorted(m.parent for m in path.rglob("case.json"))
            if not targets:
                raise InvalidParameterError(f"'{path}' holds no case: no case.json in it or in its sub-folders.")
        for target in targets:
            try:
                spec = read_case_manifest(target)
            except ConfigError as e:
                raise InvalidParameterError(str(e)) from e
            nested = target != path and target.parent != path
            group = str(spec.manifest.get("group") or (target.parent.name if nested else ""))
            cases.append(
                EvaluationCase(
                    name=spec.name,
                    mri=spec.mri,
                    ct=spec.ct,
                    bone_labels=spec.bone_labels,
                    group=group,
                    expect=str(spec.manifest.get("expect") or "served"),
                    acquisition=case_acquisition(spec),
                )
            )
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidParameterError(f"Several cases are named {duplicates}; case folder names must be unique.")
    return cases


def summarize(cases: Dict[str, Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Mean, standard deviation (population), median, min, max and count of each metric per method."""
    methods: List[str] = []
    for per_method in cases.values():
        for m in per_method:
            if m not in methods:
                methods.append(m)
    summary: Dict[str, Dict[str, Dict[str, float]]] = {}
    for method in methods:
        summary[method] = {}
        for key in METRIC_KEYS:
            values = np.array([c[method][key] for c in cases.values() if method in c and key in c[method]], float)
            values = values[np.isfinite(values)]
            if values.size == 0:
                summary[method][key] = {
                    "mean": math.nan,
                    "std": math.nan,
                    "median": math.nan,
                    "min": math.nan,
                    "max": math.nan,
                    "n": 0,
                }
                continue
            summary[method][key] = {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "median": float(np.median(values)),
                "min": float(values.min()),
                "max": float(values.max()),
                "n": int(values.size),
            }
    return summary


def summarize_groups(
    cases: Sequence[EvaluationCase],
    per_case: Dict[str, Dict[str, Dict[str, float]]],
    input_warnings: Optional[Dict[str, List[str]]] = None,
) -> Tuple[Dict[str, Dict[str, Any]], Optional[str]]:
    """Per group: its cases, what is expected of it, the summary of every method and the model's goals, and
    how many of its cases the input check warned about (``warned``; ``expectation_met``: a served group none,
    a ``warning`` group all).

    Returns the groups and the worst served group: the one whose model mean is farthest from a goal
    (largest :func:`goal_check` ratio), None without groups.
    """
    groups: Dict[str, Dict[str, Any]] = {}
    for case in cases:
        if not case.group:
            continue
        entry = groups.setdefault(case.group, {"expect": case.expect, "cases": []})
        entry["cases"].append(case.name)
    worst, worst_ratio = None, -math.inf
    for name, entry in groups.items():
        entry["summary"] = summarize({c: per_case[c] for c in entry["cases"]})
        goals = goal_check(entry["summary"].get(MODEL_METHOD, {}))
        entry["goals"] = goals
        entry["all_goals_met"] = all(g["met"] for g in goals.values())
        entry["warned"] = sum(bool((input_warnings or {}).get(c)) for c in entry["cases"])
        wanted = len(entry["cases"]) if entry["expect"] == "warning" else 0
        entry["expectation_met"] = entry["warned"] == wanted
        ratio = max((g["ratio"] for g in goals.values()), default=-math.inf)
        if entry["expect"] == "served" and ratio > worst_ratio:
            worst, worst_ratio = name, ratio
    return groups, worst


def compare_images(
    ct: sitk.Image,
    sct: sitk.Image,
    *,
    transform: Optional[sitk.Transform] = None,
    bone_threshold: float = BONE_THRESHOLD_HU,
    bone_labels: Optional[sitk.Image] = None,
    progress: Optional[ProgressCallback] = None,
) -> Dict[str, float]:
    """The evaluation metrics (:data:`METRIC_KEYS`) of one sCT against its CT (``transform``: CT points -> sCT points).

    :func:`SyntheticCTLib.training.validation.score` does the work, through
    :func:`SyntheticCTLib.comparison.compare.compare`. When the sCT (or the CT) holds no bone at all, the
    bone metrics cannot be measured: compare's image metrics are still returned, with a bone Dice of 0 and
    NaN surface distances (a model that finds no bone scores as such, and the run goes on).
    """
    metrics = score(
        ct, sct, transform=transform, bone_threshold=bone_threshold, bone_labels=bone_labels, progress=progress
    )
    return metrics.scalars(METRIC_KEYS)


def _align(ct: sitk.Image, mri: sitk.Image, mode: str, progress: ProgressCallback) -> Optional[sitk.Transform]:
    """Register the MRI (moving) to the CT (fixed): the transform maps CT points to MRI (= sCT) points."""
    if mode == "none":
        return None

    rigid = register(ct, mri, mode="rigid", progress=scaled(progress, 0.0, 0.5))
    logger.info("Rigid MRI-to-CT registration: metric %.4f.", float(rigid.metric_value))
    if mode == "rigid":
        return rigid.transform
    moved = resample_like(mri, ct, transform=rigid.transform)
    affine = register(ct, moved, mode="affine", progress=scaled(progress, 0.5, 1.0))
    logger.info("Affine refinement: metric %.4f.", float(affine.metric_value))
    composite = sitk.CompositeTransform(rigid.transform)
    composite.AddTransform(affine.transform)
    return composite


def _write_csvs(
    out_dir: Path,
    cases: Dict[str, Dict[str, Dict[str, float]]],
    times: Dict[str, Dict[str, float]],
    summary: Dict[str, Dict[str, Dict[str, float]]],
) -> Dict[str, Path]:
    def fmt(v: Any) -> Any:
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.6g}"
        return v

    metrics_csv = out_dir / "metrics.csv"
    with atomic_output(metrics_csv) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["case", "method", *METRIC_KEYS, "time_s"])
            for name, per_method in cases.items():
                for method, metrics in per_method.items():
                    writer.writerow(
                        [
                            name,
                            method,
                            *(fmt(metrics[k]) for k in METRIC_KEYS),
                            fmt(times.get(name, {}).get(method, math.nan)),
                        ]
                    )
    summary_csv = out_dir / "summary.csv"
    with atomic_output(summary_csv) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "metric", "mean", "std", "median", "min", "max", "n"])
            for method, per_key in summary.items():
                for key, s in per_key.items():
                    writer.writerow(
                        [method, key, *(fmt(s[k]) for k in ("mean", "std", "median", "min", "max")), s["n"]]
                    )
    return {"metrics_csv": metrics_csv, "summary_csv": summary_csv}


def _case_png(
    path: Path, mri: sitk.Image, sct: sitk.Image, ct: sitk.Image, transform: Optional[sitk.Transform]
) -> None:

    mri_on_ct = resample_like(mri, ct, transform=transform, pixel_type=sitk.sitkFloat32)
    sct_on_ct = resample_like(sct, ct, transform=transform, default_value=AIR_HU, pixel_type=sitk.sitkFloat32)
    png = slices_png(mri_on_ct, sct_on_ct, sitk.Cast(ct, sitk.sitkFloat32))
    with atomic_output(path) as tmp:
        tmp.write_bytes(png)


def evaluate(
    model: Any,
    cases: Sequence[EvaluationCase],
    out_dir: Union[str, Path],
    *,
    baselines: bool = True,
    align: str = "none",
    bone_threshold: float = BONE_THRESHOLD_HU,
    use_bone_labels: bool = False,
    device: str = "auto",
    images: bool = True,
    save_sct: bool = False,
    uncertainty: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> EvaluationResult:
    """Run ``model`` (a :class:`~SyntheticCTLib.models.package.ModelPackage`, a name or a path) and the baselines on
    every case, compare each with the case's CT, and write the metrics, pictures and index to ``out_dir``.

    Parameters
    ----------
    align
        ``"none"`` (the CT lies on the MRI's patient coordinates), ``"rigid"`` or ``"affine"``: register the
        MRI to the CT first; the sCTs are compared through that transform.
    bone_threshold
        HU threshold of bone in the CT and every sCT (Dice and surfaces).
    use_bone_labels
        Pass the case's bone label map to the comparison (per-bone surface distances).
    save_sct
        Also write each sCT as ``sct/<case>_<method>.nii.gz``.
    uncertainty
        Also compute the model's spread map (flip test-time passes) and measure how well it predicts the
        sCT's real error (:func:`SyntheticCTLib.comparison.uncertainty.uncertainty_quality`); the sCT is the
        same as without.
    """

    if align not in ALIGN_MODES:
        raise InvalidParameterError(f"align must be one of {', '.join(ALIGN_MODES)} (got {align!r}).")
    if not cases:
        raise InvalidParameterError("No case to evaluate.")
    report = with_cancel(progress or no_progress, cancel)
    package = _resolve_model(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [MODEL_METHOD] + (list(BASELINES) if baselines else [])
    settings = _CaseSettings(
        package, methods, align, bone_threshold, use_bone_labels, device, images, save_sct, out_dir, cancel, uncertainty
    )
    per_case: Dict[str, Dict[str, Dict[str, float]]] = {}
    times: Dict[str, Dict[str, float]] = {}
    spread_quality: Dict[str, Dict[str, float]] = {}
    warnings: Dict[str, List[str]] = {}
    files: Dict[str, Path] = {}
    n = len(cases)
    for i, case in enumerate(cases):
        sub = scaled(report, i / n, (i + 1) / n)
        sub(0.0, "evaluate", f"case {i + 1}/{n}: {case.name}")
        per_case[case.name], times[case.name], warnings[case.name], picture, quality = _evaluate_case(
            case, settings, sub
        )
        if quality is not None:
            spread_quality[case.name] = quality
        if picture is not None:
            files[f"image:{case.name}"] = picture
    summary = summarize(per_case)
    groups, worst = summarize_groups(cases, per_case, warnings)
    result = EvaluationResult(
        out_dir=out_dir,
        cases=per_case,
        summary=summary,
        groups=groups,
        worst_group=worst,
        uncertainty=spread_quality,
        input_warnings=warnings,
    )
    result.files = {**files, **_write_outputs(result, package, cases, methods, align, bone_threshold, times)}
    report(1.0, "evaluate", "done")
    return result


@dataclass(frozen=True)
class _CaseSettings:
    """What every case of one evaluation shares."""

    package: Any
    methods: List[str]
    align: str
    bone_threshold: float
    use_bone_labels: bool
    device: str
    images: bool
    save_sct: bool
    out_dir: Path
    cancel: Optional[CancelToken]
    uncertainty: bool = False


def _evaluate_case(case: EvaluationCase, settings: _CaseSettings, report: ProgressCallback):
    """Synthesize and score every method on one case; return its metrics, times, input warnings, picture (or
    None) and, with ``settings.uncertainty``, the quality of the model's spread map (else None)."""

    package = settings.package
    mri = read_mri_channels(case.mri)
    ct = read_volume(case.ct)
    labels = read_volume(case.bone_labels) if (settings.use_bone_labels and case.bone_labels) else None
    if len(mri) != package.in_channels:
        raise InvalidParameterError(
            f"Case '{case.name}' has {len(mri)} MRI channel(s); the model "
            f"'{package.name}' needs {package.in_channels} ({', '.join(package.input_names)})."
        )
    acquisition = case.acquisition if case.acquisition is not None else acquisition_for_files(case.mri)
    input_warnings = review_inputs(mri, package.card, progress=report, source=case.name, acquisition=acquisition)
    transform = _align(ct, mri[0], settings.align, scaled(report, 0.0, 0.1))
    metrics_of: Dict[str, Dict[str, float]] = {}
    times: Dict[str, float] = {}
    model_sct = quality = None
    n = len(settings.methods)
    for j, method in enumerate(settings.methods):
        step = scaled(report, 0.1 + 0.9 * j / n, 0.1 + 0.9 * (j + 1) / n)
        step(0.0, "evaluate", f"{case.name}: {method}")
        t0 = time.perf_counter()
        spread = None
        if method == MODEL_METHOD:
            sct, spread = _synthesize(mri, settings, scaled(step, 0.0, 0.6))
            model_sct = sct
        else:
            sct = BASELINES[method](mri)
        times[method] = time.perf_counter() - t0
        kwargs = {"transform": transform, "bone_threshold": settings.bone_threshold, "bone_labels": labels}
        if spread is None:
            metrics = compare_images(ct, sct, progress=scaled(step, 0.6, 1.0), **kwargs)
        else:
            metrics, quality = _score_with_spread(ct, sct, spread, scaled(step, 0.6, 1.0), **kwargs)
        metrics_of[method] = metrics
        logger.info(
            "%s, %s: MAE %.1f HU, ME %.1f HU, bone Dice %.3f, surface mean %.3f mm, p95 %.3f mm (%.1f s)",
            case.name,
            method,
            metrics["mae_hu"],
            metrics["me_hu"],
            metrics["bone_dice"],
            metrics["surface_mean_mm"],
            metrics["surface_p95_mm"],
            times[method],
        )
        if settings.save_sct:
            from SyntheticCTLib.kernel.io import write_volume

            name = f"{case.name}_{method.replace(' ', '_')}.nii.gz"
            write_volume(sct, settings.out_dir / "sct" / name, inputs=[*case.mri, case.ct])
    picture = None
    if settings.images and model_sct is not None:
        picture = settings.out_dir / "images" / f"{case.name}.png"
        _case_png(picture, mri[0], model_sct, ct, transform)
    return metrics_of, times, input_warnings, picture, quality


def _synthesize(mri: List[sitk.Image], settings: _CaseSettings, progress: ProgressCallback):
    """The model's sCT and, with ``settings.uncertainty``, its spread map (else None)."""
    if not settings.uncertainty:
        return synthesize(
            mri, settings.package, device=settings.device, progress=progress, cancel=settings.cancel
        ), None
    return synthesize_with_uncertainty(
        mri, settings.package, device=settings.device, progress=progress, cancel=settings.cancel
    )


def _score_with_spread(ct: sitk.Image, sct: sitk.Image, spread: sitk.Image, progress: ProgressCallback, **kwargs):
    """The metrics of ``sct`` (as :func:`compare_images`) and how well ``spread`` predicts its error
    (:func:`~SyntheticCTLib.comparison.uncertainty.spread_quality`, through ``compare(spread=...)``; None when the
    bone metrics cannot be measured)."""
    try:
        result = compare(ct, sct, progress=progress, spread=spread, **kwargs)
    except NoBoneError:
        return compare_images(ct, sct, progress=progress, **kwargs), None
    quality = {k: (math.nan if v is None else v) for k, v in dict(result.metrics.uncertainty or {}).items()}
    logger.info("Spread against real error: %s", quality.get("reading", ""))
    return result.metrics.scalars(METRIC_KEYS), quality


def _write_outputs(
    result: EvaluationResult,
    package: Any,
    cases: Sequence[EvaluationCase],
    methods: List[str],
    align: str,
    bone_threshold: float,
    times: Dict[str, Dict[str, float]],
) -> Dict[str, Path]:
    """Write ``metrics.json``, the CSVs and ``index.html``; return their paths."""
    out_dir, per_case, summary = result.out_dir, result.cases, result.summary
    served = {c.name: per_case[c.name] for c in cases if c.expect == "served"}
    document = {
        "disclaimer": NOT_FOR_DIAGNOSTIC_USE,
        "syntheticct_version": __version__,
        "model": {"name": package.name, "version": package.version, "source": str(package.source)},
        "methods": methods,
        "align": align,
        "bone_threshold_hu": bone_threshold,
        "goals": {k: f"{d} {b:g}" for k, (d, b) in GOALS.items()},
        "cases": [
            {
                "name": c.name,
                "group": c.group,
                "expect": c.expect,
                "mri": [str(p) for p in c.mri],
                "ct": str(c.ct),
                "metrics": per_case[c.name],
                "uncertainty": result.uncertainty.get(c.name),
                "time_s": times[c.name],
                "input_warnings": list(result.input_warnings.get(c.name, [])),
            }
            for c in cases
        ],
        "summary": summary,
        "summary_served": summarize(served) if len(served) < len(per_case) else summary,
        "groups": result.groups,
        "worst_group": result.worst_group,
    }
    files: Dict[str, Path] = {}
    metrics_json = out_dir / "metrics.json"
    with atomic_output(metrics_json) as tmp:
        tmp.write_text(json.dumps(json_safe(document), indent=2) + "\n", encoding="utf-8")
    files["metrics_json"] = metrics_json
    files.update(_write_csvs(out_dir, per_case, times, summary))
    index_cases = [{"name": c.name, "report": None, "metrics": per_case[c.name]} for c in cases]
    try:
        from SyntheticCTLib.apps.report import write_index

        files["index"] = write_index(
            out_dir / "index.html",
            index_cases,
            title=f"SyntheticCT evaluation: {package.name}",
            model_card=package.card,
        )
    except (ImportError, SyntheticCTError, ValueError) as e:  # the index is a convenience; metrics are written
        logger.warning("Could not write index.html: %s", e)
    return files


def _resolve_model(model: Any):

    if isinstance(model, ModelPackage):
        return model

    path = Path(str(model))
    if path.exists():
        from SyntheticCTLib.models.package import load_model_package

        return load_model_package(path)
    return resolve_model(str(model))


def held_out_block(result: EvaluationResult, *, note: str = "") -> Dict[str, Any]:
    """A model-card block with the summary means of every method (for ``model.json``), and with groups, each
    group's means, its goals and the worst group; with a spread map, the mean of its quality figures."""

    def means(summary: Dict[str, Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, Optional[float]]]:
        return {
            method: {k: (None if not math.isfinite(s["mean"]) else round(s["mean"], 4)) for k, s in per_key.items()}
            for method, per_key in summary.items()
        }

    block: Dict[str, Any] = {"cases": sorted(result.cases), "note": note, "methods": means(result.summary)}
    if result.groups:
        block["groups"] = {
            name: {
                "expect": g["expect"],
                "cases": g["cases"],
                "methods": means(g["summary"]),
                "goals_met": {k: v["met"] for k, v in g["goals"].items()},
            }
            for name, g in result.groups.items()
        }
        block["worst_group"] = result.worst_group
    if result.uncertainty:
        keys = ("hu_spearman", "surface_auroc")
        block["uncertainty"] = {
            k: round(float(np.nanmean([q[k] for q in result.uncertainty.values()])), 4) for k in keys
        }
    return block


def record_in_card(
    model: Union[str, Path], result: EvaluationResult, *, label: str = "held-out", note: str = ""
) -> Path:
    """Write :func:`held_out_block` of ``result`` into ``model.json`` of the package folder ``model``.

    The block goes under ``held_out_evaluation[label]`` (other labels are kept). Only ``model.json``
    changes; the weights and their hashes do not. Raises :class:`InvalidParameterError` unless ``model``
    is a package folder.
    """

    folder = Path(str(model))
    if not (folder.is_dir() and (folder / MODEL_CARD).is_file()):
        raise InvalidParameterError(f"--record-in-card needs a model package folder with {MODEL_CARD}; got '{model}'.")
    if not label or not str(label).strip():
        raise InvalidParameterError("--record-in-card needs a non-empty LABEL for the evaluated cohort.")
    card = json.loads((folder / MODEL_CARD).read_text(encoding="utf-8"))
    block = held_out_block(
        result,
        note=note or "Mean over the cases (`syntheticct evaluate`); each method's sCT compared with the case's CT.",
    )
    evaluations = card.get("held_out_evaluation")
    if not isinstance(evaluations, dict):
        evaluations = {}
    evaluations[str(label)] = json_safe(block)
    card["held_out_evaluation"] = evaluations
    with atomic_output(folder / MODEL_CARD) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    read_card(folder)
    return folder / MODEL_CARD


__all__ = [
    "record_in_card",
    "EvaluationCase",
    "EvaluationResult",
    "evaluate",
    "find_evaluation_cases",
    "summarize",
    "compare_images",
    "held_out_block",
    "METRIC_KEYS",
    "MODEL_METHOD",
]
