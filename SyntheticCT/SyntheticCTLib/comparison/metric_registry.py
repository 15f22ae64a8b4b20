"""The one registry of comparison metrics and the frozen record of one comparison's metrics.

:data:`METRICS` holds, for every scalar a comparison reports, its key (as in ``metrics.json``), the
label and unit users read, the digits shown and which way is better. The demo and evaluation reports,
the comparison page and the Slicer statistics table all read it; the key sets of the evaluation
tables (:data:`EVALUATION_KEYS`), of ``metrics.json``'s head (:data:`REQUIRED_KEYS`) and of training's
validation (:data:`VALIDATION_KEYS`) are drawn from it.

:class:`ComparisonMetrics` is what :func:`SyntheticCTLib.comparison.compare.compare` measured, as a
frozen dataclass; :meth:`ComparisonMetrics.to_dict` gives the JSON form written as ``metrics.json``
(same keys, same order). This module is pure Python (no numpy, SimpleITK or VTK at import), so the Slicer
module can import it at start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE

BETTER = ("lower", "higher", "zero")
"""Which way a metric is better: the lowest value, the highest, or the closest to zero."""


def format_number(value: object, digits: int = 2, unit: str = "") -> str:
    """A number for display: fixed ``digits``, ``unit`` appended, '—' for None/NaN, '∞' for infinity."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        number = float(value)
        if math.isnan(number):
            return "\u2014"
        if math.isinf(number):
            return "\u221e" if number > 0 else "-\u221e"
        text = f"{number:.{digits}f}" if not isinstance(value, int) else str(value)
        return f"{text} {unit}".strip()
    if hasattr(value, "__float__") and not isinstance(value, str):  # numpy scalars
        return format_number(float(value), digits, unit)  # type: ignore[arg-type]
    return str(value)


@dataclass(frozen=True)
class MetricSpec:
    """How a metric is shown: ``label`` and ``unit``, ``digits`` after the point, and which way is ``better``.

    ``fraction`` metrics are stored as a fraction in [0, 1] and shown as a percentage (``unit`` is "%").
    ``note`` is an optional precision the comparison page adds to the label.
    """

    key: str
    label: str
    unit: str
    digits: int
    better: str
    fraction: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        if self.better not in BETTER:
            raise ValueError(f"Metric {self.key}: better must be one of {BETTER}; got {self.better!r}.")

    @property
    def value_unit(self) -> str:
        """The unit of the stored value (``fraction`` for percentages stored as fractions)."""
        return "fraction" if self.fraction else self.unit

    @property
    def long_label(self) -> str:
        """The label with its note, e.g. ``PSNR (on [-1024, 3000] HU)``."""
        return f"{self.label} ({self.note})" if self.note else self.label

    def text(self, value: Any, *, with_unit: bool = False) -> str:
        """``value`` as the reports show it: fixed digits, fractions as %, '—' when missing."""
        unit = self.unit if with_unit else ""
        if self.fraction:
            if value is None or isinstance(value, bool) or not _is_number(value) or not math.isfinite(float(value)):
                return "\u2014"
            return format_number(100.0 * float(value), self.digits, unit)
        return format_number(_plain(value), self.digits, unit)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _plain(value: Any) -> Any:
    """numpy scalars as Python floats (so integers stored as floats keep their digits)."""
    if isinstance(value, (int, float, str)) or value is None:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if hasattr(value, "__float__"):
        return float(value)
    return value


_SPECS = (
    MetricSpec("mae_hu", "MAE (body)", "HU", 1, "lower"),
    MetricSpec("me_hu", "ME, sCT - CT (body)", "HU", 1, "zero"),
    MetricSpec("psnr_db", "PSNR", "dB", 2, "higher", note="on [-1024, 3000] HU"),
    MetricSpec("ssim", "SSIM", "", 4, "higher"),
    MetricSpec("bone_dice", "Bone Dice", "", 4, "higher"),
    MetricSpec("surface_mean_mm", "Bone surface distance, mean", "mm", 3, "lower", note="of |d|"),
    MetricSpec("surface_median_mm", "Bone surface distance, median", "mm", 3, "lower"),
    MetricSpec("surface_rms_mm", "Bone surface distance, RMS", "mm", 3, "lower"),
    MetricSpec("surface_p95_mm", "Bone surface distance, p95", "mm", 3, "lower", note="95th percentile of |d|"),
    MetricSpec("surface_max_mm", "Bone surface distance, max (Hausdorff)", "mm", 3, "lower"),
    MetricSpec("surface_within_1mm", "Bone surface within 1 mm", "%", 1, "higher", fraction=True),
    MetricSpec("surface_within_2mm", "Bone surface within 2 mm", "%", 1, "higher", fraction=True),
    MetricSpec("surface_hd95_mm", "Bone surface distance, HD95", "mm", 3, "lower", note="max of directed p95"),
    MetricSpec(
        "surface_mean_signed_mm", "Bone surface distance, signed mean", "mm", 3, "zero", note="+: sCT bone outside"
    ),
)

