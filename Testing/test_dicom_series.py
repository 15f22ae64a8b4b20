"""DICOM as scanners send it: every real set in ../shared/data/real/mri_dicom and the gantry-tilted CT.

Each volume's slice count, spacing and every slice's position are checked against its files' own tags
(read here again with pydicom), the echo order against the physics of a gradient echo (magnitude falls
with TE), and the tilted, unevenly stepped CT against its files' pixels at the positions they state.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from SyntheticCTLib.cli.main import main
from SyntheticCTLib.kernel import dicom_series
from SyntheticCTLib.kernel.errors import VolumeReadError
from SyntheticCTLib.kernel.io import read_volume

TOL_MM = 0.05

# set -> {volume id: (image type, TE ms or None, slices, slice step mm)}: what each set's README entry says.
EXPECTED = {
    "mri_dicom/fmap_siemens/2_gre_field_magph": {
        "2_e1": ("magnitude", 5.19, 36, 3.6),
        "2_e2": ("magnitude", 7.65, 36, 3.6),
    },
    "mri_dicom/fmap_siemens/3_gre_field_magph": {"3_phase": ("phase", 7.65, 36, 3.6)},
    "mri_dicom/fmap_siemens/5_gre_field_mag": {
        "5_e1": ("magnitude", 5.19, 36, 3.6),
        "5_e2": ("magnitude", 7.65, 36, 3.6),
    },
    "mri_dicom/philips_fmap_cl": {
        "2001_mag_e1": ("magnitude", 2.3, 53, 3.0),
        "2001_mag_e2": ("magnitude", 4.6, 53, 3.0),
        "2001_phase_e1": ("phase", 2.3, 53, 3.0),
        "2001_phase_e2": ("phase", 4.6, 53, 3.0),
    },
    "mri_dicom/philips_fmap_enh": {
        "2001_mag_e1": ("magnitude", 2.3, 53, 3.0),
        "2001_mag_e2": ("magnitude", 4.6, 53, 3.0),
        "2001_phase_e1": ("phase", 2.3, 53, 3.0),
        "2001_phase_e2": ("phase", 4.6, 53, 3.0),
    },
    "mri_dicom/xa30_fmap_enh/8_gre_field_mapping": {
        "8_e1": ("magnitude", 10.0, 33, 3.4),
        "8_e2": ("magnitude", 12.46, 33, 3.4),
    },
    "mri_dicom/xa30_fmap_enh/9_gre_field_mapping": {"9_phase": ("phase", 12.46, 33, 3.4)},  # no EchoNumbers
    "mri_dicom/decubitus_siemens/HFS": {"3": ("magnitude", 2.46, 35, 4.8)},
    "mri_dicom/decubitus_siemens/HFP": {"2": ("magnitude", 2.46, 35, 4.8)},
    "mri_dicom/canon_oblique_b0/8000": {"8000": ("other", 79.0, 40, 3.0)},
    "mri_dicom/canon_oblique_b0/11000": {"11000": ("other", 79.0, 40, 3.0)},
    "mri_dicom/table_ge_ffs_hfs/01_3_Plane_Localizer_FF": {
        f"1_o{k}": ("magnitude", 81.002, 7, 15.0) for k in (1, 2, 3)
    },
    "mri_dicom/table_ge_ffs_hfs/05_3_Plane_Localizer_HF": {
        f"5_o{k}": ("magnitude", 81.002, 7, 15.0) for k in (1, 2, 3)
    },
    "mri_dicom/table_ge_ffs_hfs/02_Ax_fMRI_FF_I11.1_S15.9": {
        f"2_t{k}": ("magnitude", 35.0, 10, 3.0) for k in range(1, 6)
    },
    "mri_dicom/table_ge_ffs_hfs/06_Ax_fMRI_HF_I11.1_S15.9": {
        f"6_t{k}": ("magnitude", 35.0, 10, 3.0) for k in range(1, 6)
    },
}
TILTED_CT = "ct/dcm_qa_ct_ge_head_tilt_dicom"


@functools.lru_cache(maxsize=4)
def _dataset(path: str):
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array


def frame_tags(path: Path, frame):
    """(ImagePositionPatient, ImageOrientationPatient, pixels after rescale) of one frame, read here with pydicom."""
    ds, all_pixels = _dataset(str(path))
    if frame is None:
        ipp, iop = ds.ImagePositionPatient, ds.ImageOrientationPatient
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        pixels = all_pixels
    else:
        fg = ds.PerFrameFunctionalGroupsSequence[frame]
        shared = ds.SharedFunctionalGroupsSequence[0]
        ipp = fg.PlanePositionSequence[0].ImagePositionPatient
        orient = fg.get("PlaneOrientationSequence") or shared.PlaneOrientationSequence
        iop = orient[0].ImageOrientationPatient
        transform = (fg.get("PixelValueTransformationSequence") or shared.PixelValueTransformationSequence)[0]
        slope, intercept = float(transform.RescaleSlope), float(transform.RescaleIntercept)
        pixels = all_pixels[frame]
    return (
        np.array([float(v) for v in ipp]),
        np.array([float(v) for v in iop]),
        pixels.astype(np.float64) * slope + intercept,
    )


@pytest.fixture(scope="module")
def real(real_data_dir):
    return real_data_dir


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_set_volumes_slices_and_positions(real, name):
    folder = real / name
    volumes = dicom_series.find_volumes(folder)
    expected = EXPECTED[name]
    assert {v.id: (v.image_type, v.echo_time_ms, v.size[2], round(v.spacing[2], 3)) for v in volumes} == expected
    # Every image file is used exactly once.
    used = [(str(f.path), f.frame) for v in volumes for f in v.frames]
    assert len(used) == len(set(used))
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert sorted({u[0] for u in used}) == files
    for volume in volumes:
        assert volume.readable and not volume.regularized and volume.warnings == []
        image = volume.read()
        array = sitk.GetArrayViewFromImage(image)
        for k, f in enumerate(volume.frames):
            ipp, iop, pixels = frame_tags(f.path, f.frame)
            np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, k)), ipp, atol=TOL_MM)
            np.testing.assert_allclose(image.GetDirection()[0::3], iop[:3], atol=1e-3)
            np.testing.assert_allclose(image.GetDirection()[1::3], iop[3:], atol=1e-3)
            np.testing.assert_allclose(array[k], pixels, rtol=1e-6, atol=1e-3)
        ds = pydicom.dcmread(volume.files[0], stop_before_pixels=True)
        if "PixelSpacing" in ds:
            spacing = ds.PixelSpacing
        else:
            groups = ds.SharedFunctionalGroupsSequence[0]
            if "PixelMeasuresSequence" not in groups:
                groups = ds.PerFrameFunctionalGroupsSequence[0]
            spacing = groups.PixelMeasuresSequence[0].PixelSpacing
        np.testing.assert_allclose(image.GetSpacing()[:2], [float(spacing[1]), float(spacing[0])], atol=1e-6)
        # Slices are ordered along the normal (row x column), whatever InstanceNumber says.
        direction = np.array(image.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(direction[:, 2], np.cross(direction[:, 0], direction[:, 1]), atol=1e-9)


@pytest.mark.parametrize(
    "name",
    [
        "mri_dicom/fmap_siemens/2_gre_field_magph",
        "mri_dicom/fmap_siemens/5_gre_field_mag",
        "mri_dicom/philips_fmap_cl",
        "mri_dicom/philips_fmap_enh",
        "mri_dicom/xa30_fmap_enh/8_gre_field_mapping",
    ],
)
def test_echoes_in_echo_time_order_and_magnitude_falls_with_te(real, name):
    images, echo_times, ids = dicom_series.read_echoes(real / name)
    assert len(images) == 2 and echo_times == sorted(echo_times) and echo_times[0] < echo_times[1]
    first = sitk.GetArrayFromImage(images[0]).astype(np.float64)
    second = sitk.GetArrayFromImage(images[1]).astype(np.float64)
    tissue = first > 0.2 * np.percentile(first, 99)
    assert tissue.sum() > 1000
    assert first[tissue].mean() > second[tissue].mean()  # T2* decay


def test_enhanced_and_classic_philips_are_the_same_volumes(real):
    classic = {v.id: v for v in dicom_series.find_volumes(real / "mri_dicom/philips_fmap_cl")}
    enhanced = {v.id: v for v in dicom_series.find_volumes(real / "mri_dicom/philips_fmap_enh")}
    assert sorted(classic) == sorted(enhanced)
    for vid in classic:
        a, b = classic[vid].read(), enhanced[vid].read()
        assert a.GetSize() == b.GetSize() == (80, 80, 53)
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=TOL_MM)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b), rtol=1e-5, atol=1e-2)


def test_prone_and_supine_come_out_as_their_tags_say(real):
    """HFS and HFP share their orientation and position tags: the geometry must be identical (no re-orienting)."""
    hfs = read_volume(real / "mri_dicom/decubitus_siemens/HFS/3_t1_fl2d_sag")
    hfp = read_volume(real / "mri_dicom/decubitus_siemens/HFP/2_t1_fl2d_sag")
    assert hfs.GetSize() == hfp.GetSize() == (256, 256, 35)
    np.testing.assert_allclose(hfs.GetOrigin(), hfp.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(hfs.GetDirection(), hfp.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(np.array(hfs.GetDirection()).reshape(3, 3)[:, :2].T.ravel(), [0, 1, 0, 0, 0, -1])


def test_a_multi_echo_folder_read_as_one_volume_is_refused_with_the_ids(real):
    with pytest.raises(VolumeReadError, match="holds 2 volumes: 2_e1 .*TE 5.19.*; 2_e2 .*TE 7.65"):
        read_volume(real / "mri_dicom/fmap_siemens/2_gre_field_magph")
    image = read_volume(real / "mri_dicom/fmap_siemens/2_gre_field_magph", volume="2_e2")
    assert image.GetSize() == (64, 64, 36)
    np.testing.assert_allclose(image.GetSpacing(), (3.25, 3.25, 3.6), atol=1e-6)


def test_several_echo_sets_are_a_clear_error(real):
    with pytest.raises(VolumeReadError, match=r"2 candidate echo sets: \[2_e1, 2_e2\].*\[5_e1, 5_e2\]"):
        dicom_series.read_echoes(real / "mri_dicom/fmap_siemens")
    with pytest.raises(VolumeReadError, match=r"5 candidate echo sets: \[2_t1\]"):
        dicom_series.read_echoes(real / "mri_dicom/table_ge_ffs_hfs/02_Ax_fMRI_FF_I11.1_S15.9")


# -- the gantry-tilted, unevenly stepped CT -------------------------------------------------------------


def _sample(image: sitk.Image, ipp, iop, spacing, shape) -> np.ndarray:
    """``image`` resampled (linear) onto one source slice's own pixel grid."""
    row, col = iop[:3], iop[3:]
    reference = sitk.Image([shape[1], shape[0], 1], sitk.sitkFloat32)
    reference.SetOrigin(tuple(ipp))
    reference.SetSpacing((spacing[1], spacing[0], 1.0))
    reference.SetDirection(tuple(np.column_stack([row, col, np.cross(row, col)]).ravel()))
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, np.nan)
    return sitk.GetArrayFromImage(out)[0]


