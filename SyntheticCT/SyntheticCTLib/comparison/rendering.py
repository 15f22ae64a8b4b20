"""Pictures of a comparison, as PNG bytes: bone surfaces coloured by distance or spread, slices, a histogram.

Surfaces are rendered offscreen with VTK (world coordinates are LPS: the front view looks from
anterior, -y, the side view from the patient's left, +x, the back view from posterior, +y).
Slices and the histogram are drawn with matplotlib's Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from SyntheticCTLib.comparison.surfaces import DISTANCE_ARRAY, SPREAD_ARRAY, SurfaceDistances

logger = logging.getLogger(__name__)

VIEWS: Dict[str, Tuple[Tuple[float, float, float], str]] = {
    "front": ((0.0, -1.0, 0.0), "Front (anterior)"),
    "side": ((1.0, 0.0, 0.0), "Side (patient's left)"),
    "back": ((0.0, 1.0, 0.0), "Back (posterior)"),
}
"""View name -> (direction from the centre to the camera in LPS, caption)."""

# Cool-to-warm diverging map (Moreland): blue = inside the reference bone, red = outside.
_COOL = (0.230, 0.299, 0.754)
_WARM = (0.706, 0.016, 0.150)
_NEUTRAL = (0.865, 0.865, 0.865)


def diverging_lookup_table(range_mm: float = 2.0, n_colors: int = 256) -> vtk.vtkLookupTable:
    """A blue-white-red lookup table over ``[-range_mm, range_mm]`` (values beyond are clamped)."""
    ctf = vtk.vtkColorTransferFunction()
    ctf.SetColorSpaceToDiverging()
    ctf.AddRGBPoint(-range_mm, *_COOL)
    ctf.AddRGBPoint(0.0, *_NEUTRAL)
    ctf.AddRGBPoint(range_mm, *_WARM)
    table = vtk.vtkLookupTable()
    table.SetNumberOfTableValues(n_colors)
    table.SetRange(-range_mm, range_mm)
    for i in range(n_colors):
        value = -range_mm + 2 * range_mm * i / (n_colors - 1)
        table.SetTableValue(i, *ctf.GetColor(value), 1.0)
    table.Build()
    return table


# Viridis (matplotlib's), sampled at eleven points: dark purple (low) to yellow (high), perceptually uniform.
_VIRIDIS = (
    (0.267, 0.005, 0.329),
    (0.283, 0.141, 0.458),
    (0.254, 0.265, 0.530),
    (0.207, 0.372, 0.553),
    (0.164, 0.471, 0.558),
    (0.128, 0.567, 0.551),
    (0.135, 0.659, 0.518),
    (0.267, 0.749, 0.441),
    (0.478, 0.821, 0.318),
    (0.741, 0.873, 0.150),
    (0.993, 0.906, 0.144),
)


def sequential_lookup_table(high: float, low: float = 0.0, n_colors: int = 256) -> vtk.vtkLookupTable:
    """A viridis lookup table over ``[low, high]`` (values beyond are clamped; NaN grey)."""
    if not high > low:
        raise ValueError(f"The colour range must be increasing (got {low} to {high}).")
    ctf = vtk.vtkColorTransferFunction()
    for i, rgb in enumerate(_VIRIDIS):
        ctf.AddRGBPoint(low + (high - low) * i / (len(_VIRIDIS) - 1), *rgb)
    table = vtk.vtkLookupTable()
    table.SetNumberOfTableValues(n_colors)
    table.SetRange(low, high)
    for i in range(n_colors):
        table.SetTableValue(i, *ctf.GetColor(low + (high - low) * i / (n_colors - 1)), 1.0)
    table.SetNanColor(0.6, 0.6, 0.6, 1.0)
    table.Build()
    return table


def spread_range(values: np.ndarray) -> float:
    """The top of the spread's colour scale (HU): the 95th percentile of the finite values, rounded up to
    1, 2 or 5 times a power of ten (at least 1 HU)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    top = float(np.percentile(finite, 95)) if finite.size else 1.0
    top = max(top, 1.0)
    power = 10.0 ** np.floor(np.log10(top))
    for step in (1.0, 2.0, 5.0, 10.0):
        if top <= step * power + 1e-9:
            return float(step * power)
    return float(10 * power)


