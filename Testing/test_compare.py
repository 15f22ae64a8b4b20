"""compare() and `syntheticct compare` on the phantom: known truths, written outputs, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from SyntheticCTLib.cli.main import main
from SyntheticCTLib.comparison.compare import REQUIRED_KEYS, compare, write_comparison
from SyntheticCTLib.comparison.surfaces import DISTANCE_ARRAY
from SyntheticCTLib.kernel.errors import GeometryMismatchError, InvalidParameterError
from SyntheticCTLib.kernel.masks import ct_body_mask

PNGS = (
    "surface_front.png",
    "surface_side.png",
    "surface_back.png",
    "checkerboard.png",
    "difference.png",
    "distance_histogram.png",
)


def translated(image: sitk.Image, shift_mm) -> sitk.Image:
    """``image``'s content moved by ``shift_mm`` (world, mm), on the same grid."""
    transform = sitk.TranslationTransform(3, tuple(-float(s) for s in shift_mm))
    return sitk.Resample(image, image, transform, sitk.sitkLinear, -1024.0, image.GetPixelID())


@pytest.fixture(scope="module")
def identical(small_phantom):
    return compare(small_phantom.ct, small_phantom.ct, bone_labels=small_phantom.bone_labels)


@pytest.fixture(scope="module")
def written(identical, tmp_path_factory):
    out = tmp_path_factory.mktemp("comparison")
    return out, write_comparison(identical, out)


def test_identical_ct_is_perfect(identical):
    m = identical.metrics
    assert m.mae_hu == 0.0 and m.me_hu == 0.0
    assert m.psnr_db is None  # infinite: written as null in JSON
    assert m.ssim == pytest.approx(1.0, abs=1e-6)
    assert m.bone_dice == 1.0
    assert m.surface_max_mm < 1e-6 and m.surface_mean_mm < 1e-6
    assert m.surface_within_1mm == 1.0
    labels = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(identical.bone_labels)) if v > 0)
    assert [row["label"] for row in m.per_bone] == labels
    assert all(row["surface_mean_mm"] < 1e-3 for row in m.per_bone)


def test_known_hu_offset_inside_body(small_phantom):
    ct = small_phantom.ct
    body = sitk.GetArrayFromImage(ct_body_mask(ct)) > 0
    array = sitk.GetArrayFromImage(ct)
    offset = 50.0
    sct = sitk.GetImageFromArray(np.where(body, array + offset, array).astype(np.float32))
    sct.CopyInformation(ct)
    m = compare(ct, sct).metrics.to_dict()
    assert m["me_hu"] == pytest.approx(offset, abs=1e-3)
    assert m["mae_hu"] == pytest.approx(offset, abs=1e-3)
    # PSNR: the offset survives clipping except where CT + 50 exceeds 3000 HU (nowhere in the phantom).
    assert m["psnr_db"] == pytest.approx(20 * math.log10(4024.0 / offset), abs=1e-3)
    assert m["ssim"] < 1.0


