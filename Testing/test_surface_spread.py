"""The sCT's spread on its bone surface: sampled where it was planted, recorded, pictured and reported.

Known truths: a spread map that is a linear function of position f(q) = a . q + b (on the sCT's grid)
reads f(T(p)) at every surface point p of the reference frame, T the comparison's transform (linear
interpolation reproduces a linear field exactly); a spread that is 0 on the patient's right and high
on the left colours the two halves of the surface picture differently; a spread that follows the
planted error reads "well", noise reads chance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from SyntheticCTLib.cli.main import main
from SyntheticCTLib.comparison.compare import compare, write_comparison
from SyntheticCTLib.comparison.rendering import spread_range
from SyntheticCTLib.comparison.surfaces import (
    DISTANCE_ARRAY,
    MEASURED_ARRAY,
    SPREAD_ARRAY,
    point_array,
    surface_points,
    values_at_points,
)
from SyntheticCTLib.comparison.uncertainty import reading, spread_at_points, uncertainty_quality
from SyntheticCTLib.kernel.errors import GeometryMismatchError, InvalidParameterError

SLOPE = np.array([0.5, -0.25, 1.0])  # HU per mm along x, y, z (LPS)


def _field(image: sitk.Image, function) -> sitk.Image:
    """A float32 image on ``image``'s grid whose voxel at world point q holds ``function(q)``."""
    size = image.GetSize()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    world = np.asarray(image.GetOrigin()) + (index * np.asarray(image.GetSpacing())) @ direction.T
    values = function(world).reshape(size).transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
    out = sitk.GetImageFromArray(values.astype(np.float32))
    out.CopyInformation(image)
    return out


def _linear(world: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return 200.0 + (world - centre) @ SLOPE


@pytest.fixture(scope="module")
def moved_case(small_phantom):
    """The CT, an "sCT" = the CT moved by a known rigid T (reference -> sCT points), and a linear spread on the sCT."""
    ct = sitk.Cast(small_phantom.ct, sitk.sitkFloat32)
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()]))
    move = sitk.Euler3DTransform()
    move.SetCenter(tuple(centre))
    move.SetRotation(0.0, 0.0, 0.06)
    move.SetTranslation((3.0, -2.0, 1.0))
    sct = sitk.Resample(ct, ct, move.GetInverse(), sitk.sitkLinear, -1024.0)  # sct(T(p)) = ct(p)
    spread = _field(sct, lambda q: _linear(q, centre))
    assert sitk.GetArrayViewFromImage(spread).min() > 0
    return ct, sct, move, spread, centre


def test_linear_sampling_reproduces_a_linear_field_and_is_nan_off_the_grid(small_phantom):
    ct = small_phantom.ct
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()]))
    field = _field(ct, lambda q: _linear(q, centre))
    rng = np.random.default_rng(0)
    points = centre + rng.uniform(-30, 30, size=(200, 3))
    assert np.allclose(values_at_points(points, field, linear=True), _linear(points, centre), atol=1e-3)
    far = centre + np.array([[1000.0, 0.0, 0.0]])
    assert np.isnan(spread_at_points(far, field)).all()
    shift = sitk.TranslationTransform(3, (2.5, -1.5, 0.5))
    assert np.allclose(
        spread_at_points(points, field, transform=shift), _linear(points + [2.5, -1.5, 0.5], centre), atol=1e-3
    )