def test_tilted_ct_is_regularised_so_every_slice_lies_where_its_file_says(real, caplog):
    folder = real / TILTED_CT
    with caplog.at_level(logging.WARNING):
        image = read_volume(folder)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "gantry tilt 18.5 degrees" in warnings[0].lower() and "uneven" in warnings[0]
    files = sorted(folder.iterdir())
    tags = [frame_tags(p, None) for p in files]
    iop = tags[0][1]
    normal = np.cross(iop[:3], iop[3:])
    d = np.sort([np.dot(t[0], normal) for t in tags])
    # A regular grid from the first slice plane to the last, at the usual step (4.0 mm): 37 slices.
    assert image.GetSize() == (512, 512, 37)
    np.testing.assert_allclose(image.GetSpacing(), (0.48828125, 0.48828125, (d[-1] - d[0]) / 36), atol=1e-6)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction[:, 2], normal, atol=1e-6)
    grid_d = [np.dot(image.TransformIndexToPhysicalPoint((0, 0, k)), normal) for k in range(37)]
    assert abs(grid_d[0] - d[0]) < TOL_MM and abs(grid_d[-1] - d[-1]) < TOL_MM
    ds0 = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    spacing = [float(v) for v in ds0.PixelSpacing]
    on_grid = 0
    naive = sitk.ReadImage([str(p) for p in files])  # what a plain series reader does: a stack, no tilt
    for index, (ipp, iop_k, pixels) in enumerate(tags):
        ours = _sample(image, ipp, iop_k, spacing, pixels.shape)
        valid = np.isfinite(ours)
        assert valid.mean() > 0.8
        error = float(np.median(np.abs(ours[valid] - pixels[valid])))
        k = (np.dot(ipp, normal) - grid_d[0]) / image.GetSpacing()[2]
        if abs(k - round(k)) * image.GetSpacing()[2] <= TOL_MM:
            on_grid += 1
            assert error < 2.0, (index, error)  # the slice itself, read back where its file says
        else:
            assert error < 10.0, (index, error)  # between grid planes: interpolated along the normal
        if index > 3:  # the naive stack puts slice k about 2.1 k mm from where its file says
            naive_error = float(np.nanmedian(np.abs(_sample(naive, ipp, iop_k, spacing, pixels.shape) - pixels)))
            assert naive_error > 4 * max(error, 1.0), (index, error, naive_error)
    assert on_grid >= 15  # the 14 slices of the 4 mm part and the last slice


