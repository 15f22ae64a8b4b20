"""Does an uncertainty map mean something? Measure it against the real error of a synthetic CT.

Two figures, on a case whose CT is known:

- ``hu_spearman``: the rank correlation, over the reference body, of the spread with the absolute HU
  error ``|sCT - CT|`` (1: the spread orders the voxels exactly as the error does; 0: no relation).
- ``surface_auroc``: how well the spread at the synthetic bone-surface points separates the points more
  than ``off_mm`` from the reference bone surface from the rest: the area under the ROC curve (1: every
  far point has a higher spread than every near one; 0.5: chance).

Both take the comparison of the same sCT (:func:`SyntheticCTLib.comparison.compare.compare`), so the
error is measured exactly as the report measures it.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk
from scipy import stats

from SyntheticCTLib.comparison.compare import ComparisonResult
from SyntheticCTLib.comparison.surfaces import (
    DISTANCE_ARRAY,
    MEASURED_ARRAY,
    point_array,
    surface_points,
    values_at_points,
)
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.geometry import resample_like

SURFACE_OFF_MM = 1.0
"""A synthetic bone-surface point further than this from the reference surface counts as "off"."""


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive`` (ties count half).

    NaN when one class is empty. The Mann-Whitney form: the probability that a random positive scores
    above a random negative.
    """
    scores = np.asarray(scores, dtype=float).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def uncertainty_quality(
    comparison: ComparisonResult,
    spread: sitk.Image,
    *,
    transform: Optional[sitk.Transform] = None,
    off_mm: float = SURFACE_OFF_MM,
    max_voxels: int = 500_000,
) -> Dict[str, float]:
    """How well ``spread`` (on the synthetic CT's grid) predicts the errors that ``comparison`` measured.

    ``transform`` is the one the comparison used (reference points to synthetic points). Returns
    ``{"hu_spearman", "surface_auroc", "n_voxels", "n_surface_points", "n_surface_off", "off_mm"}``.
    """
    if off_mm <= 0:
        raise InvalidParameterError(f"off_mm must be positive (got {off_mm}).")
    reference = comparison.reference
    on_reference = resample_like(
        sitk.Cast(spread, sitk.sitkFloat32), reference, transform=transform, interpolator=sitk.sitkLinear
    )
    spread_array = sitk.GetArrayViewFromImage(on_reference)
    body = sitk.GetArrayViewFromImage(comparison.body_mask) > 0
    error = np.abs(
        sitk.GetArrayViewFromImage(comparison.synthetic).astype(np.float64)
        - sitk.GetArrayViewFromImage(reference).astype(np.float64)
    )
    values, errors = spread_array[body], error[body]
    step = max(1, values.size // max_voxels)
    rho = float(stats.spearmanr(values[::step], errors[::step]).statistic) if values.size > 2 else float("nan")

    surface = comparison.synthetic_surface
    points = surface_points(surface)
    measured = point_array(surface, MEASURED_ARRAY) > 0
    distance = np.abs(point_array(surface, DISTANCE_ARRAY))
    at_points = values_at_points(points[measured], on_reference)
    off = distance[measured] > off_mm
    return {
        "hu_spearman": rho,
        "surface_auroc": auroc(at_points, off),
        "n_voxels": int(values.size),
        "n_surface_points": int(measured.sum()),
        "n_surface_off": int(off.sum()),
        "off_mm": float(off_mm),
    }


__all__ = ["SURFACE_OFF_MM", "auroc", "uncertainty_quality"]