def test_the_spread_on_the_surface_is_the_planted_function_through_the_transform(moved_case, tmp_path):
    ct, sct, move, spread, centre = moved_case
    result = compare(ct, sct, transform=move, spread=spread)
    surface = result.synthetic_surface
    points = surface_points(surface)
    mapped = np.array([move.TransformPoint(tuple(p)) for p in points])
    stored = point_array(surface, SPREAD_ARRAY)
    assert len(stored) == len(points) > 500
    # Within the grid's voxel centres the field is exact (float32 storage of ~200 HU); in the last half voxel
    # (surface points on the cut of the field of view) it keeps the edge voxel's value; beyond, NaN.
    index = np.array([sct.TransformPhysicalPointToContinuousIndex(tuple(q)) for q in mapped])
    inside = np.all((index >= 0) & (index <= np.array(sct.GetSize()) - 1), axis=1)
    assert inside.mean() > 0.8
    assert np.allclose(stored[inside], _linear(mapped[inside], centre), atol=0.01)
    near = np.all((index >= -0.5) & (index <= np.array(sct.GetSize()) - 0.5), axis=1)
    edge_slack = 0.5 * np.abs(SLOPE) @ np.array(sct.GetSpacing()) + 0.01
    assert np.all(np.abs(stored[near] - _linear(mapped[near], centre)) <= edge_slack)
    assert np.array_equal(np.isfinite(stored), near)  # NaN beyond: off the spread's grid
    # Both arrays on the one surface; the written file carries them unchanged.
    assert surface.GetPointData().GetArray(DISTANCE_ARRAY) is not None
    files = write_comparison(result, tmp_path)
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkIOXML import vtkXMLPolyDataReader

    reader = vtkXMLPolyDataReader()
    reader.SetFileName(str(files["synthetic_surface"]))
    reader.Update()
    data = reader.GetOutput().GetPointData()
    assert np.array_equal(vtk_to_numpy(data.GetArray(SPREAD_ARRAY)), stored, equal_nan=True)
    assert np.array_equal(vtk_to_numpy(data.GetArray(DISTANCE_ARRAY)), point_array(surface, DISTANCE_ARRAY))
    # metrics.json: the uncertainty figures of the measured points, by hand.
    metrics = json.loads(files["metrics"].read_text(encoding="utf-8"))
    quality = metrics["uncertainty"]
    measured = point_array(surface, MEASURED_ARRAY) > 0
    off = np.abs(point_array(surface, DISTANCE_ARRAY))[measured] > 1.0
    assert quality["n_surface_points"] == int(measured.sum())
    assert quality["n_surface_off"] == int(off.sum())
    assert quality["surface_spread_median_hu"] == pytest.approx(float(np.median(stored[measured])), rel=1e-5)
    assert quality["reading"].startswith("Spread predicts where the sCT bone surface is wrong")
    # The stand-alone measure on the same comparison gives the same figures (and leaves the surface alone).
    again = uncertainty_quality(result, spread, transform=move)
    for key in ("n_surface_points", "n_surface_off", "surface_spread_median_hu", "n_voxels", "reading"):
        assert again[key] == pytest.approx(quality[key]), key
    # Without a spread the record says so (null), and there is no spread picture.
    plain = compare(ct, sct, transform=move)
    assert plain.metrics.to_dict()["uncertainty"] is None
    assert plain.synthetic_surface.GetPointData().GetArray(SPREAD_ARRAY) is None


def test_a_spread_off_the_scts_grid_or_negative_is_refused(moved_case):
    ct, sct, move, spread, _ = moved_case
    coarse = sitk.Resample(
        spread,
        [n // 2 for n in spread.GetSize()],
        sitk.Transform(),
        sitk.sitkLinear,
        spread.GetOrigin(),
        [2 * s for s in spread.GetSpacing()],
        spread.GetDirection(),
    )
    with pytest.raises(GeometryMismatchError, match="not on the synthetic CT's grid"):
        compare(ct, sct, transform=move, spread=coarse)
    with pytest.raises(InvalidParameterError, match="negative"):
        compare(ct, sct, transform=move, spread=spread - 1000.0)


def test_the_spread_picture_and_report(small_phantom, tmp_path):
    """Spread 0 on the patient's right half (x < centre), 100 HU on the left: the front view's two halves differ."""
    ct = sitk.Cast(small_phantom.ct, sitk.sitkFloat32)
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()]))
    step = _field(ct, lambda q: np.where(q[:, 0] > centre[0], 100.0, 0.0))
    result = compare(ct, ct, spread=step)
    files = write_comparison(result, tmp_path)
    for view in ("front", "side", "back"):
        assert files[f"spread_{view}"].is_file()
    from matplotlib.image import imread

    picture = imread(str(files["spread_front"]))[..., :3]
    deviation = imread(str(files["surface_front"]))[..., :3]
    top = picture[: int(0.8 * picture.shape[0])]
    on_surface = np.any(np.abs(top - 1.0) > 0.02, axis=-1)
    assert on_surface.sum() > 2000  # not blank
    # Front view, from anterior: the patient's left (+x) is on the image's right.
    columns = np.nonzero(on_surface.any(axis=0))[0]
    middle = (columns.min() + columns.max()) // 2
    left, right = top[:, :middle][on_surface[:, :middle]], top[:, middle:][on_surface[:, middle:]]
    # Viridis: low is dark purple (blue > green), high is yellow (green > blue); shading keeps the order.
    assert np.mean(left[:, 2] > left[:, 1]) > 0.8
    assert np.mean(right[:, 1] > right[:, 2]) > 0.8
    assert not np.allclose(picture, deviation)
    page = files["report"].read_text(encoding="utf-8")
    assert "Synthetic bone surface coloured by spread" in page
    assert result.metrics.uncertainty["reading"] in page
    assert page.count("data:image/png;base64,") >= 9