METRICS: Dict[str, MetricSpec] = {spec.key: spec for spec in _SPECS}
"""Every scalar metric of a comparison, in the order of ``metrics.json``."""

EVALUATION_KEYS: Tuple[str, ...] = (
    "mae_hu",
    "me_hu",
    "psnr_db",
    "ssim",
    "bone_dice",
    "surface_mean_mm",
    "surface_median_mm",
    "surface_rms_mm",
    "surface_p95_mm",
    "surface_max_mm",
    "surface_within_1mm",
    "surface_within_2mm",
)
"""The scalar metrics of a comparison that evaluation tables and summaries carry (their columns)."""

REQUIRED_KEYS: Tuple[str, ...] = tuple(k for k in EVALUATION_KEYS if k != "surface_within_2mm") + ("per_bone",)
"""The top-level keys every ``metrics.json`` starts with (more follow)."""

VALIDATION_KEYS: Tuple[str, ...] = (
    "mae_hu",
    "me_hu",
    "psnr_db",
    "ssim",
    "bone_dice",
    "surface_mean_mm",
    "surface_p95_mm",
)
"""The metrics training's validation records per epoch (``val_<key>`` columns)."""

REPORT_KEYS: Tuple[str, ...] = (
    "surface_mean_mm",
    "surface_median_mm",
    "surface_rms_mm",
    "surface_p95_mm",
    "surface_hd95_mm",
    "surface_max_mm",
    "surface_within_1mm",
    "surface_within_2mm",
    "surface_mean_signed_mm",
    "bone_dice",
    "mae_hu",
    "me_hu",
    "psnr_db",
    "ssim",
)
"""The rows of the demo report's metrics table and the Slicer statistics table: bone surfaces first."""


def spec_of(key: str) -> MetricSpec:
    """The spec of ``key``; an unknown key gets its own name as label, no unit, 3 digits, lower is better."""
    return METRICS.get(key) or MetricSpec(key, key, "", 3, "lower")


def metric_text(key: str, value: Any, *, with_unit: bool = False) -> str:
    """A metric value as every report shows it (see :meth:`MetricSpec.text`)."""
    return spec_of(key).text(value, with_unit=with_unit)


def _json_safe(value: Any) -> Any:
    # Lazy: kernel.jsonio loads numpy and SimpleITK, which the Slicer module's start-up does without.
    from SyntheticCTLib.kernel.jsonio import json_safe

    return json_safe(value)


