"""The grade of a registration: "good", "doubtful" or "failed", with the reasons and the measures behind it.

A registration can end in a wrong optimum (a scan turned over, a symmetric body) and still report a good
metric value and a converged optimizer. The grade looks at what a wrong transform cannot hide:

- **Rival poses.** The final transform's score (the metric on the coarsest level, weighted by overlap)
  beside the best refined start turned by more than :data:`.initialization.RIVAL_MIN_ANGLE_DEG` from it
  (the right-angle poses of the pose search, or, without it, the best right-angle poses refined for the grade). A winner that beats a turned-over pose by less than
  :data:`POSE_MARGIN_DOUBTFUL` is doubtful; one that loses to it, failed.
- **Overlap after alignment.** The Dice coefficient of the two body masks and, for two CT-like images,
  of the two bone masks (> :data:`BONE_HU` HU), on a common grid over the fixed image, where the moving
  image's field of view reaches.
- **Inverse consistency** (optional): registering the other way from the inverse and composing must give
  back every point of the fixed body; the mean residual is in mm.
- **Convergence**: the optimizer of the finest level stopped on its step criterion, not on its limit.
- **Similarity**: for the correlation metric, a final value above :data:`POOR_CORRELATION` means that
  the images hardly agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.geometry import transform_points
from SyntheticCTLib.kernel.hu import BONE_THRESHOLD_HU
from SyntheticCTLib.registration.modality import foreground_threshold

logger = logging.getLogger(__name__)

VERDICTS = ("good", "doubtful", "failed")

BONE_HU = BONE_THRESHOLD_HU
GRID_VOXELS = 1_000_000
"""The overlap masks are compared on a grid over the fixed image of at most about this many voxels."""
BODY_DICE_DOUBTFUL, BODY_DICE_FAILED = 0.85, 0.6
BONE_DICE_DOUBTFUL, BONE_DICE_FAILED = 0.6, 0.3
MIN_REGION_FRACTION = 0.1
"""Below this fraction of the fixed grid inside the moving field of view, the overlaps are not measured."""
POSE_MARGIN_DOUBTFUL = 0.05
INVERSE_DOUBTFUL_MM, INVERSE_FAILED_MM = 1.0, 5.0
POOR_CORRELATION = -0.25  # correlation metric = -NCC^2: above this, the images hardly agree


@dataclass
class Quality:
    """A registration's grade: ``verdict`` (one of :data:`VERDICTS`), ``reasons`` (plain sentences) and
    ``measures`` (numbers, None when not measured)."""

    verdict: str
    reasons: List[str] = field(default_factory=list)
    measures: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "reasons": list(self.reasons), **self.measures}


def overlap_grid(fixed: sitk.Image, max_voxels: int = GRID_VOXELS) -> sitk.Image:
    """An empty grid over ``fixed``'s field of view with at most about ``max_voxels`` voxels (never finer)."""
    size = np.asarray(fixed.GetSize(), dtype=float)
    factor = max(1.0, (float(np.prod(size)) / max_voxels) ** (1.0 / 3.0))
    new_size = [max(2, int(round(n / factor))) for n in size]
    spacing = [s * n / m for s, n, m in zip(fixed.GetSpacing(), size, new_size)]
    grid = sitk.Image(new_size, sitk.sitkUInt8)
    grid.SetDirection(fixed.GetDirection())
    grid.SetSpacing(spacing)
    # The same field of view: the first voxel's edge stays where fixed's first voxel edge is.
    first_edge = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint((-0.5, -0.5, -0.5)))
    direction = np.asarray(fixed.GetDirection()).reshape(3, 3)
    grid.SetOrigin(tuple(first_edge + direction @ (0.5 * np.asarray(spacing))))
    return grid