def _offscreen_window() -> vtk.vtkRenderWindow:
    """An offscreen render window; without a display on Linux, EGL is preferred over X."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    return window


def _png_from_window(window: vtk.vtkRenderWindow) -> bytes:
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.WriteToMemoryOn()
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return bytes(numpy_support.vtk_to_numpy(writer.GetResult()).tobytes())


def render_distance_views(
    surface: vtk.vtkPolyData,
    *,
    array: str = DISTANCE_ARRAY,
    range_mm: float = 2.0,
    views: Sequence[str] = ("front", "side", "back"),
    size: Tuple[int, int] = (800, 800),
    title: str = "Signed distance to the reference bone (mm)",
) -> Dict[str, bytes]:
    """Render ``surface`` coloured by its point array ``array`` from each of ``views``; PNG bytes."""
    table = diverging_lookup_table(range_mm)
    return _render_views(surface, array, table, views=views, size=size, title=title, label_format="%+.1f")


def render_spread_views(
    surface: vtk.vtkPolyData,
    *,
    array: str = SPREAD_ARRAY,
    range_hu: Optional[float] = None,
    views: Sequence[str] = ("front", "side", "back"),
    size: Tuple[int, int] = (800, 800),
    title: str = "Spread of the synthetic CT (HU)",
) -> Dict[str, bytes]:
    """Render ``surface`` coloured by its spread (``Spread_HU``) on a sequential map from 0 to ``range_hu``.

    The same views and camera as :func:`render_distance_views`, so the two pictures of a view match point
    for point. ``range_hu`` defaults to :func:`spread_range` of the array (its 95th percentile, rounded up).
    """
    values = surface.GetPointData().GetArray(array)
    if values is None:
        raise ValueError(f"The surface has no point array '{array}' to colour by.")
    top = spread_range(numpy_support.vtk_to_numpy(values)) if range_hu is None else float(range_hu)
    table = sequential_lookup_table(top)
    label_format = "%.1f" if top < 10 else "%.0f"
    return _render_views(surface, array, table, views=views, size=size, title=title, label_format=label_format)


def _render_views(
    surface: vtk.vtkPolyData,
    array: str,
    table: vtk.vtkLookupTable,
    *,
    views: Sequence[str],
    size: Tuple[int, int],
    title: str,
    label_format: str,
) -> Dict[str, bytes]:
    """Render ``surface`` coloured by ``array`` through ``table`` (with its scale bar) from each of ``views``."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"Unknown views {unknown}; choose from {sorted(VIEWS)}.")
    if surface.GetPointData().GetArray(array) is None:
        raise ValueError(f"The surface has no point array '{array}' to colour by.")
    low, high = table.GetRange()
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputData(surface)
    mapper.SetScalarModeToUsePointFieldData()
    mapper.SelectColorArray(array)
    mapper.SetLookupTable(table)
    mapper.SetScalarRange(low, high)
    mapper.UseLookupTableScalarRangeOn()
    mapper.ScalarVisibilityOn()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetInterpolationToGouraud()
    actor.GetProperty().SetSpecular(0.2)
    actor.GetProperty().SetSpecularPower(20)

    bar = vtk.vtkScalarBarActor()
    bar.SetLookupTable(table)
    bar.SetTitle(title)
    bar.SetNumberOfLabels(5)
    bar.SetLabelFormat(label_format)
    bar.SetOrientationToHorizontal()
    bar.SetTextPositionToPrecedeScalarBar()
    bar.SetPosition(0.1, 0.05)
    bar.SetPosition2(0.8, 0.9)
    bar.SetBarRatio(0.35)
    bar.SetUnconstrainedFontSize(True)
    for prop in (bar.GetTitleTextProperty(), bar.GetLabelTextProperty()):
        prop.SetColor(0.1, 0.1, 0.1)
        prop.SetFontSize(15)
        prop.ShadowOff()
        prop.BoldOff()
        prop.ItalicOff()

    caption = vtk.vtkTextActor()
    caption.GetTextProperty().SetColor(0.1, 0.1, 0.1)
    caption.GetTextProperty().SetFontSize(20)
    caption.SetPosition(12, size[1] - 34)

    bar_height = 0.17
    renderer = vtk.vtkRenderer()
    renderer.SetViewport(0.0, bar_height, 1.0, 1.0)
    renderer.SetBackground(1.0, 1.0, 1.0)
    renderer.AddActor(actor)
    legend = vtk.vtkRenderer()
    legend.SetViewport(0.0, 0.0, 1.0, bar_height)
    legend.SetBackground(1.0, 1.0, 1.0)
    legend.AddViewProp(bar)
    legend.AddViewProp(caption)
    caption.SetPosition(12, 8)
    window = _offscreen_window()
    window.SetSize(int(size[0]), int(size[1]))
    window.AddRenderer(renderer)
    window.AddRenderer(legend)

    bounds = np.array(surface.GetBounds(), dtype=float)
    centre = (bounds[0::2] + bounds[1::2]) / 2
    radius = max(1.0, float(np.linalg.norm(bounds[1::2] - bounds[0::2])) / 2)
    images: Dict[str, bytes] = {}
    try:
        for view in views:
            direction, label = VIEWS[view]
            camera = renderer.GetActiveCamera()
            camera.SetFocalPoint(*centre)
            camera.SetPosition(*(centre + 4 * radius * np.asarray(direction)))
            camera.SetViewUp(0.0, 0.0, 1.0)  # superior up
            renderer.ResetCamera()
            camera.Zoom(1.15)
            caption.SetInput(label)
            window.Render()
            images[view] = _png_from_window(window)
    finally:
        window.Finalize()
    return images