def test_missing_slice_single_slice_and_repeats_are_refused(real, tmp_path):
    source = real / "mri_dicom/fmap_siemens/5_gre_field_mag"
    echo1 = sorted(p for p in source.iterdir() if pydicom.dcmread(str(p), stop_before_pixels=True).EchoNumbers == 1)
    by_position = sorted(
        echo1, key=lambda p: float(pydicom.dcmread(str(p), stop_before_pixels=True).ImagePositionPatient[2])
    )
    gap = tmp_path / "gap"
    gap.mkdir()
    for p in by_position[:10] + by_position[11:]:
        shutil.copy(p, gap / p.name)
    with pytest.raises(VolumeReadError, match=r"1 slice\(s\) missing .* a 7.20 mm gap between .* 3.60 mm apart"):
        read_volume(gap)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(by_position[5], single / "one.dcm")
    with pytest.raises(VolumeReadError, match="is a single slice, not a 3D volume"):
        read_volume(single)
    twice = tmp_path / "twice"
    twice.mkdir()
    for p in by_position[:6]:
        shutil.copy(p, twice / p.name)
    shutil.copy(by_position[2], twice / "same_instance.dcm")  # a copied file: read once
    assert read_volume(twice).GetSize() == (64, 64, 6)
    repeat = pydicom.dcmread(str(by_position[2]))
    repeat.SOPInstanceUID = repeat.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    repeat.save_as(str(twice / "repeat.dcm"))  # another instance at the same position, nothing to tell it apart
    with pytest.raises(VolumeReadError, match="at the same position"):
        read_volume(twice)


