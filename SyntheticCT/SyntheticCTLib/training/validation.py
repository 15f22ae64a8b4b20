"""Validation scoring: how good a synthetic CT is against its CT, for model selection and evaluation.

:func:`score` is the one scoring of a synthetic CT: :func:`SyntheticCTLib.comparison.compare.compare`
(image metrics in the body, bone Dice, bone-surface distances). When the synthetic CT (or the CT)
holds no bone at all, compare raises :class:`~SyntheticCTLib.kernel.errors.NoBoneError`; the score
then keeps compare's image metrics (:func:`~SyntheticCTLib.comparison.compare.image_comparison`,
the same resampling and body) with a bone Dice of 0 and no surface distances, so a model that finds
no bone scores as such and the run goes on.

:func:`validate` scores the current weights of a training on whole validation volumes with the
product's inference; :func:`selection_score` ranks the epochs. Training uses this module; the
evaluation application (:mod:`SyntheticCTLib.apps.evaluation`) uses :func:`score` too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.comparison.compare import DEFAULT_BONE_THRESHOLD_HU, compare, image_comparison
from SyntheticCTLib.comparison.metric_registry import GOALS, VALIDATION_KEYS, ComparisonMetrics, goal_ratio
from SyntheticCTLib.kernel.errors import NoBoneError
from SyntheticCTLib.kernel.progress import ProgressCallback
from SyntheticCTLib.models.package import load_model_package  # torch: only when validating
from SyntheticCTLib.synthesis.inference import synthesize
from SyntheticCTLib.training.export import build_card, export_package

logger = logging.getLogger(__name__)

__all__ = ["VALIDATION_KEYS", "score", "selection_score", "validate"]


def score(
    ct: sitk.Image,
    sct: sitk.Image,
    *,
    transform: Optional[sitk.Transform] = None,
    bone_threshold: float = DEFAULT_BONE_THRESHOLD_HU,
    bone_labels: Optional[sitk.Image] = None,
    progress: Optional[ProgressCallback] = None,
) -> ComparisonMetrics:
    """The comparison metrics of ``sct`` against ``ct`` (``transform``: CT points -> sCT points).

    Without bone in one of them: compare's image metrics, bone Dice 0 and no surface distance (None).
    """
    try:
        return compare(
            ct, sct, transform=transform, bone_threshold=bone_threshold, bone_labels=bone_labels, progress=progress
        ).metrics
    except NoBoneError as e:
        logger.warning("Bone metrics not measurable (%s): bone Dice 0, no surface distances.", e)
        images = image_comparison(ct, sct, transform=transform)
        return ComparisonMetrics(**images.metrics, bone_dice=0.0, body_overlap_fraction=images.overlap)


def selection_score(metrics: Mapping[str, float], select_by: str = "surface_p95") -> float:
    """Lower is better; NaN ranks last. ``surface_p95``: the validation bone-surface p95 (mm), ties broken by
    MAE. ``goals``: the worst ratio of a metric to its release goal
    (:data:`~SyntheticCTLib.comparison.metric_registry.GOALS`; surface mean, p95, Dice, MAE), ties broken by p95,
    so that an epoch whose surface mean suffers from a few far-off false bone islands is not kept for its p95."""
    p95 = metrics.get("surface_p95_mm", math.nan)
    mae = metrics.get("mae_hu", math.nan)
    if not math.isfinite(p95):
        return math.inf
    if select_by == "goals":
        return max(goal_ratio(k, metrics.get(k, math.nan)) for k in GOALS) + 1e-6 * p95
    return p95 + 1e-6 * (mae if math.isfinite(mae) else 1e6)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def validate(
    network,
    config,
    train_cases: Sequence[Any],
    validation_cases: Sequence[Any],
    work_dir: Path,
    manifests: Sequence[dict],
    device,
) -> Dict[str, Any]:
    """Score the current weights on whole validation volumes with the product's inference and :func:`score`.

    The weights are written as a model package in ``work_dir`` (as :mod:`.export` writes the final one),
    loaded with :func:`~SyntheticCTLib.models.package.load_model_package`, run by
    :func:`~SyntheticCTLib.synthesis.inference.synthesize`, and scored against each case's CT on the
    working grid. Returns ``{"mean": {key: float}, "cases": [{key: float, "case": name}]}`` over
    :data:`VALIDATION_KEYS` (NaN where not measurable; the mean ignores NaN).
    """

    card = build_card(config, train_cases, manifests=manifests)
    if config.validation.overlap is not None:
        card["overlap"] = float(config.validation.overlap)
    state = {k: v.detach().to("cpu") for k, v in network.state_dict().items()}
    package = load_model_package(export_package(work_dir, card, state))
    per_case = []
    for case in validation_cases:
        sct = synthesize(case.mri, package, device=str(device))
        metrics: Dict[str, Any] = score(case.ct, sct, bone_threshold=config.validation.bone_threshold_hu).scalars(
            VALIDATION_KEYS
        )
        metrics["case"] = case.name
        per_case.append(metrics)
        logger.info(
            "  validation %s: MAE %.1f HU, Dice %.3f, surface mean %.3f / p95 %.3f mm",
            case.name,
            metrics["mae_hu"],
            metrics["bone_dice"],
            metrics["surface_mean_mm"],
            metrics["surface_p95_mm"],
        )
    mean = {k: _nanmean([m[k] for m in per_case]) for k in VALIDATION_KEYS}
    return {"mean": mean, "cases": per_case}