# ---------------------------------------------------------------------------------------------
# Slices and histogram (matplotlib)
# ---------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="white")
    return buffer.getvalue()


def mask_centre_index(mask: sitk.Image) -> Tuple[int, int, int]:
    """The (z, y, x) array index of the slices that cut most of ``mask`` (the grid centre when empty)."""
    array = sitk.GetArrayViewFromImage(mask) > 0
    if not array.any():
        return tuple(int(s // 2) for s in array.shape)
    return tuple(int(np.argmax(array.sum(axis=other))) for other in ((1, 2), (0, 2), (0, 1)))


def _orthogonal_slices(array: np.ndarray, centre: Sequence[int]):
    """The three planes through ``centre`` of a (z, y, x) array, each oriented for display."""
    z, y, x = (int(np.clip(c, 0, s - 1)) for c, s in zip(centre, array.shape))
    return {
        "axial": array[z],  # rows y (anterior up), columns x (patient left on the right)
        "coronal": np.flipud(array[:, y, :]),  # rows z (superior up), columns x
        "sagittal": np.flipud(array[:, :, x]),  # rows z (superior up), columns y
    }


def _aspects(image: sitk.Image) -> Dict[str, float]:
    sx, sy, sz = image.GetSpacing()
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}


def checkerboard_png(
    reference: sitk.Image,
    synthetic: sitk.Image,
    *,
    centre: Optional[Sequence[int]] = None,
    window: Tuple[float, float] = (-400.0, 1200.0),
    squares: int = 8,
) -> bytes:
    """Axial, coronal and sagittal checkerboards of the reference and synthetic CT (same grid)."""
    ref = sitk.GetArrayViewFromImage(reference).astype(np.float32)
    syn = sitk.GetArrayViewFromImage(synthetic).astype(np.float32)
    centre = centre if centre is not None else tuple(s // 2 for s in ref.shape)
    ref_slices, syn_slices = _orthogonal_slices(ref, centre), _orthogonal_slices(syn, centre)
    aspects = _aspects(reference)
    figure = _figure(15, 5.6)
    for i, name in enumerate(("axial", "coronal", "sagittal")):
        a, b = ref_slices[name], syn_slices[name]
        rows = (np.arange(a.shape[0]) * squares // max(1, a.shape[0]))[:, None]
        cols = (np.arange(a.shape[1]) * squares // max(1, a.shape[1]))[None, :]
        board = np.where((rows + cols) % 2 == 0, a, b)
        ax = figure.add_subplot(1, 3, i + 1)
        ax.imshow(board, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspects[name], interpolation="nearest")
        ax.set_title(f"{name}: checkerboard, CT / sCT")
        ax.set_axis_off()
    figure.suptitle(f"Checkerboard of reference CT and synthetic CT (window {window[0]:g} to {window[1]:g} HU)")
    figure.tight_layout()
    return _png(figure)


def difference_png(
    reference: sitk.Image,
    synthetic: sitk.Image,
    *,
    centre: Optional[Sequence[int]] = None,
    mask: Optional[sitk.Image] = None,
    limit_hu: float = 500.0,
) -> bytes:
    """Axial, coronal and sagittal maps of ``synthetic - reference`` (HU), outside ``mask`` blank."""
    ref = sitk.GetArrayViewFromImage(reference).astype(np.float32)
    diff = sitk.GetArrayViewFromImage(synthetic).astype(np.float32) - ref
    if mask is not None:
        diff = np.where(sitk.GetArrayViewFromImage(mask) > 0, diff, np.nan)
    centre = centre if centre is not None else tuple(s // 2 for s in ref.shape)
    slices = _orthogonal_slices(diff, centre)
    aspects = _aspects(reference)
    figure = _figure(15, 5.6)
    image = None
    for i, name in enumerate(("axial", "coronal", "sagittal")):
        ax = figure.add_subplot(1, 3, i + 1)
        ax.set_facecolor("black")
        image = ax.imshow(
            slices[name], cmap="RdBu_r", vmin=-limit_hu, vmax=limit_hu, aspect=aspects[name], interpolation="nearest"
        )
        ax.set_title(f"{name}: sCT - CT")
        ax.set_axis_off()
    figure.tight_layout(rect=(0, 0, 0.93, 0.94))
    bar_axes = figure.add_axes((0.94, 0.12, 0.015, 0.7))
    figure.colorbar(image, cax=bar_axes, label="HU")
    figure.suptitle("Difference synthetic CT - reference CT inside the body")
    return _png(figure)


def histogram_png(distances: SurfaceDistances, *, limit_mm: float = 5.0, bin_mm: float = 0.1) -> bytes:
    """Area-weighted histograms of both directions' signed distances, with the ±1 mm lines."""
    figure = _figure(9, 5)
    ax = figure.add_subplot(1, 1, 1)
    bins = np.arange(-limit_mm, limit_mm + bin_mm / 2, bin_mm)
    for values, weights, label, colour in (
        (distances.synthetic_distances, distances.synthetic_weights, "sCT surface → CT surface", "#b2182b"),
        (distances.reference_distances, distances.reference_weights, "CT surface → sCT surface", "#2166ac"),
    ):
        if values.size == 0:
            continue
        share = weights / weights.sum()
        ax.hist(
            np.clip(values, -limit_mm, limit_mm),
            bins=bins,
            weights=100 * share,
            histtype="step",
            lw=1.8,
            label=label,
            color=colour,
        )
    for x in (-1.0, 1.0):
        ax.axvline(x, color="black", ls="--", lw=1)
    ax.text(1.02, 0.97, "1 mm", transform=ax.get_xaxis_transform(), va="top", fontsize=9)
    ax.set_xlabel("Signed distance (mm), positive outside the other bone surface (values beyond the axis are clamped)")
    ax.set_ylabel("Share of surface area (%) per bin")
    sym = distances.symmetric
    ax.set_title(
        f"Bone-surface distances: mean {sym.mean_abs_mm:.2f} mm, p95 {sym.p95_mm:.2f} mm, "
        f"{100 * sym.within_1mm:.1f}% within 1 mm"
    )
    ax.legend(loc="upper left")
    figure.tight_layout()
    return _png(figure)