def test_image_type_classification():
    assert dicom_series.classify_image_type(["ORIGINAL", "PRIMARY", "M", "ND"]) == "magnitude"
    assert dicom_series.classify_image_type(["ORIGINAL", "PRIMARY", "P", "ND"]) == "phase"
    assert dicom_series.classify_image_type(["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]) == "magnitude"
    assert dicom_series.classify_image_type(["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"]) == "phase"
    assert dicom_series.classify_image_type(["ORIGINAL", "PRIMARY", "R_FFE", "R", "FFE"]) == "real"
    assert dicom_series.classify_image_type(["ORIGINAL", "PRIMARY", "T1", "MIXED"], "IMAGINARY") == "imaginary"
    assert dicom_series.classify_image_type(["DERIVED", "PRIMARY", "B0 MAP"]) == "field_map"
    assert dicom_series.classify_image_type(["ORIGINAL", "PRIMARY", "OTHER"]) == "other"
    assert dicom_series.classify_image_type(["ORIGINAL", "PRIMARY", "OTHER"], "", 1) == "phase"


# -- command line ----------------------------------------------------------------------------------------

CONTRACT_KEYS = {
    "id",
    "series_uid",
    "series_description",
    "modality",
    "image_type",
    "echo_time_ms",
    "echo_number",
    "size",
    "spacing",
    "origin",
    "direction",
    "files",
    "warnings",
}


def test_inspect_json_contract_on_dicom_and_volume_files(real, tmp_path, capsys):
    assert main(["inspect", str(real / "mri_dicom/philips_fmap_enh"), "--json"]) == 0
    volumes = json.loads(capsys.readouterr().out)["volumes"]
    assert [v["id"] for v in volumes] == ["2001_mag_e1", "2001_mag_e2", "2001_phase_e1", "2001_phase_e2"]
    for v in volumes:
        assert CONTRACT_KEYS <= set(v)
        assert v["image_type"] in dicom_series.IMAGE_TYPES and v["modality"] == "MR"
        assert v["size"] == [80, 80, 53] and len(v["direction"]) == 9 and len(v["origin"]) == 3
        assert v["spacing"] == pytest.approx([3.0, 3.0, 3.0], abs=1e-4)
        assert v["warnings"] == [] and len(v["files"]) == 1
    image = read_volume(real / "mri_dicom/philips_fmap_enh", volume=volumes[3]["id"])
    assert volumes[3]["origin"] == pytest.approx(list(image.GetOrigin()), abs=1e-9)
    assert volumes[3]["direction"] == pytest.approx(list(image.GetDirection()), abs=1e-12)
    assert [v["echo_time_ms"] for v in volumes] == [2.3, 4.6, 2.3, 4.6]
    assert main(["inspect", str(real / TILTED_CT), "--json"]) == 0
    (ct,) = json.loads(capsys.readouterr().out)["volumes"]
    assert ct["size"] == [512, 512, 37] and len(ct["files"]) == 28 and "gantry tilt 18.5" in ct["warnings"][0].lower()
    nrrd = real / "mri/pyradiomics_brain1_t1post.nrrd"
    assert main(["inspect", str(nrrd), "--json"]) == 0
    (one,) = json.loads(capsys.readouterr().out)["volumes"]
    image = read_volume(nrrd)
    assert CONTRACT_KEYS <= set(one) and one["size"] == list(image.GetSize()) and one["files"] == [str(nrrd)]
    assert one["direction"] == pytest.approx(list(image.GetDirection()))
    assert main(["inspect", str(real / "mri_dicom/table_ge_ffs_hfs/01_3_Plane_Localizer_FF")]) == 0
    table = capsys.readouterr().out
    assert "1_o1" in table and "1_o3" in table and "3 volume(s) from 21 file(s)." in table


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_convert_round_trips_exactly(real, tmp_path, suffix, capsys):
    folder = real / "mri_dicom/xa30_fmap_enh/8_gre_field_mapping"
    out = tmp_path / f"echo2{suffix}"
    assert main(["convert", str(folder), "-o", str(out), "--volume", "8_e2", "--progress", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == str(out)
    source = read_volume(folder, volume="8_e2")
    back = read_volume(out)
    assert back.GetPixelID() == source.GetPixelID()
    assert back.GetSize() == source.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), source.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(back.GetSpacing(), source.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), source.GetDirection(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(source))
    again = tmp_path / f"again{suffix}"
    assert main(["convert", str(out), "-o", str(again), "--progress", "none"]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(again)), sitk.GetArrayFromImage(source))


def test_convert_without_a_volume_id_lists_them(real, tmp_path, capsys):
    code = main(
        ["convert", str(real / "mri_dicom/philips_fmap_cl"), "-o", str(tmp_path / "x.nii.gz"), "--progress", "none"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "holds 4 volumes" in err and "2001_phase_e2" in err and not (tmp_path / "x.nii.gz").exists()


# -- multi-echo straight into a model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_echo_model(tmp_path_factory):
    """A tiny untrained 2-echo model whose card gives TE 2 and 5 ms (the real set has 5.19 and 7.65 ms)."""
    torch = pytest.importorskip("torch")
    from SyntheticCTLib.models.architectures import build_network
    from SyntheticCTLib.models.package import write_model_package

    kwargs = {"depth": 2, "width": 4, "norm": "instance"}
    torch.manual_seed(0)
    net = build_network("unet3d", in_channels=2, **kwargs)
    card = {
        "name": "tiny-echoes",
        "version": "0.0.1",
        "architecture": {"name": "unet3d", "kwargs": dict(kwargs, in_channels=2)},
        "inputs": [{"name": "echo1", "echo_time_ms": 2.0}, {"name": "echo2", "echo_time_ms": 5.0}],
        "spacing_mm": [6.5, 6.5, 7.2],  # coarse: a few patches, a quick test
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5}] * 2,
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024, 3071]},
        "patch_size": [32, 32, 32],
        "overlap": 0.25,
    }
    return write_model_package(tmp_path_factory.mktemp("pkg") / "tiny", card, net.state_dict())