def _on_grid(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform, outside: float) -> np.ndarray:
    resampled = sitk.Resample(image, grid, transform, sitk.sitkLinear, float(outside), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def _dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def overlaps(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    *,
    fixed_modality: str,
    moving_modality: str,
    max_voxels: int = GRID_VOXELS,
) -> Dict[str, Optional[float]]:
    """Body Dice and (two CT-like images) bone Dice after alignment, where the moving field of view reaches.

    Both images are sampled (linear) on one grid over ``fixed`` (:func:`overlap_grid`), the moving one
    through ``transform``; the body is above :func:`.modality.foreground_threshold`, the bone above
    :data:`BONE_HU`. Returns ``body_dice``, ``bone_dice`` (None when not CT/CT or no bone) and
    ``fov_fraction`` (the share of the grid inside the moving field of view).
    """
    grid = overlap_grid(fixed, max_voxels)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    fixed_values = _on_grid(fixed, grid, identity, -1e9)
    moving_values = _on_grid(moving, grid, transform, np.nan)
    region = np.isfinite(moving_values)
    out: Dict[str, Optional[float]] = {
        "fov_fraction": round(float(region.mean()), 4),
        "body_dice": None,
        "bone_dice": None,
    }
    if region.mean() < MIN_REGION_FRACTION:
        return out
    f, m = fixed_values[region], moving_values[region]
    body = _dice(f > foreground_threshold(fixed, fixed_modality), m > foreground_threshold(moving, moving_modality))
    out["body_dice"] = None if body is None else round(body, 4)
    if fixed_modality == "ct" and moving_modality == "ct":
        bone = _dice(f > BONE_HU, m > BONE_HU)
        out["bone_dice"] = None if bone is None else round(bone, 4)
    return out


def inverse_residual(forward: sitk.Transform, backward: sitk.Transform, points: np.ndarray) -> Tuple[float, float]:
    """(mean, max) distance in mm between each fixed point and ``backward(forward(point))``."""
    back = transform_points(backward, transform_points(forward, points))
    d = np.linalg.norm(back - np.asarray(points, dtype=float), axis=1)
    return float(d.mean()), float(d.max())


def pose_margin(final_score: Optional[float], rival_scores: Sequence[float]) -> Optional[float]:
    """How much better the final score is than the best rival's, as a fraction (lower scores are better).

    Positive: the final transform wins; near 0: a turned pose fits almost as well; negative: it loses.
    """
    if final_score is None or not rival_scores:
        return None
    rival = min(rival_scores)
    scale = max(abs(final_score), abs(rival), 1e-12)
    return float((rival - final_score) / scale)


def grade(measures: Dict[str, object], *, converged: bool, metric: str, metric_value: float) -> Quality:
    """The verdict and its reasons from ``measures`` (``body_dice``, ``bone_dice``, ``pose_margin``,
    ``rival_rotation_deg``, ``inverse_residual_mm``; None or absent: not measured)."""
    failed: List[str] = []
    doubtful: List[str] = []
    body, bone = measures.get("body_dice"), measures.get("bone_dice")
    margin, residual = measures.get("pose_margin"), measures.get("inverse_residual_mm")
    if body is not None:
        if body < BODY_DICE_FAILED:
            failed.append(f"the two bodies overlap poorly after alignment (Dice {body:.2f})")
        elif body < BODY_DICE_DOUBTFUL:
            doubtful.append(f"the two bodies overlap only in part after alignment (Dice {body:.2f})")
    if bone is not None:
        if bone < BONE_DICE_FAILED:
            failed.append(f"the two bones hardly overlap after alignment (Dice {bone:.2f})")
        elif bone < BONE_DICE_DOUBTFUL:
            doubtful.append(f"the two bones overlap only in part after alignment (Dice {bone:.2f})")
    if margin is not None:
        angle = measures.get("rival_rotation_deg")
        turned = f"a pose turned by {angle:.0f} deg" if angle is not None else "a turned pose"
        if margin < 0:
            failed.append(f"{turned} fits better than the result ({100 * margin:.0f} %)")
        elif margin < POSE_MARGIN_DOUBTFUL:
            doubtful.append(f"{turned} fits almost as well (the result is only {100 * margin:.1f} % better)")
    if residual is not None:
        if residual > INVERSE_FAILED_MM:
            failed.append(f"registering the other way does not come back ({residual:.1f} mm apart)")
        elif residual > INVERSE_DOUBTFUL_MM:
            doubtful.append(f"registering the other way comes back {residual:.1f} mm apart")
    if not converged:
        doubtful.append("the optimizer stopped at its iteration limit, before it converged")
    if metric == "correlation" and metric_value > POOR_CORRELATION:
        doubtful.append(f"the images hardly agree (correlation metric {metric_value:.3f}; -1 is a perfect match)")
    verdict = "failed" if failed else "doubtful" if doubtful else "good"
    return Quality(verdict, failed + doubtful, dict(measures))