def test_reading_in_plain_words():
    base = {"n_surface_points": 1000, "n_surface_off": 100, "off_mm": 1.0}
    assert "not at all (AUROC 0.50" in reading({**base, "surface_auroc": 0.5, "hu_spearman": 0.02})
    assert "weakly (AUROC 0.60, 100 of 1000" in reading({**base, "surface_auroc": 0.6, "hu_spearman": 0.2})
    assert "moderately" in reading({**base, "surface_auroc": 0.7})
    assert ": well (AUROC 0.90" in reading({**base, "surface_auroc": 0.9, "hu_spearman": 0.6})
    assert "strong (Spearman 0.60)" in reading({**base, "surface_auroc": 0.9, "hu_spearman": 0.6})
    assert "wrong way round" in reading({**base, "surface_auroc": 0.3})
    assert "no bone-surface point is more than 1 mm off" in reading(
        {**base, "n_surface_off": 0, "surface_auroc": float("nan")}
    )
    assert spread_range(np.array([0.0, 3.0, 7.0])) == 10.0
    assert spread_range(np.array([0.0, 0.2])) == 1.0
    assert spread_range(np.array([150.0])) == 200.0


def test_cli_compare_with_uncertainty(moved_case, tmp_path, capsys):
    ct, sct, move, spread, _ = moved_case
    paths = {k: tmp_path / f"{k}.nii.gz" for k in ("ct", "sct", "spread")}
    for key, image in (("ct", ct), ("sct", sct), ("spread", spread)):
        sitk.WriteImage(image, str(paths[key]))
    sitk.WriteTransform(move, str(tmp_path / "T.tfm"))
    argv = ["compare", "--reference", str(paths["ct"]), "--synthetic", str(paths["sct"])]
    argv += ["--transform", str(tmp_path / "T.tfm"), "--progress", "none"]
    out = tmp_path / "out"
    assert main([*argv, "--uncertainty", str(paths["spread"]), "-o", str(out)]) == 0
    assert "Spread predicts where the sCT bone surface is wrong" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["uncertainty"]["n_surface_points"] > 500
    assert (out / "spread_front.png").is_file()
    # A spread map of another grid: refused, naming the file.
    sitk.WriteImage(ct[::2, ::2, ::2], str(tmp_path / "coarse.nii.gz"))
    bad = tmp_path / "bad"
    assert main([*argv, "--uncertainty", str(tmp_path / "coarse.nii.gz"), "-o", str(bad)]) == 1
    assert "coarse.nii.gz" in capsys.readouterr().err
    assert not (bad / "metrics.json").exists()


def test_a_spread_that_follows_the_error_reads_well_through_compare(planted_error):
    """The planted error of test_uncertainty_quality through compare(spread=...): AUROC > 0.9, reading "well"."""
    ct, sct, error = planted_error
    informative = sitk.GetImageFromArray(ndimage.gaussian_filter(error, 1.5).astype(np.float32))
    informative.CopyInformation(ct)
    quality = compare(ct, sct, spread=informative).metrics.uncertainty
    assert quality["surface_auroc"] > 0.9 and quality["n_surface_off"] > 50
    assert ": well (AUROC" in quality["reading"]


def test_compare_args_pass_the_spread_map(tmp_path):
    from SyntheticCTLib.apps.runner import compare_args

    args = compare_args("ct.nrrd", "sct.nrrd", tmp_path, uncertainty="spread.nrrd", python="python")
    assert args[args.index("--uncertainty") + 1] == "spread.nrrd"
    assert "--uncertainty" not in compare_args("ct.nrrd", "sct.nrrd", tmp_path, python="python")


def test_the_demo_command_offers_one_pass(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--no-uncertainty" in capsys.readouterr().out