def _number(value: Any) -> Optional[float]:
    """A finite float, or None (not measured, or not finite as the PSNR of identical images)."""
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class ComparisonMetrics:
    """What one comparison measured, in the units of :data:`METRICS`; None where it was not measurable.

    Distances are area-weighted statistics of the signed point-wise bone-surface distances (symmetric:
    both directions pooled); ``synthetic_to_reference`` and ``reference_to_synthetic`` hold the directed
    statistics. A PSNR of identical images (infinite) is None, as ``metrics.json`` writes it (null).
    ``uncertainty``: how well a spread map given to the comparison predicts its errors
    (:func:`SyntheticCTLib.comparison.uncertainty.uncertainty_quality`); None without one.
    The field order is the key order of ``metrics.json``.
    """

    mae_hu: Optional[float]
    me_hu: Optional[float]
    psnr_db: Optional[float]
    ssim: Optional[float]
    bone_dice: Optional[float] = None
    surface_mean_mm: Optional[float] = None
    surface_median_mm: Optional[float] = None
    surface_rms_mm: Optional[float] = None
    surface_p95_mm: Optional[float] = None
    surface_max_mm: Optional[float] = None
    surface_within_1mm: Optional[float] = None
    per_bone: Tuple[Mapping[str, Any], ...] = ()
    surface_within_2mm: Optional[float] = None
    surface_hd95_mm: Optional[float] = None
    surface_mean_signed_mm: Optional[float] = None
    synthetic_to_reference: Mapping[str, Any] = field(default_factory=dict)
    reference_to_synthetic: Mapping[str, Any] = field(default_factory=dict)
    body_overlap_fraction: Optional[float] = None
    uncertainty: Optional[Mapping[str, Any]] = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, Any] = field(default_factory=dict)
    note: str = NOT_FOR_DIAGNOSTIC_USE

    def __post_init__(self) -> None:
        for spec in _SPECS:
            object.__setattr__(self, spec.key, _number(getattr(self, spec.key)))
        object.__setattr__(self, "body_overlap_fraction", _number(self.body_overlap_fraction))
        object.__setattr__(self, "per_bone", tuple(_json_safe(dict(row)) for row in self.per_bone))
        if self.uncertainty is not None:
            object.__setattr__(self, "uncertainty", _json_safe(dict(self.uncertainty)))
        for name in ("synthetic_to_reference", "reference_to_synthetic", "settings", "versions"):
            object.__setattr__(self, name, _json_safe(dict(getattr(self, name))))

    def to_dict(self) -> Dict[str, Any]:
        """The JSON form (``metrics.json``): every field in order, None for what was not measurable."""
        return {f.name: _json_safe(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonMetrics:
        """Read the JSON form back (unknown keys are ignored; missing ones are None)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("mae_hu", "me_hu", "psnr_db", "ssim"):
            values.setdefault(key, None)
        return cls(**values)

    def value(self, key: str) -> Optional[float]:
        """The scalar metric ``key`` (a key of :data:`METRICS`)."""
        if key not in METRICS:
            raise KeyError(f"Unknown metric {key!r}; the metrics are {', '.join(METRICS)}.")
        return getattr(self, key)

    def scalars(self, keys: Sequence[str] = EVALUATION_KEYS) -> Dict[str, float]:
        """``{key: float}`` of ``keys``, NaN where not measurable (the rows of evaluation and validation tables)."""
        return {k: (math.nan if self.value(k) is None else float(self.value(k))) for k in keys}


GOALS: Dict[str, Tuple[str, float]] = {
    "surface_mean_mm": ("<=", 0.3),
    "surface_p95_mm": ("<=", 0.7),
    "bone_dice": (">=", 0.95),
    "mae_hu": ("<=", 40.0),
}
"""The accuracy goals of a released model, per metric: (direction, bound); an evaluation holds each group's
mean to them, and training can select its epoch on them (``validation.select_by: goals``)."""


def goal_ratio(key: str, value: float) -> float:
    """How far ``value`` of metric ``key`` is from its goal in :data:`GOALS`: the value over the bound (the
    bound over the value for a ``>=`` goal); above 1 misses it, and a non-finite value is ``inf``."""
    direction, bound = GOALS[key]
    if value is None or not math.isfinite(value):
        return math.inf
    return value / bound if direction == "<=" else bound / max(value, 1e-12)


def goal_check(summary: Mapping[str, Mapping[str, float]]) -> Dict[str, Any]:
    """Each goal of :data:`GOALS` against one method's summary (``{metric: {"mean": ...}}``): its mean,
    whether it is met, and :func:`goal_ratio`."""
    out: Dict[str, Any] = {}
    for key, (direction, bound) in GOALS.items():
        mean = summary.get(key, {}).get("mean", math.nan)
        ratio = goal_ratio(key, mean)
        out[key] = {
            "goal": f"{direction} {bound:g}",
            "mean": mean if math.isfinite(mean) else None,
            "met": bool(ratio <= 1.0),
            "ratio": ratio,
        }
    return out


__all__ = [
    "GOALS",
    "goal_check",
    "goal_ratio",
    "BETTER",
    "ComparisonMetrics",
    "EVALUATION_KEYS",
    "METRICS",
    "MetricSpec",
    "REPORT_KEYS",
    "REQUIRED_KEYS",
    "VALIDATION_KEYS",
    "format_number",
    "metric_text",
    "spec_of",
]
