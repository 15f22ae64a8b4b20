"""Volume I/O: exact geometry round trips, DICOM series choice, and clear errors on bad input."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SyntheticCTLib.kernel import io
from SyntheticCTLib.kernel.errors import VolumeReadError, VolumeWriteError
from SyntheticCTLib.kernel.geometry import check_same_grid, resample_to_spacing, same_grid

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def oblique_volume(pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """An anisotropic volume with an oblique direction matrix and a non-trivial origin."""
    rng = np.random.default_rng(7)
    array = rng.normal(0, 100, size=(9, 12, 15)).astype(np.float32)
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel_type)
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((-12.25, 33.5, 101.125))
    a, b = math.radians(20), math.radians(-35)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    image.SetDirection(tuple((rz @ rx).ravel()))
    return image


def assert_exact_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("pixel_type", [sitk.sitkFloat32, sitk.sitkInt16])
def test_round_trip_keeps_geometry_and_values(tmp_path, suffix, pixel_type):
    image = oblique_volume(pixel_type)
    path = io.write_volume(image, tmp_path / f"vol{suffix}")
    back = io.read_volume(path)
    assert_exact_geometry(image, back)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    # Only the volume (and an .mhd's data file) is left: no temporary files.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["vol.mhd", "vol.zraw"] if suffix == ".mhd" else [f"vol{suffix}"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(VolumeReadError, match=r"No file or folder at .*nothing\.nii\.gz"):
        io.read_volume(tmp_path / "nothing.nii.gz")


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a NIfTI file at all")
    with pytest.raises(VolumeReadError, match=r"corrupt\.nii\.gz.*unreadable or corrupt"):
        io.read_volume(bad)


def test_truncated_file_is_reported(tmp_path):
    path = io.write_volume(oblique_volume(), tmp_path / "trunc.nrrd", compress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeReadError, match="trunc.nrrd"):
        io.read_volume(path)


def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(path))
    with pytest.raises(VolumeReadError, match=r"slice\.nrrd' is 2D"):
        io.read_volume(path)


def test_vector_image_is_refused(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([6, 6, 6], sitk.sitkVectorFloat32, 3), str(path))
    with pytest.raises(VolumeReadError, match=r"rgb\.nrrd' is a vector image with 3 components"):
        io.read_volume(path)


def test_4d_image_is_refused(tmp_path):
    path = tmp_path / "echoes.nii.gz"
    sitk.WriteImage(sitk.Image([5, 5, 5, 3], sitk.sitkFloat32), str(path))
    with pytest.raises(VolumeReadError, match=r"echoes\.nii\.gz' is a 4D image"):
        io.read_volume(path)


def test_empty_image_is_refused(tmp_path):
    path = tmp_path / "empty.nrrd"
    path.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 0 4\nencoding: raw\n\n")
    with pytest.raises(VolumeReadError, match="empty"):
        io.read_volume(path)


def test_nan_voxels_are_refused(tmp_path):
    image = oblique_volume()
    array = sitk.GetArrayFromImage(image)
    array[1, 2, 3] = np.nan
    array[4, 5, 6] = np.inf
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    path = io.write_volume(bad, tmp_path / "nan.mha")
    with pytest.raises(VolumeReadError, match=r"nan\.mha' has 2 NaN or Inf voxels"):
        io.read_volume(path)


@pytest.mark.parametrize("spacing", [(1.0, 0.0, 1.0), (1.0, 80.0, 1.0), (0.5, 0.5, 51.0)])
def test_absurd_spacing_is_refused(tmp_path, spacing):
    # NRRD stores spacing verbatim, so absurd values reach the reader. (A negative spacing in a file
    # is read by ITK as a flipped axis with a positive spacing, which is a valid geometry.)
    path = tmp_path / "spacing.nrrd"
    path.write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 3 3 3\n"
        f"spacings: {spacing[0]} {spacing[1]} {spacing[2]}\nencoding: ascii\n\n" + " ".join(["1"] * 27) + "\n"
    )
    with pytest.raises(VolumeReadError, match=r"spacing\.nrrd' has absurd voxel spacing"):
        io.read_volume(path)


def test_validate_volume_checks_spacing_of_in_memory_images():
    image = sitk.Image([4, 4, 4], sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.0, 60.0))
    with pytest.raises(VolumeReadError, match="absurd voxel spacing"):
        io.validate_volume(image, "memory")


def test_write_refuses_to_overwrite_an_input(tmp_path):
    src = io.write_volume(oblique_volume(), tmp_path / "in.nrrd")
    before = src.read_bytes()
    with pytest.raises(VolumeWriteError, match="input file"):
        io.write_volume(oblique_volume(sitk.sitkInt16), src, inputs=[src])
    assert src.read_bytes() == before


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with io.atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("simulated crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_and_unwritable_folder(tmp_path):
    with pytest.raises(VolumeWriteError, match="unknown volume format"):
        io.write_volume(oblique_volume(), tmp_path / "out.png")
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "sub" / "out.nii.gz"  # a folder cannot be made under a file, even as root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out.nii.gz"
    with pytest.raises(VolumeWriteError, match="Cannot"):
        io.write_volume(oblique_volume(), target)


def write_dicom_series(folder: Path, image: sitk.Image, series_uid: str, description: str) -> None:
    """Write ``image`` as a DICOM series with SimpleITK (one file per slice).

    GDCM's writer leaves the process's C locale at "C" (text I/O would then default to ASCII): it is
    put back afterwards, so later tests in the same process are not affected.
    """
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(folder, image, series_uid, description)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(folder: Path, image: sitk.Image, series_uid: str, description: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        tags = {
            "0020|000e": series_uid,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0008|0060": "CT",
            "0008|103e": description,
            "0020|0013": str(z + 1),
            "0008|0018": f"{series_uid}.{z + 1}",
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0037": "\\".join(f"{v:.6f}" for v in direction[0::3] + direction[1::3]),
            "0028|1053": "1",
            "0028|1052": "0",
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{z:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_folder_with_two_series_reads_the_largest_or_the_named_one(tmp_path):
    big = sitk.Cast(sitk.GetImageFromArray(np.arange(6 * 8 * 10, dtype=np.int16).reshape(6, 8, 10)), sitk.sitkInt16)
    big.SetSpacing((0.8, 0.8, 2.5))
    big.SetOrigin((10.0, -20.0, 30.0))
    small = sitk.Image([10, 8, 3], sitk.sitkInt16) + 7
    write_dicom_series(tmp_path / "dicom", big, "1.2.3.4.100", "big series")
    write_dicom_series(tmp_path / "dicom", small, "1.2.3.4.200", "small series")

    series = io.list_dicom_series(tmp_path / "dicom")
    assert [s.series_uid for s in series] == ["1.2.3.4.100", "1.2.3.4.200"]
    largest = io.read_volume(tmp_path / "dicom")
    assert largest.GetSize() == (10, 8, 6)
    np.testing.assert_allclose(largest.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)
    np.testing.assert_allclose(largest.GetOrigin(), (10.0, -20.0, 30.0), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(largest), sitk.GetArrayFromImage(big))
    named = io.read_volume(tmp_path / "dicom", series_uid="1.2.3.4.200")
    assert named.GetSize() == (10, 8, 3)
    assert float(sitk.GetArrayViewFromImage(named).max()) == 7
    with pytest.raises(VolumeReadError, match="no DICOM series with SeriesInstanceUID 9.9"):
        io.read_volume(tmp_path / "dicom", series_uid="9.9")


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeReadError, match="no DICOM series"):
        io.read_volume(tmp_path)


@pytest.mark.parametrize("name", ["totalsegmentator_example_ct_dicom", "dcm_qa_ct_ge_head_tilt_dicom"])
def test_real_dicom_series_round_trips(tmp_path, name):
    folder = REAL / "ct" / name
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is absent (it lives in ../shared/data/real beside the project)")
    image = io.read_volume(folder)
    assert image.GetDimension() == 3 and min(image.GetSize()) > 1
    array = sitk.GetArrayViewFromImage(image)
    assert array.min() <= -900  # air in HU: the rescale was applied
    for suffix in (".nrrd", ".nii.gz"):
        back = io.read_volume(io.write_volume(image, tmp_path / f"ct{suffix}"))
        assert_exact_geometry(image, back)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_real_nifti_ct_round_trips(tmp_path):
    path = REAL / "ct" / "totalsegmentator_example_ct.nii.gz"
    if not path.is_file():
        pytest.skip(f"real CT {path} is absent (it lives in ../shared/data/real beside the project)")
    image = io.read_volume(path)
    back = io.read_volume(io.write_volume(image, tmp_path / "ct.mha"))
    assert_exact_geometry(image, back)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_resample_to_spacing_keeps_field_of_view_centre():
    image = oblique_volume()
    coarse = resample_to_spacing(image, (1.5, 2.6, 5.0))
    assert coarse.GetSize() == (7, 6, 5)  # round(15*0.7/1.5), 12*1.3/2.6, round(9*2.9/5)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    new_centre = np.array(coarse.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in coarse.GetSize()]))
    np.testing.assert_allclose(new_centre, centre, atol=1e-6)
    assert same_grid(image, image) and not same_grid(image, coarse)
    with pytest.raises(Exception, match="share a voxel grid"):
        check_same_grid(image, coarse, names=("ct", "sct"))


def test_replace_folder_swaps_in_the_new_folder_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "series"
    target.mkdir()
    (target / "old.dcm").write_text("old")
    new = tmp_path / ".series.partial"
    new.mkdir()
    (new / "new.dcm").write_text("new")
    io.replace_folder(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # nothing aside is left behind

    with pytest.raises(OSError):
        io.replace_folder(tmp_path / "missing.partial", target)  # the rename fails: the old folder is put back
    assert (target / "new.dcm").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]
