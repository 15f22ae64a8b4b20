"""Case and evaluation reports: self-contained HTML pages (every picture embedded, nothing fetched).

- :func:`write_demo_report` - one case of the demo: the case and the model (with its card), the
  version and parameters of each step, orthogonal slices of MRI, sCT, CT and their difference in a
  fixed HU window, the checkerboard overlay, 3D bone surfaces coloured by deviation (and by the sCT's
  spread, with how well it predicts the error, when the comparison had one), the distance
  histogram with the 1 mm lines, the metrics beside the baselines (per bone where available) and
  the registration summary against the known transform.
- :func:`write_index` - many cases (``syntheticct evaluate``): links to the per-case reports or
  pictures, a summary table per method and box plots.

The page pieces (style, header with the not-for-diagnostic-use banner, tables, figures, sections)
are those of :mod:`SyntheticCTLib.comparison.report_html`; the surface renderings, checkerboard,
difference map and histogram are those that :func:`SyntheticCTLib.comparison.compare.write_comparison`
wrote. This module adds the slice panel, the box plots, the multi-method metrics table and the
demo/index layouts. Figures use matplotlib's Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE
from SyntheticCTLib.comparison import report_html
from SyntheticCTLib.comparison.metric_registry import METRICS, REPORT_KEYS, spec_of
from SyntheticCTLib.kernel.geometry import resample_like
from SyntheticCTLib.kernel.io import atomic_output
from SyntheticCTLib.kernel.progress import ProgressCallback, no_progress
from SyntheticCTLib.kernel.types import PathLike

logger = logging.getLogger(__name__)

HU_WINDOW = (-600.0, 1400.0)
"""The fixed display window of the CT and sCT slices (level 400 HU, width 2000 HU)."""
DIFFERENCE_WINDOW_HU = 500.0
"""The difference map (sCT - CT) is shown on ±this, on a diverging map."""

SUMMARY_METRICS = ("surface_mean_mm", "surface_p95_mm", "bone_dice", "mae_hu")
"""The key figures of a summary: bone-surface mean and p95, bone Dice and MAE."""

EXTRA_STYLE = """
td.best { font-weight: 700; color: #1a7f37; }
table.kv th { background: none; color: #555; font-weight: 500; width: 230px; }
details summary { cursor: pointer; color: #2a6ebb; margin: 6px 0; }
.note { color: #555; font-size: 0.92em; }
"""


def _html():

    return report_html


# -- numbers and small pieces ----------------------------------------------------------------------------


def metric_text(key: str, value: Any) -> str:
    """A metric value as the reports show it (fixed digits per metric; fractions as %; '—' when missing)."""
    return spec_of(key).text(_float_or_none(value))


def _float_or_none(value: Any) -> Any:
    if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    return value


def _best(values: Sequence[Any], better: str) -> Optional[int]:
    finite = [(i, float(v)) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if len(finite) < 2:
        return None
    if better == "lower":
        return min(finite, key=lambda t: t[1])[0]
    if better == "higher":
        return max(finite, key=lambda t: t[1])[0]
    return min(finite, key=lambda t: abs(t[1]))[0]


def comparison_table(
    columns: Mapping[str, Mapping[str, Any]], keys: Sequence[str] = REPORT_KEYS, *, data_attributes: bool = True
) -> str:
    """A metrics table with one column per method (``columns[method][key]``); the best value of each row in bold.

    With ``data_attributes`` each value cell carries ``data-key`` (the metric key) and ``data-method``,
    for tools and tests reading the page's own results.
    """
    h = _html()
    names = list(columns)
    parts = [
        "<table>",
        "<tr><th>Metric</th><th>Unit</th>" + "".join(f"<th>{h.escape(n)}</th>" for n in names) + "</tr>",
    ]
    for key in keys:
        values = [columns[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        spec = spec_of(key)
        label, unit = spec.label, spec.unit
        best = _best(values, spec.better)
        cells = "".join(
            f'<td class="num{" best" if i == best else ""}"'
            + (f' data-key="{h.escape(key)}" data-method="{h.escape(n)}"' if data_attributes else "")
            + f">{h.escape(metric_text(key, v))}</td>"
            for i, (n, v) in enumerate(zip(names, values))
        )
        parts.append(f"<tr><td>{h.escape(label)}</td><td>{h.escape(unit)}</td>{cells}</tr>")
    parts.append("</table>")
    return "".join(parts)


def _kv(rows: Sequence[Tuple[str, str]], *, raw: bool = False) -> str:
    """A two-column key/value table; values are escaped unless ``raw`` (then they are trusted HTML)."""
    h = _html()
    body = "".join(f"<tr><th>{h.escape(k)}</th><td>{v if raw else h.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _vector(v: Optional[Sequence[float]], digits: int = 2) -> str:
    if v is None:
        return "\u2014"
    return "(" + ", ".join(f"{float(x):+.{digits}f}" for x in v) + ")"


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _page(title: str, sections: Sequence[str], subtitle: str) -> str:
    """The report_html page, with this module's few extra style rules."""
    text = _html().page(title, sections, subtitle=subtitle)
    return text.replace("</style>", EXTRA_STYLE + "</style>", 1)


def _write_text(path: Path, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# -- figures -------------------------------------------------------------------------------------------


def _figure(width: float, height: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi, facecolor="white")
    return buffer.getvalue()


def slice_point(image: sitk.Image, *, threshold: float = 200.0) -> Tuple[int, int, int]:
    """The voxel index (x, y, z) whose three planes cut the most voxels above ``threshold`` (bone).

    The comparison's own choice (:func:`SyntheticCTLib.comparison.rendering.mask_centre_index`), so the
    slice panel and the checkerboard show the same planes; the grid centre when nothing is above.
    """
    from SyntheticCTLib.comparison.rendering import mask_centre_index

    z, y, x = mask_centre_index(image > threshold)
    return int(x), int(y), int(z)


def display_oriented(image: sitk.Image) -> sitk.Image:
    """``image`` with its voxels reordered (permuted and flipped, never resampled) to the nearest LPS axes.

    Index x then grows towards the patient's left, y towards posterior, z towards superior, so that a
    plane drawn with row 0 on top is in the radiological convention. The physical geometry is kept.
    """
    return sitk.DICOMOrient(image, "LPS")


def _planes(array: np.ndarray, spacing: Sequence[float], point: Sequence[int]):
    """Axial, coronal and sagittal planes with their extents (mm) and origins for ``imshow``.

    Axial: rows y (anterior up), columns x; coronal and sagittal: superior up.
    """
    sx, sy, sz = spacing
    nz, ny, nx = array.shape
    x, y, z = (int(np.clip(p, 0, n - 1)) for p, n in zip(point, (nx, ny, nz)))
    return (
        ("axial", array[z], [0, nx * sx, ny * sy, 0], "upper"),
        ("coronal", array[:, y, :], [0, nx * sx, 0, nz * sz], "lower"),
        ("sagittal", array[:, :, x], [0, ny * sy, 0, nz * sz], "lower"),
    )


def slices_png(
    mri: sitk.Image,
    sct: sitk.Image,
    ct: sitk.Image,
    *,
    point: Optional[Sequence[int]] = None,
    hu_window: Tuple[float, float] = HU_WINDOW,
    difference_window: float = DIFFERENCE_WINDOW_HU,
    dpi: int = 72,
) -> bytes:
    """One figure: three orthogonal slices each of the MRI, sCT, CT and sCT - CT, all on the CT's grid.

    The sCT and CT share the fixed ``hu_window``; the difference is on ±``difference_window`` HU (blank
    where both are air); the MRI is windowed on its 1st-99.5th percentile inside the CT's body. ``point`` is the voxel index
    (x, y, z) of the CT grid the planes cross (default: the centroid of the CT's bone).

    Whatever the CT's storage order (LPS, RAS, feet-first, ...), the planes are shown in the radiological
    convention: the images are first reoriented to the nearest LPS axes (:func:`display_oriented`), so
    the axial plane has anterior up and the patient's left on the right, the coronal and sagittal planes
    superior up.
    """
    physical = None if point is None else ct.TransformIndexToPhysicalPoint([int(v) for v in point])
    mri, sct, ct = (display_oriented(image) for image in (mri, sct, ct))
    if physical is not None:
        point = ct.TransformPhysicalPointToIndex(physical)
    spacing = ct.GetSpacing()
    point = tuple(point) if point is not None else slice_point(ct)
    mri_a = sitk.GetArrayFromImage(mri).astype(np.float32)
    sct_a = sitk.GetArrayFromImage(sct).astype(np.float32)
    ct_a = sitk.GetArrayFromImage(ct).astype(np.float32)
    body = ct_a > -400
    difference = np.where(body | (sct_a > -400), sct_a - ct_a, np.nan)  # air outside both: blank (grey)
    lo, hi = (float(v) for v in np.percentile(mri_a[body] if body.any() else mri_a, [1.0, 99.5]))
    rows = (
        ("MRI (echo 1)", mri_a, "gray", (lo, max(hi, lo + 1e-6)), "signal (a.u.)"),
        ("Synthetic CT", sct_a, "gray", hu_window, "HU"),
        ("CT", ct_a, "gray", hu_window, "HU"),
        ("sCT \u2212 CT", difference, "RdBu_r", (-difference_window, difference_window), "HU"),
    )
    figure = _figure(10.5, 12.0, dpi)
    axes = figure.subplots(4, 3)
    for r, (label, array, cmap, (vmin, vmax), unit) in enumerate(rows):
        image = None
        for c, (name, plane, extent, origin) in enumerate(_planes(array, spacing, point)):
            ax = axes[r, c]
            ax.set_facecolor("#d0d4d9")
            image = ax.imshow(plane, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, origin=origin)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=12)
            if c == 0:
                ax.set_ylabel(label, fontsize=12)
        figure.colorbar(image, ax=list(axes[r, :]), shrink=0.85, pad=0.01, label=unit)
    figure.suptitle(
        f"CT window [{hu_window[0]:g}, {hu_window[1]:g}] HU; difference \u00b1{difference_window:g} HU; "
        "planes through (x, y, z) = ({:.0f}, {:.0f}, {:.0f}) mm, LPS; radiological convention".format(
            *ct.TransformIndexToPhysicalPoint([int(v) for v in point])
        ),
        fontsize=11,
    )
    return _png(figure)


def box_plots_png(
    values: Mapping[str, Mapping[str, Sequence[float]]],
    metric_keys: Sequence[str] = SUMMARY_METRICS,
    *,
    dpi: int = 80,
) -> bytes:
    """Box plots, one panel per metric, one box per method: ``values[method][metric]`` lists per-case values.

    Surface-distance panels carry the 1 mm clinical bar as a dashed line.
    """
    methods = list(values)
    figure = _figure(3.3 * len(metric_keys), 3.8, dpi)
    axes = figure.subplots(1, len(metric_keys), squeeze=False)[0]
    colours = ("#2a6ebb", "#e08a2c", "#7d8a96", "#4caf50", "#9c27b0")
    for ax, key in zip(axes, metric_keys):
        spec = spec_of(key)
        label, unit = spec.label, spec.unit
        scale = 100.0 if spec.fraction else 1.0
        data = [
            [scale * float(v) for v in values[m].get(key, []) if isinstance(v, (int, float)) and math.isfinite(v)]
            for m in methods
        ]
        positions = [i + 1 for i, d in enumerate(data) if d]
        if positions:
            parts = ax.boxplot([d for d in data if d], positions=positions, patch_artist=True, widths=0.6)
            for box, i in zip(parts["boxes"], positions):
                box.set_facecolor(colours[(i - 1) % len(colours)])
                box.set_alpha(0.75)
        ax.set_xticks(range(1, len(methods) + 1))
        ax.set_xticklabels(methods, rotation=20, fontsize=9)
        ax.set_xlim(0.4, len(methods) + 0.6)
        ax.set_title(label + (f" ({unit})" if unit else ""), fontsize=10)
        if unit == "mm" and key.startswith("surface_"):
            ax.axhline(1.0, color="#b42318", linestyle="--", linewidth=1)
    return _png(figure)


# -- the demo report -----------------------------------------------------------------------------------


COMPARISON_PICTURES = {
    "surface_front": "Front (anterior)",
    "surface_side": "Side (patient's left)",
    "surface_back": "Back (posterior)",
    "spread_front": "Spread, front (anterior)",
    "spread_side": "Spread, side (patient's left)",
    "spread_back": "Spread, back (posterior)",
    "checkerboard": "Checkerboard of CT and registered sCT",
    "difference": "Difference sCT \u2212 CT inside the body",
    "distance_histogram": "Signed surface distances, \u00b11 mm marked",
}
"""The PNGs of ``write_comparison`` that the demo report embeds, with their captions."""


def write_demo_report(
    path: PathLike,
    metrics: Mapping[str, Any],
    *,
    mri: sitk.Image,
    ct: sitk.Image,
    synthetic_on_ct: sitk.Image,
    transform: Optional[sitk.Transform] = None,
    comparison_files: Optional[Mapping[str, PathLike]] = None,
    model_card: Optional[Mapping[str, Any]] = None,
    images_dir: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
) -> Path:
    """Write the demo's ``report.html``: one self-contained page for a researcher reviewing the case.

    Parameters
    ----------
    path
        The HTML file to write (atomically).
    metrics
        The demo's ``metrics.json`` content (see :func:`SyntheticCTLib.apps.demo.run_demo`): case, model,
        true transform, registration, metrics, baselines, steps, versions.
    mri
        Echo 1 of the MRI, in its own space; resampled onto the CT grid through ``transform``.
    ct, synthetic_on_ct
        The reference CT and the synthetic CT already on the CT's grid (the comparison's ``synthetic``).
    transform
        Fixed (CT) to moving (MRI/sCT) points, ITK convention: the registration.
    comparison_files
        ``write_comparison``'s ``{name: path}``; its pictures (:data:`COMPARISON_PICTURES`) are embedded.
    model_card
        The model's ``model.json``.
    images_dir
        Where to save the report's own slice panel as ``slices.png`` (optional).
    """

    h = _html()
    path = Path(path)
    report = progress or no_progress
    files = {k: Path(v) for k, v in (comparison_files or {}).items()}

    report(0.05, "report", "slices")
    mri_on_ct = resample_like(mri, ct, transform=transform, default_value=0.0, pixel_type=sitk.sitkFloat32)
    slices = slices_png(mri_on_ct, synthetic_on_ct, sitk.Cast(ct, sitk.sitkFloat32))
    if images_dir is not None:
        with atomic_output(Path(images_dir) / "slices.png") as tmp:
            tmp.write_bytes(slices)
    pictures = {k: files[k].read_bytes() for k in COMPARISON_PICTURES if k in files and files[k].is_file()}

    report(0.6, "report", "page")
    sections = [
        _summary_section(metrics),
        _case_section(metrics),
        _model_section(model_card or {}, metrics.get("model", {})),
        _metrics_section(metrics),
        _registration_section(metrics.get("registration", {}), metrics.get("true_transform", {})),
        h.section(
            "Slices: MRI, synthetic CT, CT and difference",
            h.figure(
                slices,
                "Three orthogonal planes on the CT's grid after registration; CT and sCT in one fixed "
                "HU window, the difference sCT \u2212 CT on a diverging map.",
            ),
        ),
    ]
    sections += _picture_sections(pictures, metrics.get("metrics") or {})
    sections.append(_steps_section(metrics))
    page = _page(
        "SyntheticCT demo report",
        sections,
        f"Phantom case, seed {metrics.get('seed')}: synthetic CT from MRI, registration to a CT and bone-surface "
        "deviation",
    )
    _write_text(path, page)
    report(1.0, "report", "written")
    return path


def _picture_sections(pictures: Mapping[str, bytes], comparison: Optional[Mapping[str, Any]] = None) -> List[str]:
    """The sections of the comparison's pictures that are there: checkerboard, surfaces (deviation, then spread
    with its uncertainty quality from ``comparison``, the comparison's metrics), histogram, difference."""
    h = _html()
    sections: List[str] = []
    if "checkerboard" in pictures:
        sections.append(
            h.section("Checkerboard overlay", h.figure(pictures["checkerboard"], COMPARISON_PICTURES["checkerboard"]))
        )
    surfaces = [
        (pictures[k], COMPARISON_PICTURES[k])
        for k in ("surface_front", "surface_side", "surface_back")
        if k in pictures
    ]
    if surfaces:
        sections.append(
            h.section(
                "Bone surfaces coloured by deviation",
                h.paragraph(
                    "The synthetic CT's bone surface coloured by its signed distance to the CT's bone surface: red "
                    "outside the CT bone, blue inside, on \u00b12 mm."
                )
                + h.figures(surfaces),
            )
        )
    spread = [
        (pictures[k], COMPARISON_PICTURES[k]) for k in ("spread_front", "spread_side", "spread_back") if k in pictures
    ]
    if spread or (comparison or {}).get("uncertainty"):
        sections.append(h.section("Bone surfaces coloured by spread", h.uncertainty_block(comparison or {}, spread)))
    if "distance_histogram" in pictures:
        sections.append(
            h.section(
                "Surface distance histogram",
                h.figure(pictures["distance_histogram"], COMPARISON_PICTURES["distance_histogram"]),
            )
        )
    if "difference" in pictures:
        sections.append(
            h.section("Difference map", h.figure(pictures["difference"], COMPARISON_PICTURES["difference"]))
        )
    return sections


def _summary_section(metrics: Mapping[str, Any]) -> str:
    h = _html()
    m = metrics.get("metrics", {})
    tre = metrics.get("registration", {}).get("tre_bone", {})
    rows = [(METRICS[k].label, METRICS[k].text(_float_or_none(m.get(k)), with_unit=True)) for k in SUMMARY_METRICS]
    if tre:
        rows.append(
            ("Registration error (TRE over bone)", f"{metric_text('surface_mean_mm', tre.get('mean_mm'))} mm mean")
        )
    model = metrics.get("model", {})
    body = h.clinical_bar(m) + _kv(rows)
    body += h.paragraph(
        f"Model {model.get('name', '')} {model.get('version', '')} on a digital phantom (seed {metrics.get('seed')}); "
        "the CT was moved by a known rigid transform and registered back. " + NOT_FOR_DIAGNOSTIC_USE,
        css_class="note",
    )
    return h.section("Summary", body)


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    h = _html()
    columns: Dict[str, Mapping[str, Any]] = {"model": metrics.get("metrics", {})}
    for name, values in (metrics.get("baselines") or {}).items():
        columns[f"baseline: {name}"] = values
    body = h.paragraph(
        "Synthetic CT against the CT inside the body (SynthRAD 2023 definitions) and bone surfaces (symmetric, "
        "area-weighted). The baselines go through the same comparison and the same registration transform. Best "
        "value of each row in bold."
    ) + comparison_table(columns)
    per_bone = metrics.get("metrics", {}).get("per_bone") or []
    if per_bone:
        body += "<h3>Per bone (model)</h3>" + h.per_bone_table(per_bone)
    return h.section("Metrics", body)


def _registration_section(reg: Mapping[str, Any], true: Mapping[str, Any]) -> str:
    h = _html()
    recovered = reg.get("recovered", {})
    tre = reg.get("tre_bone", {})
    rows = [
        ("Fixed / moving", "moved CT / synthetic CT"),
        ("Mode / metric", f"{reg.get('mode', '')} / {reg.get('metric', '')}"),
        ("Final metric value", h.format_number(reg.get("metric_value"), 4)),
        ("Iterations", str(reg.get("iterations", "\u2014"))),
        ("Time", h.format_number(reg.get("elapsed_s"), 2, "s")),
        ("Converged", h.format_number(reg.get("converged"))),
    ]
    transforms = h.table(
        [
            ("true (recorded)", _vector(true.get("rotation_deg")), _vector(true.get("translation_mm"))),
            ("recovered", _vector(recovered.get("rotation_deg")), _vector(recovered.get("translation_mm"))),
        ],
        ("", "rotation x, y, z (deg)", "translation x, y, z (mm)"),
    )
    errors = [
        ("Rotation error", h.format_number(reg.get("rotation_error_deg"), 3, "deg")),
        ("Translation error at the centre", h.format_number(reg.get("translation_error_mm"), 3, "mm")),
    ]
    if tre:
        errors.append(
            (
                "TRE over the CT's bone voxels",
                f"mean {h.format_number(tre.get('mean_mm'), 3)} mm, p95 {h.format_number(tre.get('p95_mm'), 3)} mm, "
                f"max {h.format_number(tre.get('max_mm'), 3)} mm ({tre.get('n_points')} points)",
            )
        )
    body = (
        _kv(rows)
        + "<h3>Recovered versus true transform</h3>"
        + h.paragraph(
            "Both map points of the moved CT (fixed) to the MRI/sCT space (moving), ITK Euler angles about the "
            f"centre {_vector(true.get('center_mm'), 1)} mm."
        )
        + transforms
        + _kv(errors)
    )
    return h.section("Registration", body)


def _model_section(card: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    h = _html()
    card = dict(card) if card else dict(summary)
    arch = card.get("architecture") or {}
    rows = [
        ("Name", str(card.get("name", ""))),
        ("Version", str(card.get("version", ""))),
        ("Description", str(card.get("description", ""))),
        ("Intended use", str(card.get("intended_use", ""))),
        ("Diagnostic use", str(card.get("diagnostic_use", NOT_FOR_DIAGNOSTIC_USE))),
        ("License", str(card.get("license", ""))),
    ]
    if arch:
        rows.append(("Architecture", f"{arch.get('name')} {_short(arch.get('kwargs', {}))}"))
    inputs = card.get("inputs") or []
    if inputs:
        from SyntheticCTLib.models.package import input_label

        rows.append(("Inputs", "; ".join(input_label(e, i) for i, e in enumerate(inputs))))
    if card.get("spacing_mm"):
        rows.append(("Working spacing", f"{_vector(card.get('spacing_mm'))} mm"))
    if summary.get("source"):
        rows.append(("Loaded from", str(summary.get("source"))))
    body = _kv(rows)
    training = card.get("training_data") or {}
    if training:
        skip = ("case_names", "input_statistics")
        body += "<h3>Training data</h3>" + _kv([(k, _short(v)) for k, v in training.items() if k not in skip])
    validation = card.get("validation_metrics") or {}
    for label, block in _held_out_blocks(card.get("held_out_evaluation")):
        body += f"<h3>Validated metrics on held-out cases: {h.escape(label)} (model card)</h3>"
        body += comparison_table(block["methods"], SUMMARY_METRICS + ("surface_within_1mm",), data_attributes=False)
        cases = block.get("cases") or []
        note = " ".join(
            t for t in (f"Cases: {', '.join(map(str, cases))}." if cases else "", str(block.get("note") or "")) if t
        )
        if note:
            body += h.paragraph(note, css_class="note")
    if validation:
        numbers = {k: v for k, v in validation.items() if k in METRICS}
        body += "<h3>Validation metrics (model selection, model card)</h3>"
        if numbers:
            body += comparison_table({"validation": numbers}, data_attributes=False)
        others = [(k, _short(v)) for k, v in validation.items() if k not in METRICS]
        if others:
            body += _kv(others)
    return h.section("Model", body)


def _held_out_blocks(value: Any) -> List[Tuple[str, Mapping[str, Any]]]:
    """The card's ``held_out_evaluation``: one ``{cases, note, methods}`` block, or several keyed by a label."""
    if not isinstance(value, Mapping):
        return []
    if isinstance(value.get("methods"), Mapping):
        return [("held-out cases", value)]
    return [(str(k), v) for k, v in value.items() if isinstance(v, Mapping) and isinstance(v.get("methods"), Mapping)]


def _case_section(metrics: Mapping[str, Any]) -> str:
    h = _html()
    case = metrics.get("case", {})
    rows = [
        ("Case", f"digital phantom, seed {metrics.get('seed')}"),
        ("Phantom grid", f"{case.get('phantom_size')} voxels at {case.get('phantom_spacing_mm')} mm"),
        ("CT grid (its own)", f"{case.get('ct_size')} voxels at {_vector(case.get('ct_spacing_mm'))} mm"),
        ("MRI echo times", f"{case.get('echo_times_ms')} ms"),
    ]
    params = case.get("parameters") or {}
    body = _kv(rows)
    if params:
        body += (
            "<details><summary>All phantom parameters</summary>"
            + _kv([(k, _short(v, 300)) for k, v in params.items()])
            + "</details>"
        )
    return h.section("Case", body)


def _steps_section(metrics: Mapping[str, Any]) -> str:
    h = _html()
    steps = metrics.get("steps") or []
    rows = [
        (
            s.get("name"),
            s.get("component"),
            s.get("version"),
            _short(s.get("parameters", {}), 240),
            h.format_number(s.get("seconds"), 1),
        )
        for s in steps
    ]
    body = h.table(rows, ("Step", "Component", "Version", "Parameters", "Time (s)"), numeric_from=4)
    versions = metrics.get("versions") or {}
    if versions:
        body += "<h3>Software</h3>" + _kv([(k, str(v)) for k, v in versions.items()])
    return h.section("Steps, versions and parameters", body)


# -- the evaluation index --------------------------------------------------------------------------------


def _href(target: Optional[PathLike], base: Path) -> Optional[str]:
    if target is None:
        return None
    text = str(target)
    if "://" in text:
        return text
    p = Path(target)
    if p.is_absolute():
        try:
            p = Path(os.path.relpath(p, base))
        except ValueError:  # another drive on Windows
            return p.as_uri()
    return p.as_posix()


def _summary_table(
    values: Mapping[str, Mapping[str, Sequence[float]]], methods: Sequence[str], metric_keys: Sequence[str]
) -> str:
    """The index's summary: mean ± SD (median, n) of each metric per method; the best mean in bold."""
    h = _html()
    parts = [
        "<table>",
        "<tr><th>Metric</th><th>Unit</th>" + "".join(f"<th>{h.escape(m)}</th>" for m in methods) + "</tr>",
    ]
    for k in metric_keys:
        spec = spec_of(k)
        label, unit = spec.label, spec.unit
        means = [float(np.mean(values[m][k])) if values[m][k] else None for m in methods]
        best = _best(means, spec.better)
        cells = []
        for i, m in enumerate(methods):
            v = values[m][k]
            if not v:
                cells.append('<td class="num">\u2014</td>')
                continue
            text = (
                f"{metric_text(k, float(np.mean(v)))} \u00b1 {metric_text(k, float(np.std(v)))} "
                f"(median {metric_text(k, float(np.median(v)))}, n = {len(v)})"
            )
            cells.append(
                f'<td class="num{" best" if i == best else ""}" data-key="{h.escape(k)}" '
                f'data-method="{h.escape(m)}">{h.escape(text)}</td>'
            )
        parts.append(f"<tr><td>{h.escape(label)}</td><td>{h.escape(unit)}</td>{''.join(cells)}</tr>")
    parts.append("</table>")
    return "".join(parts)


def write_index(
    path: PathLike,
    cases: Sequence[Mapping[str, Any]],
    *,
    title: str = "SyntheticCT evaluation",
    model_card: Optional[Mapping[str, Any]] = None,
    metric_keys: Sequence[str] = SUMMARY_METRICS,
) -> Path:
    """Write the evaluation index page: a summary table per method, box plots, and one row per case.

    Parameters
    ----------
    path
        The HTML file to write (atomically), e.g. ``OUT_DIR/index.html``.
    cases
        One mapping per case: ``{"name": str, "metrics": {method: {key: value}}, "report": path or None,
        "image": path or None}``; ``method`` is e.g. ``"model"``, ``"inversion"``, ``"bulk density"``, keys
        are the comparison's (``surface_mean_mm``, ``surface_p95_mm``, ``bone_dice``, ``mae_hu``, ...).
        ``report`` and ``image`` (a per-case report and picture) are linked relative to the index's folder.
    title
        The page title.
    model_card
        The evaluated model's ``model.json``, shown at the top (optional).
    metric_keys
        The metrics of the summary table, the box plots and the per-case columns.
    """
    h = _html()
    path = Path(path)
    base = path.parent
    methods: List[str] = []
    for case in cases:
        for m in case.get("metrics", {}):
            if m not in methods:
                methods.append(m)
    values: Dict[str, Dict[str, List[float]]] = {m: {k: [] for k in metric_keys} for m in methods}
    for case in cases:
        for m, per_key in case.get("metrics", {}).items():
            for k in metric_keys:
                v = per_key.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    values[m][k].append(float(v))

    summary_table = _summary_table(values, methods, metric_keys)
    summary = (
        h.paragraph(f"{len(cases)} cases; mean \u00b1 SD (median, number of cases). Best mean in bold.") + summary_table
    )

    # One row per case, linked to its report or picture.
    head = ["Case"] + [f"{m}: {spec_of(k).label}" for m in methods for k in metric_keys]
    rows = ["<tr>" + "".join(f"<th>{h.escape(c)}</th>" for c in head) + "<th>Files</th></tr>"]
    for case in cases:
        links = []
        for kind in ("report", "image"):
            href = _href(case.get(kind), base)
            if href:
                links.append(f'<a href="{h.escape(href)}">{kind}</a>')
        cells = "".join(
            f'<td class="num">{h.escape(metric_text(k, case.get("metrics", {}).get(m, {}).get(k)))}</td>'
            for m in methods
            for k in metric_keys
        )
        rows.append(f"<tr><td>{h.escape(case.get('name', ''))}</td>{cells}<td>{' '.join(links)}</td></tr>")
    per_case = f'<div style="overflow-x:auto"><table>{"".join(rows)}</table></div>'

    sections = [h.section("Summary", summary)]
    if methods and cases:
        plots = box_plots_png(values, metric_keys)
        sections.append(
            h.section("Distributions", h.figure(plots, "Per-case values per method; dashed line: the 1 mm bar."))
        )
    sections.append(h.section("Cases", per_case))
    if model_card:
        sections.append(_model_section(model_card, {}))
    page = _page(title, sections, f"{len(cases)} cases; methods: {', '.join(methods)}")
    return _write_text(path, page)


__all__ = [
    "COMPARISON_PICTURES",
    "DIFFERENCE_WINDOW_HU",
    "HU_WINDOW",
    "SUMMARY_METRICS",
    "box_plots_png",
    "comparison_table",
    "metric_text",
    "display_oriented",
    "slice_point",
    "slices_png",
    "write_demo_report",
    "write_index",
]