def test_shift_without_and_with_the_transform(small_phantom, tmp_path):
    """A synthetic CT shifted by 4 mm (2 voxels, so resampling is exact): its transform brings the distances to 0."""
    ct = small_phantom.ct
    shift = (4.0, 0.0, 0.0)
    sct = translated(ct, shift)
    unaligned = compare(ct, sct).metrics.to_dict()
    assert unaligned["surface_mean_mm"] > 1.0
    assert 2.5 < unaligned["surface_p95_mm"] < 4.3  # at most the shift, up to voxelization
    # Reference point x maps to synthetic point x + shift: fixed -> moving, ITK convention.
    transform = sitk.TranslationTransform(3, shift)
    aligned = compare(ct, sct, transform=transform).metrics.to_dict()
    assert aligned["surface_max_mm"] < 1e-3
    assert aligned["bone_dice"] == 1.0
    assert aligned["mae_hu"] < 1e-3
    # Same through the command line, in-process, with a transform file.
    ct_path, sct_path, tfm = tmp_path / "ct.nii.gz", tmp_path / "sct.nii.gz", tmp_path / "t.tfm"
    sitk.WriteImage(ct, str(ct_path))
    sitk.WriteImage(sct, str(sct_path))
    sitk.WriteTransform(transform, str(tfm))
    out = tmp_path / "out"
    argv = ["compare", "--reference", str(ct_path), "--synthetic", str(sct_path), "--transform", str(tfm)]
    assert main([*argv, "-o", str(out), "--progress", "none"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["surface_mean_mm"] == pytest.approx(aligned["surface_mean_mm"], abs=1e-9)
    assert metrics["settings"]["transform"] == "TranslationTransform"


def test_written_files(written):
    out, files = written
    text = (out / "metrics.json").read_text()

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    metrics = json.loads(text, parse_constant=refuse)
    assert list(metrics)[: len(REQUIRED_KEYS)] == list(REQUIRED_KEYS)
    assert {"surface_within_2mm", "synthetic_to_reference", "reference_to_synthetic", "versions"} <= set(metrics)
    assert 0.0 <= metrics["surface_within_1mm"] <= 1.0
    assert isinstance(metrics["per_bone"], list) and metrics["per_bone"]
    for name in ("synthetic_surface.vtp", "reference_surface.vtp"):
        reader = vtk.vtkXMLPolyDataReader()
        reader.SetFileName(str(out / name))
        reader.Update()
        poly = reader.GetOutput()
        assert poly.GetNumberOfPoints() > 100
        array = poly.GetPointData().GetArray(DISTANCE_ARRAY)
        assert array is not None and array.GetNumberOfTuples() == poly.GetNumberOfPoints()
    rows = (out / "distance_histogram.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:2] == ["lower_mm", "upper_mm"] and "synthetic_to_reference_count" in header
    counts = [int(r.split(",")[header.index("synthetic_to_reference_count")]) for r in rows[1:]]
    assert sum(counts) == metrics["synthetic_to_reference"]["n_points"]
    from matplotlib.image import imread

    for name in PNGS:
        picture = imread(str(out / name))
        assert picture.ndim == 3 and min(picture.shape[:2]) >= 200
        assert picture[..., :3].std() > 0.02  # not a blank image
        rgb = np.round(picture[..., :3] * 255).astype(np.int64)
        assert len(np.unique(rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2])) > 50
    assert set(files) >= {"metrics", "report", "synthetic_surface", "reference_surface", "histogram_csv"}


def test_surface_picture_shows_the_colour_map(small_phantom, tmp_path):
    """A bone 1 mm too large renders red (positive) on the bone and the scalar bar spans blue to red."""
    ct = small_phantom.ct
    array = sitk.GetArrayFromImage(ct)
    bone = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.Cast(ct > 200, sitk.sitkUInt8), [1, 1, 1])) > 0
    sct = sitk.GetImageFromArray(np.where(bone & (array < 200), 400.0, array).astype(np.float32))
    sct.CopyInformation(ct)
    result = compare(ct, sct)
    assert result.metrics.surface_mean_signed_mm > 0.5
    write_comparison(result, tmp_path)
    from matplotlib.image import imread

    picture = imread(str(tmp_path / "surface_front.png"))[..., :3]
    top = picture[: int(0.8 * picture.shape[0])]
    reddish = (top[..., 0] > top[..., 2] + 0.15).sum()
    bluish = (top[..., 2] > top[..., 0] + 0.15).sum()
    assert reddish > 20 * max(1, bluish)
    bar = picture[int(0.8 * picture.shape[0]) :]
    assert (bar[..., 2] > bar[..., 0] + 0.3).any() and (bar[..., 0] > bar[..., 2] + 0.3).any()


def test_report_is_self_contained(written):
    out, _ = written
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "http://" not in html and "https://" not in html
    assert 'src="http' not in html and "<script" not in html and "<link" not in html
    assert html.count('src="data:image/png;base64,') == len(PNGS)
    assert "Bone Dice" in html and "Per bone" in html
    assert "not for diagnostic use" in html.lower()


def test_per_bone_with_bone_local_transforms(small_phantom):
    """Bone 1's own transform undoes its shift; the global comparison still sees it."""
    ct, labels = small_phantom.ct, small_phantom.bone_labels
    shift = (2.0, 0.0, 0.0)
    sct = translated(ct, shift)
    plain = compare(ct, sct, bone_labels=labels).metrics.to_dict()
    local = compare(
        ct, sct, bone_labels=labels, bone_transforms={1: sitk.TranslationTransform(3, shift)}
    ).metrics.to_dict()
    rows_plain = {row["label"]: row for row in plain["per_bone"]}
    rows_local = {row["label"]: row for row in local["per_bone"]}
    assert set(rows_plain) == set(rows_local) and 1 in rows_plain and len(rows_plain) >= 2
    assert rows_plain[1]["surface_mean_mm"] > 0.7
    assert rows_local[1]["transform"] == "bone-local"
    assert rows_local[1]["surface_mean_mm"] < 0.1
    for label in set(rows_plain) - {1}:
        assert rows_local[label]["surface_mean_mm"] == pytest.approx(rows_plain[label]["surface_mean_mm"])
    assert local["surface_mean_mm"] == pytest.approx(plain["surface_mean_mm"])