def test_synthesize_from_a_multi_echo_dicom_folder_feeds_echoes_in_te_order(real, two_echo_model, tmp_path, capsys):
    folder = real / "mri_dicom/fmap_siemens/2_gre_field_magph"
    base = ["--model", str(two_echo_model), "--device", "cpu", "--progress", "none"]
    assert main(["synthesize", "-i", str(folder), "-o", str(tmp_path / "dir.nii.gz")] + base) == 0
    err = capsys.readouterr().err
    assert "2_e1 (TE 5.19 ms), 2_e2 (TE 7.65 ms)" in err  # the order used, said once
    # The echo times from the headers go through the input check, against the card's protocol (TE 2, 5 ms).
    assert "acquired with TE 5.19, 7.65 ms at 3 T (from the DICOM headers of" in err
    assert "matches none of the protocols the model was trained on (TE 2, 5 ms)" in err
    for vid in ("2_e1", "2_e2"):  # NRRD keeps the geometry in doubles: the same grid, the same resampling
        assert main(["convert", str(folder), "--volume", vid, "-o", str(tmp_path / f"{vid}.nrrd")]) == 0
    echoes = [str(tmp_path / "2_e1.nrrd"), str(tmp_path / "2_e2.nrrd")]
    assert main(["synthesize", "-i", echoes[0], "-i", echoes[1], "-o", str(tmp_path / "files.nii.gz")] + base) == 0
    assert main(["synthesize", "-i", echoes[1], "-i", echoes[0], "-o", str(tmp_path / "swapped.nii.gz")] + base) == 0
    capsys.readouterr()
    from_dir = sitk.GetArrayFromImage(read_volume(tmp_path / "dir.nii.gz"))
    np.testing.assert_array_equal(from_dir, sitk.GetArrayFromImage(read_volume(tmp_path / "files.nii.gz")))
    assert np.any(from_dir != sitk.GetArrayFromImage(read_volume(tmp_path / "swapped.nii.gz")))
    assert from_dir.shape == (36, 64, 64)


