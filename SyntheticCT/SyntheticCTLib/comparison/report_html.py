"""Self-contained HTML pages: reusable pieces (tables, figures, sections) and the comparison report.

Every picture is embedded as a base64 ``data:`` URI and the style sheet is inline, so a page is one
file that opens in any browser without network access. Text is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime
import html
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE
from SyntheticCTLib.comparison.metric_registry import METRICS, format_number

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1d1d1f;
       background: #f5f5f7; }
header { background: #1d2b3a; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 1.6em; }
header p { margin: 0; opacity: 0.85; }
main { padding: 12px 32px 32px 32px; max-width: 1400px; }
section { background: #fff; border-radius: 8px; padding: 14px 22px; margin: 16px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,0.12); }
h2 { font-size: 1.25em; margin: 4px 0 12px 0; }
table { border-collapse: collapse; margin: 6px 0; font-size: 0.95em; }
th, td { border-bottom: 1px solid #ddd; padding: 5px 12px; text-align: left; }
th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; flex: 1 1 320px; max-width: 100%; }
figure img { width: 100%; height: auto; border: 1px solid #ddd; border-radius: 4px; }
.narrow { max-width: 900px; }
figcaption { font-size: 0.9em; color: #555; margin-top: 4px; }
.banner { background: #fff3cd; border: 1px solid #e0c46c; color: #6b5200; padding: 8px 14px; border-radius: 6px;
          margin-top: 14px; }
.pass { color: #1a7f37; font-weight: 600; }
.fail { color: #b42318; font-weight: 600; }
footer { color: #666; font-size: 0.85em; padding: 0 32px 24px 32px; }
"""


def escape(text: object) -> str:
    """HTML-escape ``text`` (any object, via ``str``)."""
    return html.escape(str(text), quote=True)


def data_uri(png: bytes, mime: str = "image/png") -> str:
    """A ``data:`` URI embedding ``png`` (or any bytes of type ``mime``)."""
    return f"data:{mime};base64," + base64.b64encode(png).decode("ascii")