def test_bad_inputs_give_clear_errors(small_phantom, tmp_path, capsys):
    ct = small_phantom.ct
    far = sitk.TranslationTransform(3, (5000.0, 0.0, 0.0))
    with pytest.raises(GeometryMismatchError, match="do not overlap"):
        compare(ct, ct, transform=far)
    with pytest.raises(InvalidParameterError, match="No bone found"):
        compare(ct, ct, bone_threshold=5000.0)
    with pytest.raises(InvalidParameterError, match="SimpleITK transform"):
        compare(ct, ct, transform="not a transform")
    with pytest.raises(InvalidParameterError, match="bone_labels"):
        compare(ct, ct, bone_transforms={1: sitk.Transform(3, sitk.sitkIdentity)})
    empty_labels = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    empty_labels.CopyInformation(ct)
    with pytest.raises(InvalidParameterError, match="no labelled voxel"):
        compare(ct, ct, bone_labels=empty_labels)

    ct_path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct, str(ct_path))
    (tmp_path / "bad.tfm").write_text("this is not a transform\n")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    cases = [
        (["--synthetic", str(tmp_path / "missing.nii.gz")], "missing.nii.gz"),
        (["--synthetic", str(tmp_path / "broken.nii.gz")], "broken.nii.gz"),
        (["--synthetic", str(ct_path), "--transform", str(tmp_path / "bad.tfm")], "bad.tfm"),
        (["--synthetic", str(ct_path), "--transform", str(tmp_path / "none.tfm")], "none.tfm"),
        (["--synthetic", str(ct_path), "--bone-threshold", "9000"], "No bone found"),
        (["--synthetic", str(ct_path), "--bone-transform", "1=x.tfm"], "--bone-labels"),
    ]
    for extra, expected in cases:
        out = tmp_path / "out"
        code = main(["compare", "--reference", str(ct_path), *extra, "-o", str(out), "--progress", "none"])
        err = capsys.readouterr().err
        assert code == 1, extra
        assert expected in err and "error" in err
        assert not (out / "metrics.json").exists()


def test_cli_json_progress(small_phantom, tmp_path, capsys):
    from SyntheticCTLib.kernel.progress import parse_progress_line

    ct_path = tmp_path / "ct.nii.gz"
    labels_path = tmp_path / "bones.nii.gz"
    sitk.WriteImage(small_phantom.ct, str(ct_path))
    sitk.WriteImage(small_phantom.bone_labels, str(labels_path))
    out = tmp_path / "out"
    argv = ["compare", "--reference", str(ct_path), "--synthetic", str(ct_path), "--bone-labels", str(labels_path)]
    assert main([*argv, "-o", str(out), "--progress", "json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    updates = [parse_progress_line(line) for line in lines if parse_progress_line(line)]
    fractions = [u["fraction"] for u in updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"resample", "distances", "writing"} <= {u["stage"] for u in updates}
    assert json.loads((out / "metrics.json").read_text())["per_bone"]
    assert Path(out / "report.html").stat().st_size > 10_000


def rod_ct(radius: float, *, size=(48, 48, 40), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A CT of a soft-tissue block with a bone rod along z through the whole field of view."""
    nx, ny, nz = size
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    array = np.full((nz, ny, nx), 40.0, dtype=np.float32)
    array[:, :, :3] = -1000.0  # air on one side, so the body is a proper component
    array[np.hypot(x - 24.3, y - 23.8) < radius] = 800.0
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(origin)
    return image


def test_cuts_of_the_field_of_view_are_not_measured():
    """A rod crossing the image: its flat ends (shared by both images) are left out, so the mean is exact."""
    reference = rod_ct(8.0)
    synthetic = rod_ct(9.0)
    result = compare(reference, synthetic)
    assert result.metrics.surface_mean_mm == pytest.approx(1.0, abs=0.1)
    assert result.metrics.surface_mean_signed_mm == pytest.approx(1.0, abs=0.1)
    measured = numpy_support.vtk_to_numpy(result.synthetic_surface.GetPointData().GetArray("Measured"))
    assert 0 < measured.sum() < len(measured)  # the end caps are there, but not measured
    # A synthetic CT covering only the lower half of the reference: its cut is not measured either.
    half = rod_ct(9.0, size=(48, 48, 20))
    partial = compare(reference, half)
    assert partial.metrics.body_overlap_fraction == pytest.approx(0.5, abs=0.05)
    assert partial.metrics.surface_mean_mm == pytest.approx(1.0, abs=0.1)
    assert partial.metrics.synthetic_to_reference["area_mm2"] == pytest.approx(
        result.metrics.synthetic_to_reference["area_mm2"] / 2, rel=0.15
    )


def test_real_ct_against_a_shifted_copy(real_data_dir):
    """The real abdominal CT (RAS-stored, 3 mm) shifted by 2 voxels, compared without and with its transform."""
    from SyntheticCTLib.kernel.io import read_volume

    path = real_data_dir / "ct" / "totalsegmentator_example_ct.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    ct = read_volume(path)
    shift = (6.0, 0.0, 0.0)
    sct = translated(sitk.Cast(ct, sitk.sitkFloat32), shift)
    unaligned = compare(ct, sct).metrics.to_dict()
    assert unaligned["surface_mean_mm"] > 1.5
    assert unaligned["surface_p95_mm"] <= 6.5
    aligned = compare(ct, sct, transform=sitk.TranslationTransform(3, shift)).metrics.to_dict()
    assert aligned["surface_max_mm"] < 1e-3
    assert aligned["mae_hu"] < 1e-3 and aligned["bone_dice"] == 1.0