def test_synthesize_refuses_a_folder_with_several_echo_sets_or_the_wrong_echo_count(
    real, two_echo_model, tmp_path, capsys
):
    base = ["--model", str(two_echo_model), "--device", "cpu", "--progress", "none"]
    out = tmp_path / "sct.nii.gz"
    assert main(["synthesize", "-i", str(real / "mri_dicom/fmap_siemens"), "-o", str(out)] + base) == 1
    err = capsys.readouterr().err
    assert "2 candidate echo sets: [2_e1, 2_e2]" in err and "[5_e1, 5_e2]" in err
    assert (
        main(["synthesize", "-i", str(real / "mri_dicom/fmap_siemens/3_gre_field_magph"), "-o", str(out)] + base) == 1
    )
    assert "holds no readable magnitude volume" in capsys.readouterr().err
    hfs = real / "mri_dicom/decubitus_siemens/HFS"
    assert main(["synthesize", "-i", str(hfs), "-o", str(out)] + base) == 1
    assert "holds a 1-echo set (3 (TE 2.46 ms)) but the model takes 2 input(s) (TE 2, 5 ms)" in capsys.readouterr().err
    assert not out.exists()


def test_a_dicom_file_given_directly_is_read_by_its_frames_not_as_a_stack(real):
    """The enhanced Philips file read naively is an 80x80x212 stack at 3 mm (a 633 mm head); here, 4 volumes."""
    (enhanced,) = sorted((real / "mri_dicom/philips_fmap_enh").iterdir())
    with pytest.raises(VolumeReadError, match="holds 4 volumes: 2001_mag_e1"):
        read_volume(enhanced)
    image = read_volume(enhanced, volume="2001_mag_e1")
    assert image.GetSize() == (80, 80, 53)
    extent = image.GetSpacing()[2] * (image.GetSize()[2] - 1)
    assert extent == pytest.approx(156.0, abs=0.05)  # 52 steps of 3 mm
    single = sorted((real / "mri_dicom/canon_oblique_b0/8000").iterdir())[0]
    with pytest.raises(VolumeReadError, match="is a single slice, not a 3D volume"):
        read_volume(single)


