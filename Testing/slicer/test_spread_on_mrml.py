"""The sCT's spread on the comparison's bone-surface model, on a real MRML scene (slicer-core).

Known truth: the spread map is planted as a linear function of the LPS position, f(q) = 200 + a . q,
on the sCT's grid (the sCT is the CT itself, so no transform): the model node's ``Spread_HU`` at each
of its points (RAS in the scene, LPS in the file) is f at that point, beside the ``SignedDistance_mm``
of the same file; the display switches between the two arrays with their own colour tables and ranges.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.comparison.compare import compare, write_comparison
from SyntheticCTLib.phantom import make_phantom

SLOPE = np.array([0.5, -0.25, 1.0])  # HU per mm along L, P, S


def _planted(ct: sitk.Image) -> sitk.Image:
    size = ct.GetSize()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    world = np.asarray(ct.GetOrigin()) + (index * np.asarray(ct.GetSpacing())) @ np.reshape(ct.GetDirection(), (3, 3)).T
    values = (200.0 + world @ SLOPE).reshape(size).transpose(2, 1, 0)
    spread = sitk.GetImageFromArray(values.astype(np.float32))
    spread.CopyInformation(ct)
    return spread


@pytest.fixture(scope="module")
def comparison_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spread")
    phantom = make_phantom(0, size=(48, 48, 32), spacing=3.0)
    ct = sitk.Cast(phantom.ct, sitk.sitkFloat32)
    spread = _planted(ct)
    assert sitk.GetArrayViewFromImage(spread).min() > 0
    result = compare(ct, ct, spread=spread)
    write_comparison(result, folder / "comparison")
    sitk.WriteImage(ct, str(folder / "ct.nrrd"))
    return folder


def test_the_surface_model_carries_deviation_and_spread_and_the_display_switches(
    scene, slicer_modules, comparison_folder
):
    import slicer

    _app, _sct_module, reg = slicer_modules
    logic = reg.SyntheticCTRegistrationLogic()
    p = logic.getParameterNode()
    ct = slicer.modules.volumes.logic().AddArchetypeVolume(str(comparison_folder / "ct.nrrd"), "CT", 0)
    outcome = logic.loadComparison(comparison_folder / "comparison", ct, p)
    model = p.syntheticSurface
    assert logic.hasSpread(model) and not logic.hasSpread(p.referenceSurface)

    # Both arrays on the one model node, one value per point; the spread is f at each point.
    spread = slicer.util.arrayFromModelPointData(model, reg.SPREAD_ARRAY)
    distance = slicer.util.arrayFromModelPointData(model, reg.DISTANCE_ARRAY)
    ras = slicer.util.arrayFromModelPoints(model)
    assert len(spread) == len(distance) == len(ras) > 300
    lps = ras * np.array([-1.0, -1.0, 1.0])
    ct_image = sitk.ReadImage(str(comparison_folder / "ct.nrrd"))
    index = np.array([ct_image.TransformPhysicalPointToContinuousIndex(tuple(q)) for q in lps])
    inside = np.all((index >= 0) & (index <= np.array(ct_image.GetSize()) - 1), axis=1)
    assert inside.mean() > 0.8
    np.testing.assert_allclose(spread[inside], 200.0 + lps[inside] @ SLOPE, atol=0.02)
    assert np.abs(distance).max() < 1e-6  # the sCT is the CT: no deviation anywhere

    # Loaded coloured by deviation; switched to spread and back, each with its colour table, range and legend.
    display = model.GetDisplayNode()
    assert display.GetActiveScalarName() == reg.DISTANCE_ARRAY and display.GetColorNodeID() == reg.DISTANCE_COLORS
    logic.showSurfaceScalar(model, spread=True)
    top = logic.spreadRange(spread)
    finite = spread[np.isfinite(spread)]
    assert np.percentile(finite, 95) <= top and top in (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
    assert display.GetActiveScalarName() == reg.SPREAD_ARRAY and display.GetScalarVisibility()
    assert display.GetColorNodeID() == reg.SPREAD_COLORS
    assert tuple(display.GetScalarRange()) == (0.0, top)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(model)
    assert legend is not None and "spread" in legend.GetTitleText()
    logic.showSurfaceScalar(model, spread=False)
    assert display.GetActiveScalarName() == reg.DISTANCE_ARRAY and display.GetColorNodeID() == reg.DISTANCE_COLORS
    assert tuple(display.GetScalarRange()) == (-reg.DISTANCE_RANGE_MM, reg.DISTANCE_RANGE_MM)
    assert "mm" in legend.GetTitleText()

    # The statistics table carries the uncertainty rows of metrics.json, and the message its reading.
    metrics = json.loads((comparison_folder / "comparison" / "metrics.json").read_text(encoding="utf-8"))
    table = p.statisticsTable
    keys = [table.GetCellText(i, 3) for i in range(table.GetNumberOfRows())]
    values = dict(zip(keys, slicer.util.arrayFromTableColumn(table, "Value")))
    median = metrics["uncertainty"]["surface_spread_median_hu"]
    assert values["uncertainty.surface_spread_median_hu"] == pytest.approx(median)
    assert metrics["uncertainty"]["reading"] in outcome["message"]

    # The probe reads both at a surface point.
    probe = p.probePoints
    point_id = int(np.nonzero(inside)[0][len(np.nonzero(inside)[0]) // 2])
    probe.AddControlPointWorld(*ras[point_id])
    text = logic.probeDistance(probe, model)
    assert f"sCT spread {spread[point_id]:.0f} HU" in text

    # Asked for spread before loading: the model comes in coloured by spread.
    p.showSpread = True
    logic.loadComparison(comparison_folder / "comparison", ct, p)
    assert p.syntheticSurface.GetDisplayNode().GetActiveScalarName() == reg.SPREAD_ARRAY
    logic.cleanup()


def test_a_comparison_without_spread_refuses_to_show_it(scene, slicer_modules, tmp_path):
    import slicer

    _app, _sct_module, reg = slicer_modules
    phantom = make_phantom(0, size=(32, 32, 24), spacing=4.0)
    write_comparison(compare(phantom.ct, phantom.ct), tmp_path / "comparison")
    sitk.WriteImage(phantom.ct, str(tmp_path / "ct.nrrd"))
    logic = reg.SyntheticCTRegistrationLogic()
    p = logic.getParameterNode()
    p.showSpread = True
    ct = slicer.modules.volumes.logic().AddArchetypeVolume(str(tmp_path / "ct.nrrd"), "CT", 0)
    logic.loadComparison(tmp_path / "comparison", ct, p)
    assert not logic.hasSpread(p.syntheticSurface) and p.showSpread is False
    assert p.syntheticSurface.GetDisplayNode().GetActiveScalarName() == reg.DISTANCE_ARRAY
    with pytest.raises(ValueError, match="no spread map"):
        logic.showSurfaceScalar(p.syntheticSurface, spread=True)
    logic.cleanup()


def test_the_comparison_job_takes_the_spread_volume(scene, slicer_modules, comparison_folder, tmp_path):
    """The real child (syntheticct compare --uncertainty) from volume nodes: the model carries the planted spread."""
    import slicer

    _app, _sct_module, reg = slicer_modules
    ct_image = sitk.ReadImage(str(comparison_folder / "ct.nrrd"))
    sitk.WriteImage(_planted(ct_image), str(tmp_path / "spread.nrrd"))
    volumes = slicer.modules.volumes.logic()
    ct = volumes.AddArchetypeVolume(str(comparison_folder / "ct.nrrd"), "CT", 0)
    sct = volumes.AddArchetypeVolume(str(comparison_folder / "ct.nrrd"), "sCT", 0)
    spread_node = volumes.AddArchetypeVolume(str(tmp_path / "spread.nrrd"), "sCT uncertainty (HU)", 0)
    logic = reg.SyntheticCTRegistrationLogic()
    p = logic.getParameterNode()
    outcome = {}
    job = logic.startComparison(
        ct, sct, spreadVolume=spread_node, parameterNode=p, onFinished=lambda r, o: outcome.update(o), wait=True
    )
    assert job.result.ok and "error" not in outcome, (job.result.describe(), outcome)
    assert outcome["metrics"]["uncertainty"]["n_surface_points"] > 300
    model = p.syntheticSurface
    spread = slicer.util.arrayFromModelPointData(model, reg.SPREAD_ARRAY)
    lps = slicer.util.arrayFromModelPoints(model) * np.array([-1.0, -1.0, 1.0])
    index = np.array([ct_image.TransformPhysicalPointToContinuousIndex(tuple(q)) for q in lps])
    inside = np.all((index >= 0) & (index <= np.array(ct_image.GetSize()) - 1), axis=1)
    np.testing.assert_allclose(spread[inside], 200.0 + lps[inside] @ SLOPE, atol=0.02)
    assert not (Path(p.comparisonFolder).parent / "spread.nrrd").exists()  # the copy is not kept
    logic.cleanup()
