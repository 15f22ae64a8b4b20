"""Does an uncertainty map mean something? Measure it against the real error of a synthetic CT.

Two figures, on a case whose CT is known:

- ``hu_spearman``: the rank correlation, over the reference body, of the spread with the absolute HU
  error ``|sCT - CT|`` (1: the spread orders the voxels exactly as the error does; 0: no relation).
- ``surface_auroc``: how well the spread at the synthetic bone-surface points separates the points more
  than ``off_mm`` from the reference bone surface from the rest: the area under the ROC curve (1: every
  far point has a higher spread than every near one; 0.5: chance).

Both take the comparison of the same sCT (:func:`SyntheticCTLib.comparison.compare.compare`), so the
error is measured exactly as the report measures it. :func:`add_surface_spread` puts the spread on the
synthetic bone surface as the point array ``Spread_HU`` (beside ``SignedDistance_mm``), so that a viewer
colours the same surface by deviation or by spread; :func:`reading` says the figures in one line.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

import numpy as np
import SimpleITK as sitk
import vtk
from scipy import stats

from SyntheticCTLib.comparison.surfaces import (
    DISTANCE_ARRAY,
    MEASURED_ARRAY,
    SPREAD_ARRAY,
    point_array,
    set_point_array,
    surface_points,
    values_at_points,
)
from SyntheticCTLib.kernel.errors import GeometryMismatchError, InvalidParameterError
from SyntheticCTLib.kernel.geometry import resample_like, same_grid, transform_points
from SyntheticCTLib.kernel.io import validate_volume

if TYPE_CHECKING:  # compare imports this module
    from SyntheticCTLib.comparison.compare import ComparisonResult

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


def check_spread(spread: sitk.Image, synthetic_ct: sitk.Image, *, name: str = "the spread map") -> sitk.Image:
    """``spread`` as float32 after checking it: a 3D volume on ``synthetic_ct``'s grid, no negative value.

    The spread is the per-voxel standard deviation that ``syntheticct synthesize --uncertainty`` writes
    beside the sCT, on the sCT's own grid. ``name`` (e.g. the file) is named in the errors.
    """
    validate_volume(spread, name)
    if not same_grid(spread, synthetic_ct):
        raise GeometryMismatchError(
            f"{name} is not on the synthetic CT's grid (size {spread.GetSize()} vs {synthetic_ct.GetSize()}, spacing "
            f"{tuple(round(v, 4) for v in spread.GetSpacing())} vs {tuple(round(v, 4) for v in synthetic_ct.GetSpacing())},"
            " or another origin or direction): give the spread written beside this sCT (syntheticct synthesize "
            "--uncertainty)."
        )
    spread = sitk.Cast(spread, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(spread)
    if np.nanmin(array) < 0:
        raise InvalidParameterError(
            f"{name} holds negative values (down to {float(np.nanmin(array)):g}); a spread is a standard deviation in "
            "HU (>= 0). Is it the spread map, not a CT?"
        )
    return spread


def spread_at_points(
    points: np.ndarray, spread: sitk.Image, *, transform: Optional[sitk.Transform] = None
) -> np.ndarray:
    """The spread (HU) at world points of the reference frame, interpolated linearly; NaN off its grid.

    ``transform`` maps reference points to synthetic points, as the comparison's; the spread lies on the
    synthetic CT's grid, so every point is mapped and sampled there (no resampling of the map).
    """
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    if len(points) == 0:
        return np.zeros(0)
    mapped = points if transform is None else transform_points(transform, points)
    return values_at_points(mapped, spread, outside=math.nan, linear=True)


def add_surface_spread(
    surface: vtk.vtkPolyData, spread: sitk.Image, *, transform: Optional[sitk.Transform] = None
) -> np.ndarray:
    """Sample ``spread`` at every point of ``surface`` (reference frame) into the point array ``Spread_HU``.

    The surface keeps its other arrays (``SignedDistance_mm``, ...): one surface, coloured by either.
    Returns the values (NaN for points off the spread's grid).
    """
    values = spread_at_points(surface_points(surface), spread, transform=transform)
    set_point_array(surface, SPREAD_ARRAY, values.astype(np.float32))
    return values


def surface_spread_quality(
    surface: vtk.vtkPolyData, values: Optional[np.ndarray] = None, *, off_mm: float = SURFACE_OFF_MM
) -> Dict[str, Any]:
    """The surface figures of the spread ``values`` at the points of ``surface`` (default: its ``Spread_HU``).

    ``surface_auroc`` (the spread separating the measured points more than ``off_mm`` from the other
    surface, by its ``SignedDistance_mm``), the numbers of measured and off points, and the median and
    95th percentile of the spread over the measured points. Points off the spread's grid (NaN) are left out.
    """
    if off_mm <= 0:
        raise InvalidParameterError(f"off_mm must be positive (got {off_mm}).")
    if values is None:
        if surface.GetPointData().GetArray(SPREAD_ARRAY) is None:
            raise InvalidParameterError(f"The surface has no point array '{SPREAD_ARRAY}' (see add_surface_spread).")
        values = point_array(surface, SPREAD_ARRAY)
    values = np.asarray(values, dtype=np.float64)
    if len(values) != surface.GetNumberOfPoints():
        raise InvalidParameterError(f"{len(values)} spread values for {surface.GetNumberOfPoints()} surface points.")
    measured = point_array(surface, MEASURED_ARRAY) > 0 if surface.GetPointData().GetArray(MEASURED_ARRAY) else None
    distance = np.abs(point_array(surface, DISTANCE_ARRAY))
    keep = np.isfinite(values) if measured is None else (measured & np.isfinite(values))
    at_points, off = values[keep], distance[keep] > off_mm
    median, p95 = (float(v) for v in np.percentile(at_points, [50, 95])) if at_points.size else (math.nan, math.nan)
    return {
        "surface_auroc": auroc(at_points, off),
        "n_surface_points": int(keep.sum()),
        "n_surface_off": int(off.sum()),
        "off_mm": float(off_mm),
        "surface_spread_median_hu": median,
        "surface_spread_p95_hu": p95,
    }


def voxel_spread_quality(
    reference: sitk.Image,
    synthetic_on_reference: sitk.Image,
    body_mask: sitk.Image,
    spread: sitk.Image,
    *,
    transform: Optional[sitk.Transform] = None,
    max_voxels: int = 500_000,
) -> Dict[str, Any]:
    """``hu_spearman`` and ``n_voxels``: the spread (brought onto the reference grid) against ``|sCT - CT|`` in the body."""
    on_reference = resample_like(
        sitk.Cast(spread, sitk.sitkFloat32), reference, transform=transform, interpolator=sitk.sitkLinear
    )
    spread_array = sitk.GetArrayViewFromImage(on_reference)
    body = sitk.GetArrayViewFromImage(body_mask) > 0
    error = np.abs(
        sitk.GetArrayViewFromImage(synthetic_on_reference).astype(np.float64)
        - sitk.GetArrayViewFromImage(reference).astype(np.float64)
    )
    values, errors = spread_array[body], error[body]
    step = max(1, values.size // max_voxels)
    values, errors = values[::step], errors[::step]
    constant = values.size < 3 or np.ptp(values) == 0 or np.ptp(errors) == 0  # no rank order: undefined
    rho = float("nan") if constant else float(stats.spearmanr(values, errors).statistic)
    return {"hu_spearman": rho, "n_voxels": int(values.size)}


def spread_quality(
    reference: sitk.Image,
    synthetic_on_reference: sitk.Image,
    body_mask: sitk.Image,
    surface: vtk.vtkPolyData,
    spread: sitk.Image,
    *,
    transform: Optional[sitk.Transform] = None,
    off_mm: float = SURFACE_OFF_MM,
    max_voxels: int = 500_000,
    store: bool = False,
) -> Dict[str, Any]:
    """:func:`voxel_spread_quality` and :func:`surface_spread_quality` together, with their :func:`reading`.

    The pieces of a comparison (see :func:`uncertainty_quality`). The spread is sampled at the surface's
    points through ``transform``; with ``store`` it is kept there as the point array ``Spread_HU``.
    """
    if off_mm <= 0:
        raise InvalidParameterError(f"off_mm must be positive (got {off_mm}).")
    spread = sitk.Cast(spread, sitk.sitkFloat32)
    if store:
        values = add_surface_spread(surface, spread, transform=transform)
    else:
        values = spread_at_points(surface_points(surface), spread, transform=transform)
    result = voxel_spread_quality(
        reference, synthetic_on_reference, body_mask, spread, transform=transform, max_voxels=max_voxels
    )
    result.update(surface_spread_quality(surface, values, off_mm=off_mm))
    result["reading"] = reading(result)
    return result


def uncertainty_quality(
    comparison: ComparisonResult,
    spread: sitk.Image,
    *,
    transform: Optional[sitk.Transform] = None,
    off_mm: float = SURFACE_OFF_MM,
    max_voxels: int = 500_000,
) -> Dict[str, Any]:
    """How well ``spread`` (on the synthetic CT's grid) predicts the errors that ``comparison`` measured.

    ``transform`` is the one the comparison used (reference points to synthetic points). The spread is
    sampled (linearly, through ``transform``) at the synthetic bone-surface points; the comparison is not
    changed. Returns ``{"hu_spearman", "n_voxels",
    "surface_auroc", "n_surface_points", "n_surface_off", "off_mm", "surface_spread_median_hu",
    "surface_spread_p95_hu", "reading"}``.
    """
    return spread_quality(
        comparison.reference,
        comparison.synthetic,
        comparison.body_mask,
        comparison.synthetic_surface,
        spread,
        transform=transform,
        off_mm=off_mm,
        max_voxels=max_voxels,
    )


def _strength(value: float, steps: Mapping[float, str]) -> str:
    for limit, word in steps.items():
        if value < limit:
            return word
    return list(steps.values())[-1]


def reading(quality: Mapping[str, Any]) -> str:
    """One plain line on the figures of :func:`uncertainty_quality`: does the spread predict where the sCT is wrong?

    AUROC below 0.55 reads "not at all", to 0.65 "weakly", to 0.8 "moderately", else "well" (below 0.45:
    "the wrong way round"); the rank correlation reads "none" below 0.1, "weak" to 0.3, "moderate" to 0.5,
    else "strong".
    """
    auc = quality.get("surface_auroc")
    rho = quality.get("hu_spearman")
    off, n = quality.get("n_surface_off"), quality.get("n_surface_points")
    finite = isinstance(auc, (int, float)) and math.isfinite(auc)
    if finite and auc < 0.45:
        surface = f"the wrong way round (AUROC {auc:.2f}: lower spread where the bone surface is off)"
    elif finite:
        word = _strength(auc, {0.55: "not at all", 0.65: "weakly", 0.8: "moderately", math.inf: "well"})
        surface = f"{word} (AUROC {auc:.2f}, {off} of {n} surface points more than {quality.get('off_mm', SURFACE_OFF_MM):g} mm off)"
    elif off == 0:
        surface = (
            "cannot say: no bone-surface point is more than " + f"{quality.get('off_mm', SURFACE_OFF_MM):g} mm off"
        )
    else:
        surface = "cannot say: every measured bone-surface point is off"
    text = f"Spread predicts where the sCT bone surface is wrong: {surface}"
    if isinstance(rho, (int, float)) and math.isfinite(rho):
        word = _strength(abs(rho), {0.1: "none", 0.3: "weak", 0.5: "moderate", math.inf: "strong"})
        sign = "" if rho >= 0 or word == "none" else ", negative"
        text += f"; relation with the HU error: {word}{sign} (Spearman {rho:.2f})"
    return text + "."


__all__ = [
    "SURFACE_OFF_MM",
    "add_surface_spread",
    "auroc",
    "check_spread",
    "reading",
    "spread_at_points",
    "spread_quality",
    "surface_spread_quality",
    "uncertainty_quality",
    "voxel_spread_quality",
]