# -- regularisation against a known truth ----------------------------------------------------------------


def write_linear_series(folder: Path, positions, *, rows=32, cols=20, slope=0.1):
    """An axial MR series whose every pixel holds f(x, y, z) = x + 2y + 3z at its own patient position (LPS mm),
    stored as round(f / slope) with RescaleSlope ``slope``; files written in a shuffled InstanceNumber order."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    series, frame = generate_uid(), generate_uid()
    order = np.random.default_rng(0).permutation(len(positions))
    for k, position in enumerate(positions):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, sop, "MR"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.FrameOfReferenceUID = series, 7, frame
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.EchoTime, ds.EchoNumbers = 3.0, 1
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, 0
        y, x = np.mgrid[:rows, :cols].astype(float)
        f = (position[0] + x) + 2 * (position[1] + y) + 3 * position[2]
        ds.PixelData = np.rint(f / slope).astype("<i2").tobytes()
        ds.save_as(str(folder / f"im{int(order[k]):03d}.dcm"), enforce_file_format=True)


def _check_linear(image: sitk.Image, rows_from: int) -> float:
    """Largest |voxel - f(voxel position)| over the voxels whose source rows exist in every slice."""
    array = sitk.GetArrayFromImage(image).astype(float)
    nz, ny, nx = array.shape
    k, j, i = np.mgrid[:nz, :ny, :nx]
    points = np.array(image.GetOrigin()) + np.stack([i, j, k], -1) * np.array(image.GetSpacing())
    assert np.allclose(image.GetDirection(), np.eye(3).ravel())
    truth = points[..., 0] + 2 * points[..., 1] + 3 * points[..., 2]
    return float(np.max(np.abs(array - truth)[:, rows_from:, :]))


def test_tilted_uneven_synthetic_stack_is_resampled_exactly(tmp_path, caplog):
    """2 mm then 3 mm steps and an in-plane drift of 0.35 mm per mm (a 19.3 degree tilt): every voxel of the
    regular grid holds f at its own position (linear f: linear interpolation is exact) to the storage step."""
    d = [0, 2, 4, 6, 8, 11, 14, 17, 20]
    write_linear_series(tmp_path / "s", [(-5.0, 3.0 + 0.35 * z, 10.0 + z) for z in d])
    with caplog.at_level(logging.WARNING):
        image = read_volume(tmp_path / "s")
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Gantry tilt 19.3 degrees and uneven slice steps (2.00 to 3.00 mm)" in message and "11 slices" in message
    assert image.GetSize() == (20, 32, 11)
    np.testing.assert_allclose(image.GetSpacing(), (1.0, 1.0, 2.0), atol=1e-9)
    np.testing.assert_allclose(image.GetOrigin(), (-5.0, 3.0, 10.0), atol=1e-9)
    assert _check_linear(image, rows_from=8) <= 0.05 + 1e-6  # the 0.1 storage step, rounded


def test_jittered_steps_keep_the_slice_count_and_regular_steps_are_untouched(tmp_path):
    jitter = [0.0, 0.04, -0.03, 0.05, 0.0, -0.05, 0.02, 0.0]
    write_linear_series(tmp_path / "j", [(0.0, 0.0, 3.0 * k + e) for k, e in enumerate(jitter)])
    (volume,) = dicom_series.find_volumes(tmp_path / "j")
    assert volume.regularized and volume.size == (20, 32, 8) and "uneven slice steps" in volume.warnings[0].lower()
    assert _check_linear(volume.read(), rows_from=0) <= 0.05 + 1e-6
    write_linear_series(tmp_path / "r", [(0.0, 0.0, -2.5 * k) for k in range(6)])  # written top-down
    (volume,) = dicom_series.find_volumes(tmp_path / "r")
    assert not volume.regularized and volume.warnings == [] and volume.size == (20, 32, 6)
    image = volume.read()
    np.testing.assert_allclose(image.GetOrigin(), (0.0, 0.0, -12.5))  # sorted along the normal, not by instance
    assert _check_linear(image, rows_from=0) <= 0.05 + 1e-6


def test_one_series_exported_both_classic_and_enhanced_is_told_apart_by_format(real, tmp_path):
    """philips_fmap_cl and philips_fmap_enh are one series (one SeriesInstanceUID) exported twice."""
    both = tmp_path / "both"
    shutil.copytree(real / "mri_dicom/philips_fmap_cl", both / "cl")
    shutil.copytree(real / "mri_dicom/philips_fmap_enh", both / "enh")
    volumes = dicom_series.find_volumes(both)
    ids = sorted(v.id for v in volumes)
    assert ids == sorted(
        f"2001_{t}_e{e}_{f}" for t in ("mag", "phase") for e in (1, 2) for f in ("classic", "enhanced")
    )
    assert all(v.readable and v.size == (80, 80, 53) for v in volumes)


def test_images_without_patient_geometry_are_named_in_the_error(tmp_path):
    write_linear_series(tmp_path / "s", [(0.0, 0.0, 3.0 * k) for k in range(3)])
    for path in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(str(path))
        del ds.ImageOrientationPatient
        ds.save_as(str(path))
    (tmp_path / "s" / "notes.txt").write_text("not an image")
    with pytest.raises(
        VolumeReadError, match=r"holds no DICOM series \(.*im00\d.dcm' has no valid ImageOrientationPatient"
    ):
        read_volume(tmp_path / "s")


def test_another_acquisition_shifted_half_a_millimetre_in_the_same_series_is_refused_or_split(real, tmp_path):
    """Issue 14, defect 11: slices of a second acquisition under one SeriesInstanceUID, 0.5 mm off the first,
    must never be stacked into one volume as if they were one."""
    source = real / "mri_dicom/fmap_siemens/5_gre_field_mag"
    echo1 = sorted(p for p in source.iterdir() if pydicom.dcmread(str(p), stop_before_pixels=True).EchoNumbers == 1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in echo1:
        shutil.copy(p, mixed / p.name)
    for p in echo1:  # the second acquisition: same series, every slice moved 0.5 mm along the slice normal
        ds = pydicom.dcmread(str(p))
        normal = np.cross(
            np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        )
        ds.ImagePositionPatient = [float(v) for v in np.array(ds.ImagePositionPatient, float) + 0.5 * normal]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.AcquisitionNumber = int(getattr(ds, "AcquisitionNumber", 1) or 1) + 1
        ds.save_as(str(mixed / f"second_{p.name}"))
    try:
        volumes = dicom_series.find_volumes(mixed)
        for volume in volumes:
            read_volume(mixed, volume=volume.id)
    except VolumeReadError as error:  # refused: fine, as long as it says why
        assert str(mixed) in str(error) or "acquisition" in str(error).lower() or "position" in str(error).lower()
        return
    # split: no volume may hold slices of both acquisitions (each keeps the single acquisition's 36 slices)
    sizes = sorted(v.size[2] for v in volumes)
    assert sizes == [36, 36], [(v.id, v.size) for v in volumes]
