"""Case and evaluation reports: self-contained HTML pages (every picture embedded, nothing fetched).

- :func:`write_demo_report` - one case of the demo: the case and the model (with its card), the
  version and parameters of each step, orthogonal slices of MRI, sCT, CT and their difference in a
  fixed HU window, the checkerboard overlay, 3D bone surfaces coloured by deviation, the distance
  histogram with the 1 mm line, the metrics beside the baselines (per bone where available) and the
  registration summary against the known transform.
- :func:`write_index` - many cases (``syntheticct evaluate``): links to the per-case reports, a
  summary table per method and box plots.

Pictures are PNGs embedded as ``data:`` URIs; the pages load nothing from the network. Every page
carries the not-for-diagnostic-use line.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from . import NOT_FOR_DIAGNOSTIC_USE, __version__
from .io import atomic_output
from .progress import ProgressCallback, no_progress

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger(__name__)

HU_WINDOW = (-600.0, 1400.0)
"""The fixed display window of the CT and sCT slices (level 400 HU, width 2000 HU)."""
DIFFERENCE_WINDOW_HU = 500.0
"""The difference map (sCT - CT) is shown on ±this, on a diverging map."""

# (key, label, unit, better): better is "lower", "higher" or "zero" (closest to zero).
KEY_METRICS: Tuple[Tuple[str, str, str, str], ...] = (
    ("surface_mean_mm", "Bone surface mean distance", "mm", "lower"),
    ("surface_median_mm", "Bone surface median distance", "mm", "lower"),
    ("surface_rms_mm", "Bone surface RMS distance", "mm", "lower"),
    ("surface_p95_mm", "Bone surface p95 distance", "mm", "lower"),
    ("surface_max_mm", "Bone surface max distance (Hausdorff)", "mm", "lower"),
    ("surface_within_1mm", "Surface points within 1 mm", "%", "higher"),
    ("surface_within_2mm", "Surface points within 2 mm", "%", "higher"),
    ("bone_dice", "Bone Dice", "", "higher"),
    ("mae_hu", "MAE (body)", "HU", "lower"),
    ("me_hu", "ME (body)", "HU", "zero"),
    ("psnr_db", "PSNR", "dB", "higher"),
    ("ssim", "SSIM", "", "higher"),
)
SUMMARY_METRICS = ("surface_mean_mm", "surface_p95_mm", "bone_dice", "mae_hu")
"""The key figures of a summary: bone-surface mean and p95, bone Dice and MAE."""

CSS = """
:root { --ink:#1d2733; --muted:#5b6b7c; --line:#dfe5ec; --band:#15324d; --accent:#2a7ab8; --warn:#b3261e;
        --good:#1b7f3b; --bg:#f6f8fa; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:var(--band); color:#fff; padding:18px 32px; }
header h1 { margin:0 0 4px; font-size:22px; font-weight:600; }
header .sub { color:#c9d6e3; font-size:13px; }
.warning { display:inline-block; margin-top:8px; padding:3px 10px; border-radius:4px; background:var(--warn);
           color:#fff; font-weight:600; font-size:13px; letter-spacing:.02em; }
main { max-width:1180px; margin:0 auto; padding:8px 28px 40px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:16px 22px; margin:18px 0; }
h2 { font-size:18px; margin:0 0 10px; color:var(--band); }
h3 { font-size:15px; margin:14px 0 6px; color:var(--muted); }
table { border-collapse:collapse; margin:6px 0; font-size:14px; }
th, td { padding:4px 12px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:#eef2f6; font-weight:600; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.best { font-weight:700; color:var(--good); }
.kv th { width:220px; background:none; color:var(--muted); font-weight:500; }
.figure { margin:8px 0 14px; }
.figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; background:#fff; }
.figure .caption { color:var(--muted); font-size:13px; }
.row { display:flex; flex-wrap:wrap; gap:16px; }
.row .figure { flex:1 1 320px; }
.tiles { display:grid; grid-template-columns:repeat(auto-fit,minmax(300px,1fr)); gap:12px; }
.pass { color:var(--good); font-weight:600; } .fail { color:var(--warn); font-weight:600; }
code, .mono { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:12px; }
a { color:var(--accent); }
"""


# -- small HTML pieces ---------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_value(value: Any, unit: str = "", digits: int = 3) -> str:
    """A number for a table: fractions shown as %, '-' for missing, a few significant digits otherwise."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)) and unit != "%":
        return str(int(value))
    if isinstance(value, (float, np.floating, int)):
        v = float(value)
        if unit == "%":
            return f"{100.0 * v:.1f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 10:
            return f"{v:.2f}"
        return f"{v:.{digits}f}"
    return str(value)


def _kv_table(rows: Iterable[Tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _nested(value: Any) -> str:
    """Render a JSON-like value as HTML (nested dicts as small key/value tables)."""
    if isinstance(value, Mapping):
        if not value:
            return "-"
        return _kv_table((k, _nested(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (Mapping, list, tuple)) for v in value):
            return _esc(", ".join(format_value(v) if isinstance(v, float) else str(v) for v in value))
        return "<br>".join(_nested(v) for v in value)
    if isinstance(value, float):
        return _esc(format_value(value))
    return _esc(value)


def _figure(data_uri: str, caption: str, alt: str) -> str:
    return (
        f'<div class="figure"><img src="{data_uri}" alt="{_esc(alt)}"><div class="caption">{_esc(caption)}</div></div>'
    )


def png_data_uri(png: Union[bytes, PathLike]) -> str:
    """A ``data:image/png;base64,...`` URI for PNG bytes or a PNG file."""
    import base64

    data = png if isinstance(png, (bytes, bytearray)) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode("ascii")


def _page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{_esc(title)}</h1><div class="sub">{_esc(subtitle)}</div>'
        f'<div class="warning">{_esc(NOT_FOR_DIAGNOSTIC_USE)}</div></header>'
        "<main>" + "".join(sections) + "</main>"
        f"<footer>SyntheticCT {_esc(__version__)} &middot; {_esc(NOT_FOR_DIAGNOSTIC_USE)}</footer>"
        "</body></html>\n"
    )


def _section(title: str, body: str, anchor: str = "") -> str:
    ident = f' id="{_esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{_esc(title)}</h2>{body}</section>"


def _write_text(path: Path, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# -- figures -------------------------------------------------------------------------------------------


def _figure_png(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight", facecolor="white")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            matplotlib.use("Agg", force=False)
        except Exception:  # noqa: BLE001 - keep whatever backend the host application set
            pass
    import matplotlib.pyplot as plt

    return plt


def slice_point(image: sitk.Image, *, threshold: float = 200.0) -> Tuple[int, int, int]:
    """A voxel index (x, y, z) to slice through: the centroid of voxels above ``threshold`` (bone), else the centre."""
    array = sitk.GetArrayViewFromImage(image)
    idx = np.argwhere(array > threshold)
    if len(idx) == 0:
        return tuple(int(s // 2) for s in image.GetSize())
    z, y, x = np.round(idx.mean(axis=0)).astype(int)
    return int(x), int(y), int(z)


def _orthogonal(array: np.ndarray, spacing: Sequence[float], point: Sequence[int]):
    """Axial, coronal and sagittal slices with their mm extents and origins for ``imshow``."""
    sx, sy, sz = spacing
    nz, ny, nx = array.shape
    x, y, z = point
    return (
        (array[z], [0, nx * sx, ny * sy, 0], "upper", "axial"),
        (array[:, y, :], [0, nx * sx, 0, nz * sz], "lower", "coronal"),
        (array[:, :, x], [0, ny * sy, 0, nz * sz], "lower", "sagittal"),
    )


def slices_png(
    mri: sitk.Image,
    sct: sitk.Image,
    ct: sitk.Image,
    *,
    point: Optional[Sequence[int]] = None,
    hu_window: Tuple[float, float] = HU_WINDOW,
    difference_window: float = DIFFERENCE_WINDOW_HU,
    dpi: int = 80,
) -> bytes:
    """One figure: three orthogonal slices each of the MRI, sCT, CT and sCT - CT, all on the CT's grid.

    The sCT and CT share the fixed ``hu_window``; the difference is on ±``difference_window`` HU.
    """
    plt = _pyplot()
    spacing = ct.GetSpacing()
    point = tuple(point) if point is not None else slice_point(ct)
    mri_a = sitk.GetArrayFromImage(mri).astype(np.float32)
    sct_a = sitk.GetArrayFromImage(sct).astype(np.float32)
    ct_a = sitk.GetArrayFromImage(ct).astype(np.float32)
    body = ct_a > -400
    lo, hi = np.percentile(mri_a[body] if body.any() else mri_a, [1.0, 99.5])
    rows = (
        ("MRI (echo 1)", mri_a, "gray", (float(lo), float(max(hi, lo + 1e-6))), "a.u."),
        ("Synthetic CT", sct_a, "gray", hu_window, "HU"),
        ("CT", ct_a, "gray", hu_window, "HU"),
        ("sCT \u2212 CT", sct_a - ct_a, "RdBu_r", (-difference_window, difference_window), "HU"),
    )
    fig, axes = plt.subplots(4, 3, figsize=(10.5, 12.5), dpi=dpi, constrained_layout=True)
    for r, (label, array, cmap, (vmin, vmax), unit) in enumerate(rows):
        image = None
        for c, (plane, extent, origin, name) in enumerate(_orthogonal(array, spacing, point)):
            ax = axes[r, c]
            image = ax.imshow(
                plane, cmap=cmap, vmin=vmin, vmax=vmax, extent=extent, origin=origin, interpolation="bilinear"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=12)
            if c == 0:
                ax.set_ylabel(label, fontsize=12)
        bar = fig.colorbar(image, ax=list(axes[r, :]), shrink=0.85, pad=0.01)
        bar.set_label(unit)
    fig.suptitle(
        f"Slices through voxel {point} of the CT grid; HU window [{hu_window[0]:g}, {hu_window[1]:g}], "
        f"difference \u00b1{difference_window:g} HU",
        fontsize=11,
    )
    return _figure_png(fig)


def histogram_png(distances: np.ndarray, *, limit_mm: float = 1.0, dpi: int = 80) -> bytes:
    """The histogram of signed surface distances (mm) with lines at ±``limit_mm`` (the clinical bar)."""
    plt = _pyplot()
    d = np.asarray(distances, dtype=float)
    d = d[np.isfinite(d)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=dpi, constrained_layout=True)
    span = max(2.0 * limit_mm, float(np.percentile(np.abs(d), 99.5)) if d.size else 2.0)
    ax.hist(np.clip(d, -span, span), bins=80, range=(-span, span), color="#2a7ab8", alpha=0.85)
    for x in (-limit_mm, limit_mm):
        ax.axvline(x, color="#b3261e", linestyle="--", linewidth=1.5)
    within = float(np.mean(np.abs(d) <= limit_mm)) if d.size else float("nan")
    ax.set_xlabel("signed distance, synthetic to reference bone surface (mm, outside +)")
    ax.set_ylabel("surface points")
    ax.set_title(f"{100 * within:.1f}% of points within \u00b1{limit_mm:g} mm", fontsize=11)
    return _figure_png(fig)


def box_plots_png(
    values: Mapping[str, Mapping[str, Sequence[float]]],
    metric_keys: Sequence[str] = SUMMARY_METRICS,
    *,
    dpi: int = 80,
) -> bytes:
    """Box plots, one panel per metric, one box per method: ``values[method][metric] -> per-case values``."""
    plt = _pyplot()
    labels = {k: (label, unit) for k, label, unit, _ in KEY_METRICS}
    methods = list(values)
    fig, axes = plt.subplots(
        1, len(metric_keys), figsize=(3.4 * len(metric_keys), 3.8), dpi=dpi, constrained_layout=True, squeeze=False
    )
    colours = ["#2a7ab8", "#e08a2c", "#7d8a96", "#4caf50", "#9c27b0"]
    for ax, key in zip(axes[0], metric_keys):
        data = [np.asarray([v for v in values[m].get(key, []) if v is not None and math.isfinite(v)]) for m in methods]
        scale = 100.0 if labels.get(key, ("", ""))[1] == "%" else 1.0
        parts = ax.boxplot([d * scale for d in data], patch_artist=True, widths=0.6)
        for box, colour in zip(parts["boxes"], colours * 3):
            box.set_facecolor(colour)
            box.set_alpha(0.75)
        ax.set_xticks(range(1, len(methods) + 1))
        ax.set_xticklabels(methods, rotation=20, fontsize=9)
        label, unit = labels.get(key, (key, ""))
        ax.set_title(f"{label}" + (f" ({unit})" if unit else ""), fontsize=10)
        if key.startswith("surface_") and key.endswith("_mm"):
            ax.axhline(1.0, color="#b3261e", linestyle="--", linewidth=1)
    return _figure_png(fig)


# -- tables --------------------------------------------------------------------------------------------


def _best(values: Sequence[Optional[float]], better: str) -> Optional[int]:
    finite = [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(finite) < 2:
        return None
    if better == "lower":
        return min(finite, key=lambda t: t[1])[0]
    if better == "higher":
        return max(finite, key=lambda t: t[1])[0]
    return min(finite, key=lambda t: abs(t[1]))[0]


def metrics_table(
    columns: Mapping[str, Mapping[str, Any]], keys: Sequence[Tuple[str, str, str, str]] = KEY_METRICS
) -> str:
    """A table of the key metrics, one column per method (``columns[method][key]``), the best in bold."""
    names = list(columns)
    head = "<tr><th>metric</th><th>unit</th>" + "".join(f"<th>{_esc(n)}</th>" for n in names) + "</tr>"
    rows = []
    for key, label, unit, better in keys:
        values = [columns[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        best = _best(values, better)
        cells = "".join(
            f'<td class="num{" best" if i == best else ""}" data-key="{_esc(key)}">{_esc(format_value(v, unit))}</td>'
            for i, v in enumerate(values)
        )
        rows.append(f"<tr><td>{_esc(label)}</td><td>{_esc(unit)}</td>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def per_bone_table(per_bone: Sequence[Mapping[str, Any]]) -> str:
    """A table with one row per bone (the comparison's ``per_bone`` list), columns as found."""
    if not per_bone:
        return "<p>No per-bone figures (no bone labels).</p>"
    keys: List[str] = []
    for row in per_bone:
        for k, v in row.items():
            if k not in keys and not isinstance(v, (Mapping, list, tuple)):
                keys.append(k)
    units = {k: u for k, _, u, _ in KEY_METRICS}
    head = "<tr>" + "".join(f"<th>{_esc(k)}</th>" for k in keys) + "</tr>"
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{_esc(format_value(row.get(k), units.get(k, "")))}</td>' for k in keys)
        + "</tr>"
        for row in per_bone
    )
    return f"<table>{head}{body}</table>"


def _vector(v: Optional[Sequence[float]], digits: int = 2) -> str:
    if v is None:
        return "-"
    return "(" + ", ".join(f"{float(x):+.{digits}f}" for x in v) + ")"


# -- the demo report -----------------------------------------------------------------------------------


def _comparison_pictures(comparison_dir: Optional[Path]) -> Dict[str, Path]:
    """The PNG pictures that the comparison wrote (``write_comparison``), by kind."""
    found: Dict[str, Path] = {}
    if comparison_dir is None or not Path(comparison_dir).is_dir():
        return found
    for png in sorted(Path(comparison_dir).rglob("*.png")):
        name = png.stem.lower()
        if "checker" in name:
            found.setdefault("checkerboard", png)
        elif "hist" in name:
            found.setdefault("histogram", png)
        elif "diff" in name:
            found.setdefault("difference", png)
        elif any(t in name for t in ("surface", "render", "front", "side", "back", "deviation", "distance")):
            found.setdefault(f"surface:{png.stem}", png)
    return found


def _synthetic_distances(comparison: Any) -> Optional[np.ndarray]:
    """The signed synthetic-to-reference distances of a ComparisonResult, wherever it keeps them."""
    for owner in (comparison, getattr(comparison, "surfaces", None), getattr(comparison, "distances", None)):
        if owner is None:
            continue
        for attr in ("synthetic_to_reference", "signed_synthetic_to_reference", "forward", "a_to_b"):
            value = getattr(owner, attr, None)
            if value is not None:
                return np.asarray(value, dtype=float)
    return None


def write_demo_report(
    path: PathLike,
    metrics: Mapping[str, Any],
    *,
    mri: sitk.Image,
    sct: sitk.Image,
    ct: sitk.Image,
    transform: Optional[sitk.Transform] = None,
    comparison: Any = None,
    comparison_dir: Optional[PathLike] = None,
    images_dir: Optional[PathLike] = None,
    model_card: Optional[Mapping[str, Any]] = None,
    progress: Optional[ProgressCallback] = None,
) -> Path:
    """Write the demo's ``report.html``: one self-contained page for a researcher reviewing the case.

    Parameters
    ----------
    path
        The HTML file to write (atomically).
    metrics
        The demo's ``metrics.json`` content (``run_demo`` builds it): case, model, registration,
        metrics, baselines, steps.
    mri, sct
        Echo 1 of the MRI and the synthetic CT, in their own (MRI) space.
    ct
        The reference CT; the MRI and sCT are resampled onto its grid through ``transform``
        (fixed-to-moving points, ITK convention) for the slices.
    comparison, comparison_dir
        The ComparisonResult and the folder ``write_comparison`` wrote (its renderings are embedded).
    images_dir
        Where to save the report's own PNGs beside the page (optional).
    model_card
        The model's ``model.json``.
    """
    from .geometry import resample_like

    path = Path(path)
    report = progress or no_progress
    images = Path(images_dir) if images_dir is not None else None
    comparison_dir = Path(comparison_dir) if comparison_dir is not None else None

    report(0.05, "report", "slices")
    mri_on_ct = resample_like(mri, ct, transform=transform, default_value=0.0, pixel_type=sitk.sitkFloat32)
    sct_on_ct = resample_like(sct, ct, transform=transform, default_value=-1000.0, pixel_type=sitk.sitkFloat32)
    slices = slices_png(mri_on_ct, sct_on_ct, ct)
    pictures: Dict[str, bytes] = {"slices": slices}
    found = _comparison_pictures(comparison_dir)
    report(0.5, "report", "histogram")
    distances = _synthetic_distances(comparison)
    if distances is not None and distances.size:
        pictures["histogram"] = histogram_png(distances)
    elif "histogram" in found:
        pictures["histogram"] = found["histogram"].read_bytes()
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        for name in ("slices", "histogram"):
            if name in pictures:
                with atomic_output(images / f"{name}.png") as tmp:
                    tmp.write_bytes(pictures[name])

    report(0.7, "report", "page")
    sections = [
        _case_section(metrics),
        _model_section(model_card or {}, metrics.get("model", {})),
        _metrics_section(metrics),
        _registration_section(metrics.get("registration", {}), metrics.get("true_transform", {})),
        _section(
            "Slices: MRI, synthetic CT, CT and difference",
            _figure(
                png_data_uri(slices),
                "Three orthogonal slices, on the CT's grid, after registration; "
                "CT and sCT in a fixed window, difference sCT \u2212 CT on a diverging map.",
                "orthogonal slices",
            ),
            "slices",
        ),
    ]
    overlay = []
    if "checkerboard" in found:
        overlay.append(
            _figure(
                png_data_uri(found["checkerboard"]), "Checkerboard of CT and registered sCT.", "checkerboard overlay"
            )
        )
    if "difference" in found:
        overlay.append(
            _figure(png_data_uri(found["difference"]), "Difference map from the comparison.", "difference map")
        )
    if overlay:
        sections.append(_section("Checkerboard overlay", f'<div class="row">{"".join(overlay)}</div>', "overlay"))
    surfaces = [(k.split(":", 1)[1], p) for k, p in found.items() if k.startswith("surface:")]
    if surfaces:
        tiles = "".join(_figure(png_data_uri(p), name.replace("_", " "), name) for name, p in surfaces)
        sections.append(
            _section(
                "Bone surfaces coloured by deviation",
                "<p>The synthetic CT's bone surface, coloured by its signed distance to the CT's bone surface "
                "(outside positive; \u00b12 mm diverging map).</p>" + f'<div class="tiles">{tiles}</div>',
                "surfaces",
            )
        )
    if "histogram" in pictures:
        sections.append(
            _section(
                "Surface distance histogram",
                _figure(
                    png_data_uri(pictures["histogram"]),
                    "Dashed lines: \u00b11 mm, the clinical bar.",
                    "distance histogram",
                ),
                "histogram",
            )
        )
    sections.append(_steps_section(metrics))
    seed = metrics.get("seed")
    page = _page(
        "SyntheticCT demo report",
        f"Phantom case, seed {seed} \u2014 synthetic CT, registration to CT and bone-surface deviation",
        sections,
    )
    _write_text(path, page)
    report(1.0, "report", "written")
    return path


def _case_section(metrics: Mapping[str, Any]) -> str:
    case = metrics.get("case", {})
    m = metrics.get("metrics", {})
    reg = metrics.get("registration", {})
    tre = reg.get("tre_bone", {})
    verdict = m.get("surface_mean_mm")
    rows = [
        ("Case", f"digital phantom, seed {_esc(metrics.get('seed'))}"),
        ("Phantom grid", f"{_esc(case.get('phantom_size'))} voxels at {_esc(case.get('phantom_spacing_mm'))} mm"),
        ("CT grid", f"{_esc(case.get('ct_size'))} voxels at {_esc(_vector(case.get('ct_spacing_mm')))} mm"),
        ("MRI echo times", _esc(case.get("echo_times_ms")) + " ms"),
    ]
    if verdict is not None:
        ok = float(verdict) < 1.0
        rows.append(
            (
                "Bone-surface mean distance",
                f'<span class="{"pass" if ok else "fail"}">{_esc(format_value(verdict))} mm</span> '
                f"({'below' if ok else 'above'} the 1 mm clinical bar)",
            )
        )
    if tre:
        rows.append(
            (
                "Registration error (TRE, bone)",
                f"{format_value(tre.get('mean_mm'))} mm mean, {format_value(tre.get('max_mm'))} mm max",
            )
        )
    params = case.get("parameters")
    body = _kv_table(rows)
    if params:
        body += f"<details><summary>All phantom parameters</summary>{_nested(params)}</details>"
    return _section("Case", body, "case")


def _model_section(card: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    card = dict(card) if card else dict(summary)
    arch = card.get("architecture", {})
    inputs = card.get("inputs", [])
    rows = [
        ("Name", _esc(card.get("name", summary.get("name", "")))),
        ("Version", _esc(card.get("version", summary.get("version", "")))),
        ("Description", _esc(card.get("description", ""))),
        ("Intended use", _esc(card.get("intended_use", ""))),
        ("Diagnostic use", _esc(card.get("diagnostic_use", NOT_FOR_DIAGNOSTIC_USE))),
        ("License", _esc(card.get("license", ""))),
    ]
    if arch:
        rows.append(
            (
                "Architecture",
                f'{_esc(arch.get("name"))} <span class="mono">{_esc(json.dumps(arch.get("kwargs", {})))}</span>',
            )
        )
    if inputs:
        rows.append(("Inputs", _esc("; ".join(str(i.get("label") or i.get("name")) for i in inputs))))
    if card.get("spacing_mm"):
        rows.append(("Working spacing", f"{_esc(_vector(card.get('spacing_mm')))} mm"))
    if summary.get("source"):
        rows.append(("Loaded from", f'<span class="mono">{_esc(summary.get("source"))}</span>'))
    body = _kv_table(rows)
    training = card.get("training_data")
    if training:
        body += f"<h3>Training data</h3>{_nested(training)}"
    validation = card.get("validation_metrics")
    if validation:
        body += f"<h3>Validated metrics (from the model card)</h3>{_nested(validation)}"
    return _section("Model", body, "model")


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    columns = {"model": metrics.get("metrics", {})}
    for name, values in (metrics.get("baselines") or {}).items():
        columns[f"baseline: {name}"] = values
    body = (
        "<p>sCT against the CT, after registration, inside the body; the baselines go through the same "
        "comparison and the same registration transform. Best value in bold.</p>" + metrics_table(columns)
    )
    per_bone = metrics.get("metrics", {}).get("per_bone") or []
    body += f"<h3>Per bone (model)</h3>{per_bone_table(per_bone)}"
    return _section("Metrics", body, "metrics")


def _registration_section(reg: Mapping[str, Any], true: Mapping[str, Any]) -> str:
    recovered = reg.get("recovered", {})
    tre = reg.get("tre_bone", {})
    rows = [
        ("Mode / metric", f"{_esc(reg.get('mode', ''))} / {_esc(reg.get('metric', ''))}"),
        ("Final metric value", _esc(format_value(reg.get("metric_value"), digits=4))),
        ("Iterations", _esc(reg.get("iterations", "-"))),
        ("Time", f"{_esc(format_value(reg.get('elapsed_s')))} s"),
    ]
    table = (
        "<table><tr><th></th><th>rotation x, y, z (deg)</th><th>translation x, y, z (mm)</th></tr>"
        f'<tr><td>true (recorded)</td><td class="num">{_esc(_vector(true.get("rotation_deg")))}</td>'
        f'<td class="num">{_esc(_vector(true.get("translation_mm")))}</td></tr>'
        f'<tr><td>recovered</td><td class="num">{_esc(_vector(recovered.get("rotation_deg")))}</td>'
        f'<td class="num">{_esc(_vector(recovered.get("translation_mm")))}</td></tr></table>'
    )
    errors = [
        ("Rotation error", f"{format_value(reg.get('rotation_error_deg'))} deg"),
        ("Translation error (at centre)", f"{format_value(reg.get('translation_error_mm'))} mm"),
    ]
    if tre:
        errors.append(
            (
                "TRE over bone voxels",
                f"mean {format_value(tre.get('mean_mm'))} mm, p95 {format_value(tre.get('p95_mm'))} mm, "
                f"max {format_value(tre.get('max_mm'))} mm ({_esc(tre.get('n_points'))} points)",
            )
        )
    body = (
        _kv_table(rows)
        + "<h3>Recovered versus true transform</h3>"
        + "<p>Both map points of the CT (fixed) to the MRI/sCT space (moving), about the same centre "
        + f"{_esc(_vector(true.get('center_mm'), 1))} mm (ITK Euler angles).</p>"
        + table
        + _kv_table((k, _esc(v)) for k, v in errors)
    )
    return _section("Registration", body, "registration")


def _steps_section(metrics: Mapping[str, Any]) -> str:
    steps = metrics.get("steps") or []
    rows = "".join(
        f'<tr><td>{_esc(s.get("name"))}</td><td class="mono">{_esc(s.get("component"))}</td>'
        f'<td>{_esc(s.get("version"))}</td><td class="num">{_esc(format_value(s.get("seconds")))}</td>'
        f'<td class="mono">{_esc(json.dumps(s.get("parameters", {})))}</td></tr>'
        for s in steps
    )
    versions = metrics.get("versions") or {}
    body = (
        "<table><tr><th>step</th><th>component</th><th>version</th><th>time (s)</th><th>parameters</th></tr>"
        f"{rows}</table>"
    )
    if versions:
        body += "<h3>Software</h3>" + _kv_table((k, _esc(v)) for k, v in versions.items())
    return _section("Steps, versions and parameters", body, "steps")


# -- the evaluation index --------------------------------------------------------------------------------


def _href(report: Optional[PathLike], base: Path) -> Optional[str]:
    if report is None:
        return None
    text = str(report)
    if "://" in text:
        return text
    target = Path(report)
    if target.is_absolute():
        try:
            target = Path(os.path.relpath(target, base))
        except ValueError:  # another drive on Windows
            return target.as_uri()
    return target.as_posix()


def write_index(
    path: PathLike,
    cases: Sequence[Mapping[str, Any]],
    *,
    title: str = "SyntheticCT evaluation",
    model_card: Optional[Mapping[str, Any]] = None,
    metric_keys: Sequence[str] = SUMMARY_METRICS,
) -> Path:
    """Write the evaluation index: links to per-case reports, a summary table per method, box plots.

    Parameters
    ----------
    path
        The HTML file to write (atomically), e.g. ``OUT_DIR/index.html``.
    cases
        One mapping per case: ``{"name": str, "report": path or None, "metrics": {method: {key: value}}}``,
        where ``method`` is e.g. ``"model"``, ``"inversion"``, ``"bulk density"`` and the keys are the
        comparison's (``surface_mean_mm``, ``surface_p95_mm``, ``bone_dice``, ``mae_hu``, ...). A
        ``report`` path is linked relative to the index's folder.
    title
        The page title.
    model_card
        The evaluated model's ``model.json`` (shown at the top), optional.
    metric_keys
        The metrics of the summary table and the box plots.
    """
    path = Path(path)
    base = path.parent
    methods: List[str] = []
    for case in cases:
        for m in case.get("metrics", {}):
            if m not in methods:
                methods.append(m)
    labels = {k: (label, unit, better) for k, label, unit, better in KEY_METRICS}
    values: Dict[str, Dict[str, List[float]]] = {m: {k: [] for k in metric_keys} for m in methods}
    for case in cases:
        for m, mm in case.get("metrics", {}).items():
            for k in metric_keys:
                v = mm.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    values[m][k].append(float(v))

    # Summary: mean ± sd and median per method.
    head = "<tr><th>metric</th>" + "".join(f"<th>{_esc(m)}</th>" for m in methods) + "</tr>"
    rows = []
    for k in metric_keys:
        label, unit, better = labels.get(k, (k, "", "lower"))
        means = [float(np.mean(values[m][k])) if values[m][k] else None for m in methods]
        best = _best(means, better)
        cells = []
        for i, m in enumerate(methods):
            v = values[m][k]
            if not v:
                cells.append('<td class="num">-</td>')
                continue
            text = (
                f"{format_value(float(np.mean(v)), unit)} \u00b1 {format_value(float(np.std(v)), unit)} "
                f"(median {format_value(float(np.median(v)), unit)})"
            )
            cells.append(f'<td class="num{" best" if i == best else ""}">{_esc(text)}</td>')
        rows.append(f"<tr><td>{_esc(label)}{(' (' + _esc(unit) + ')') if unit else ''}</td>{''.join(cells)}</tr>")
    summary = (
        f"<p>{len(cases)} cases; mean \u00b1 SD (median). Best mean in bold.</p><table>{head}{''.join(rows)}</table>"
    )

    # Per case: link and the key figures of each method.
    head = (
        "<tr><th>case</th>"
        + "".join(f"<th>{_esc(m)}: {_esc(labels.get(k, (k, '', ''))[0])}</th>" for m in methods for k in metric_keys)
        + "</tr>"
    )
    case_rows = []
    for case in cases:
        name = _esc(case.get("name", ""))
        href = _href(case.get("report"), base)
        link = f'<a href="{_esc(href)}">{name}</a>' if href else name
        cells = "".join(
            f'<td class="num">{_esc(format_value(case.get("metrics", {}).get(m, {}).get(k), labels.get(k, ("", ""))[1]))}</td>'
            for m in methods
            for k in metric_keys
        )
        case_rows.append(f"<tr><td>{link}</td>{cells}</tr>")
    per_case = f'<div style="overflow-x:auto"><table>{head}{"".join(case_rows)}</table></div>'

    sections = []
    if model_card:
        sections.append(_model_section(model_card, {}))
    sections.append(_section("Summary", summary, "summary"))
    if methods and cases:
        plots = box_plots_png(values, metric_keys)
        sections.append(
            _section(
                "Distributions",
                _figure(png_data_uri(plots), "Per-case values; dashed line: 1 mm.", "box plots"),
                "boxplots",
            )
        )
    sections.append(_section("Cases", per_case, "cases"))
    page = _page(title, f"{len(cases)} cases, methods: {', '.join(methods)}", sections)
    return _write_text(path, page)


__all__ = [
    "DIFFERENCE_WINDOW_HU",
    "HU_WINDOW",
    "KEY_METRICS",
    "SUMMARY_METRICS",
    "box_plots_png",
    "format_value",
    "histogram_png",
    "metrics_table",
    "per_bone_table",
    "png_data_uri",
    "slice_point",
    "slices_png",
    "write_demo_report",
    "write_index",
]