def table(rows: Iterable[Sequence[object]], header: Optional[Sequence[str]] = None, *, numeric_from: int = 1) -> str:
    """An HTML table; cells are escaped, columns from ``numeric_from`` on are right-aligned."""
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            css = ' class="num"' if i >= numeric_from else ""
            cells.append(f"<td{css}>{escape(cell)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def figure(png: bytes, caption: str, *, alt: Optional[str] = None) -> str:
    """A ``<figure>`` with the PNG embedded and a caption."""
    return (
        f'<figure><img src="{data_uri(png)}" alt="{escape(alt or caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def figures(items: Iterable[Tuple[bytes, str]]) -> str:
    """Figures side by side (wrapping): ``items`` are ``(png, caption)``."""
    return '<div class="figures">' + "".join(figure(png, caption) for png, caption in items) + "</div>"


def section(title: str, body_html: str) -> str:
    """A titled ``<section>``; ``body_html`` is inserted as is (build it from the pieces here)."""
    return f"<section><h2>{escape(title)}</h2>\n{body_html}\n</section>"


def paragraph(text: str, *, css_class: str = "") -> str:
    """An escaped paragraph."""
    cls = f' class="{escape(css_class)}"' if css_class else ""
    return f"<p{cls}>{escape(text)}</p>"


def page(title: str, sections: Sequence[str], *, subtitle: str = "", footer: str = NOT_FOR_DIAGNOSTIC_USE) -> str:
    """A complete self-contained HTML page."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title>",
            f"<style>{STYLE}</style></head><body>",
            f"<header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>",
            "<main>",
            f'<div class="banner">{escape(NOT_FOR_DIAGNOSTIC_USE)}</div>',
            *sections,
            "</main>",
            f"<footer>{escape(footer)} Generated {escape(stamp)} by SyntheticCT.</footer>",
            "</body></html>",
        ]
    )


# ---------------------------------------------------------------------------------------------
# The comparison report
# ---------------------------------------------------------------------------------------------


def metrics_table(metrics: Mapping[str, object]) -> str:
    """The main metrics table of a comparison's metrics (the JSON form, ``ComparisonMetrics.to_dict()``).

    One row per metric of the registry (:data:`~SyntheticCTLib.comparison.metric_registry.METRICS`), in its
    order, with its label, digits and unit.
    """
    rows = []
    for key, spec in METRICS.items():
        if key in metrics and not (spec.fraction and metrics[key] is None):
            rows.append((spec.long_label, spec.text(metrics[key], with_unit=True)))
    return table(rows, ("Metric", "Value"))


def direction_table(metrics: Dict[str, object]) -> str:
    """The per-direction surface statistics."""
    header = (
        "Direction",
        "mean |d| (mm)",
        "median (mm)",
        "RMS (mm)",
        "p95 (mm)",
        "max (mm)",
        "≤ 1 mm",
        "≤ 2 mm",
        "signed mean (mm)",
    )
    rows = []
    for key, label in (
        ("synthetic_to_reference", "sCT surface → CT surface"),
        ("reference_to_synthetic", "CT surface → sCT surface"),
    ):
        stats = metrics.get(key)
        if isinstance(stats, dict):
            rows.append(_stats_row(label, stats))
    return table(rows, header)


def _stats_row(label: str, stats: Dict[str, object]) -> Tuple[str, ...]:
    def pct(v):
        return "—" if v is None else f"{100 * float(v):.1f} %"

    return (
        label,
        format_number(stats.get("mean_abs_mm"), 3),
        format_number(stats.get("median_mm"), 3),
        format_number(stats.get("rms_mm"), 3),
        format_number(stats.get("p95_mm"), 3),
        format_number(stats.get("max_mm"), 3),
        pct(stats.get("within_1mm")),
        pct(stats.get("within_2mm")),
        format_number(stats.get("mean_signed_mm"), 3),
    )


def per_bone_table(per_bone: Sequence[Dict[str, object]]) -> str:
    """One row per bone."""
    header = ("Bone", "mean (mm)", "median (mm)", "p95 (mm)", "max (mm)", "≤ 1 mm", "signed mean (mm)", "transform")
    rows = []
    for row in per_bone:
        within = row.get("surface_within_1mm")
        rows.append(
            (
                row.get("name", row.get("label")),
                format_number(row.get("surface_mean_mm"), 3),
                format_number(row.get("surface_median_mm"), 3),
                format_number(row.get("surface_p95_mm"), 3),
                format_number(row.get("surface_max_mm"), 3),
                "—" if within is None else f"{100 * float(within):.1f} %",
                format_number(row.get("surface_mean_signed_mm"), 3),
                row.get("transform", "global"),
            )
        )
    return table(rows, header)


def clinical_bar(metrics: Dict[str, object], *, bar_mm: float = 1.0) -> str:
    """A one-line verdict on the mean bone-surface distance against ``bar_mm``."""
    mean = metrics.get("surface_mean_mm")
    if mean is None:
        return paragraph("No surface distance was measured.")
    ok = float(mean) < bar_mm
    word = "meets" if ok else "does not meet"
    return (
        f'<p class="{"pass" if ok else "fail"}">Mean bone-surface deviation {float(mean):.2f} mm {word} the '
        f"{bar_mm:g} mm bar.</p>"
    )


def registration_grade(metrics: Dict[str, object]) -> str:
    """A line on the grade of the registration behind the figures, and on coarse voxels; empty when neither applies."""
    settings = metrics.get("settings") if isinstance(metrics.get("settings"), dict) else {}
    parts = []
    verdict = settings.get("registration_grade")
    if verdict:
        reasons = settings.get("registration_grade_reasons") or ""
        css = "pass" if verdict == "good" else "fail"
        parts.append(
            f'<p class="{css}">The registration behind every figure below is graded <b>{html.escape(str(verdict))}</b>'
            + (f" ({html.escape(str(reasons))})" if reasons else "")
            + ("." if verdict == "good" else ": the surface and HU figures may measure a misalignment, not the sCT.")
            + "</p>"
        )
    note = settings.get("voxel_size_note")
    if note:
        parts.append(paragraph(str(note)))
    return "".join(parts)


def uncertainty_table(quality: Mapping[str, object]) -> str:
    """The uncertainty-quality figures of a comparison (its ``metrics["uncertainty"]``) as a table."""
    off_mm = quality.get("off_mm") or 1.0
    rows = [
        ("Spread at the sCT bone surface, median", format_number(quality.get("surface_spread_median_hu"), 1, "HU")),
        (
            "Spread at the sCT bone surface, 95th percentile",
            format_number(quality.get("surface_spread_p95_hu"), 1, "HU"),
        ),
        (
            f"AUROC: spread separating surface points > {format_number(off_mm, 1)} mm off (0.5 chance, 1 perfect)",
            format_number(quality.get("surface_auroc"), 3),
        ),
        (
            f"Surface points > {format_number(off_mm, 1)} mm off / measured",
            f"{quality.get('n_surface_off', '—')} / {quality.get('n_surface_points', '—')}",
        ),
        (
            "Spearman: spread vs |sCT − CT| in the body (0 none, 1 perfect)",
            format_number(quality.get("hu_spearman"), 3),
        ),
        ("Body voxels", str(quality.get("n_voxels", "—"))),
    ]
    return table(rows, ("Uncertainty quality", "Value"))


def uncertainty_block(metrics: Mapping[str, object], views: Sequence[Tuple[bytes, str]] = ()) -> str:
    """The spread section's body: its plain reading, the spread views and the uncertainty-quality table."""
    quality = metrics.get("uncertainty")
    parts = [
        paragraph(
            "The synthetic CT's spread (the standard deviation, in HU, of two passes of the model: the MRI as "
            "is and flipped along all axes) sampled on the same bone surface and seen from the same views as "
            "the deviation above, on a sequential scale from 0 HU. Bright where the model is unsure."
        )
    ]
    if isinstance(quality, Mapping):
        if quality.get("reading"):
            parts.append(f"<p><b>{escape(quality['reading'])}</b></p>")
    if views:
        parts.append(figures(views))
    if isinstance(quality, Mapping):
        parts.append(uncertainty_table(quality))
    return "".join(parts)


def comparison_report(
    metrics: Dict[str, object], images: Dict[str, bytes], *, title: str = "Synthetic CT vs reference CT"
) -> str:
    """The comparison page: verdict, metrics, per-direction and per-bone tables, pictures."""
    sections = [
        section("Summary", registration_grade(metrics) + clinical_bar(metrics) + metrics_table(metrics)),
        section(
            "Bone-surface distances per direction",
            direction_table(metrics)
            + paragraph(
                "Distances are signed, positive where a surface point lies outside the other bone, and weighted by "
                "the surface area each point stands for."
            ),
        ),
    ]
    if metrics.get("per_bone"):
        sections.append(section("Per bone", per_bone_table(metrics["per_bone"])))
    surface_views = [
        (images[k], caption)
        for k, caption in (
            ("surface_front", "sCT bone surface, front: signed distance to the CT bone (±2 mm)"),
            ("surface_side", "sCT bone surface, side"),
            ("surface_back", "sCT bone surface, back"),
        )
        if k in images
    ]
    if surface_views:
        sections.append(section("Synthetic bone surface coloured by deviation", figures(surface_views)))
    spread_views = [
        (images[k], caption)
        for k, caption in (
            ("spread_front", "sCT bone surface, front: spread of the sCT (HU)"),
            ("spread_side", "sCT bone surface, side: spread"),
            ("spread_back", "sCT bone surface, back: spread"),
        )
        if k in images
    ]
    if spread_views or metrics.get("uncertainty"):
        sections.append(section("Synthetic bone surface coloured by spread", uncertainty_block(metrics, spread_views)))
    slice_figures = [
        (images[k], caption)
        for k, caption in (
            ("checkerboard", "Checkerboard of CT and sCT"),
            ("difference", "Difference sCT - CT inside the body"),
        )
        if k in images
    ]
    if slice_figures:
        sections.append(section("Slices", "".join(figure(png, caption) for png, caption in slice_figures)))
    if "distance_histogram" in images:
        sections.append(
            section(
                "Distance histogram",
                '<div class="narrow">'
                + figure(images["distance_histogram"], "Signed surface distances, ±1 mm marked")
                + "</div>",
            )
        )
    settings = metrics.get("settings")
    if isinstance(settings, dict):
        sections.append(
            section("Settings", table([(k, format_number(v, 3)) for k, v in settings.items()], ("Setting", "Value")))
        )
    return page(title, sections, subtitle="Image metrics (SynthRAD 2023 definitions) and bone-surface deviation")
