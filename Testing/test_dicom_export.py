"""DICOM CT export: geometry and HU round trips (SimpleITK and pydicom), tags, source tags, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from SyntheticCTLib.kernel.errors import Cancelled, InvalidParameterError, VolumeWriteError
from SyntheticCTLib.kernel.io import read_volume
from SyntheticCTLib.kernel.progress import CancelToken
from SyntheticCTLib.synthesis.dicom_export import SERIES_DESCRIPTION, export_dicom_series

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def oblique_sct(size=(11, 9, 7), spacing=(0.7, 1.3, 2.5), *, low=-1024, high=3071, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(low, high + 1, size=size[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-12.5, 40.25, 101.0))
    image.SetDirection(sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix())
    return image


def read_series(folder: Path):
    datasets = [pydicom.dcmread(str(p)) for p in folder.iterdir()]
    return sorted(datasets, key=lambda d: int(d.InstanceNumber))


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


def test_round_trip_oblique_anisotropic(tmp_path):
    sct = oblique_sct()
    out = tmp_path / "sct_dicom"
    written = export_dicom_series(sct, out)
    assert written.n_files == 7 and len(list(out.iterdir())) == 7
    # SimpleITK (GDCM) reads the same geometry and HU.
    back = read_volume(out)
    assert_same_geometry(back, sct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(sct))
    # pydicom: tags and per-slice geometry.
    datasets = read_series(out)
    hu = sitk.GetArrayFromImage(sct)
    direction = np.array(sct.GetDirection()).reshape(3, 3)
    sop_uids = set()
    for k, ds in enumerate(datasets):
        assert ds.Modality == "CT" and ds.SOPClassUID == CT_IMAGE_STORAGE
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == SERIES_DESCRIPTION and "synthetic" in ds.SeriesDescription.lower()
        assert ds.BurnedInAnnotation == "NO" and "not for diagnostic use" in ds.DerivationDescription.lower()
        assert ds.SeriesInstanceUID == written.series_instance_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        sop_uids.add(ds.SOPInstanceUID)
        assert (ds.Rows, ds.Columns) == (9, 11)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [1.3, 0.7])  # row (y), column (x)
        assert float(ds.SliceThickness) == pytest.approx(2.5)
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient], list(direction[:, 0]) + list(direction[:, 1]), atol=1e-9
        )
        expected_ipp = np.array(sct.GetOrigin()) + k * 2.5 * direction[:, 2]
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected_ipp, atol=1e-6)
        values = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(values, hu[k])
    assert len(sop_uids) == 7


def test_signed_storage_below_minus_1024(tmp_path):
    sct = oblique_sct(low=-3000, high=3000, seed=1)
    export_dicom_series(sct, tmp_path / "s")
    ds = read_series(tmp_path / "s")[0]
    assert ds.PixelRepresentation == 1 and int(ds.RescaleIntercept) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(tmp_path / "s")), sitk.GetArrayFromImage(sct))


def test_left_handed_frame_reads_back_as_the_same_physical_volume(tmp_path):
    sct = oblique_sct(seed=2)
    d = np.array(sct.GetDirection()).reshape(3, 3)
    d[:, 2] *= -1
    sct.SetDirection(tuple(d.ravel()))
    export_dicom_series(sct, tmp_path / "lh")
    back = read_volume(tmp_path / "lh")
    flipped = sitk.Flip(sct, [False, False, True])
    assert_same_geometry(back, flipped)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(flipped))


def write_mr_series(folder: Path, *, n=5, rows=9, cols=11):
    """A small MR DICOM series written with pydicom: the 'source MRI' whose patient/study tags must carry over."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(5)
    sops = []
    for k in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "PID-0042", "19700101", "F"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study, "20240102", "101010"
        ds.AccessionNumber, ds.StudyID, ds.StudyDescription = "ACC123", "7", "Lumbar spine MRI"
        ds.ReferringPhysicianName = "Ref^Doc"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 3, "MR"
        ds.FrameOfReferenceUID, ds.PatientPosition = frame, "HFS"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-20.0, -30.0, 5.0 + 3.0 * k]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.9], 3.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = rng.integers(0, 1000, (rows, cols)).astype("<u2").tobytes()
        ds.save_as(str(folder / f"mr{k}.dcm"), enforce_file_format=True)
        sops.append(sop)
    return {"study": study, "series": series, "frame": frame, "sops": set(sops)}


@pytest.mark.parametrize("as_image", [True, False], ids=["sitk-metadata", "folder-path"])
def test_patient_and_study_tags_copied_from_dicom_source(tmp_path, as_image):
    uids = write_mr_series(tmp_path / "mr")
    mri = read_volume(tmp_path / "mr")
    sct = sitk.Cast(sitk.ShiftScale(mri, -500), sitk.sitkInt16)
    sct.CopyInformation(mri)
    out = tmp_path / "sct"
    export_dicom_series(sct, out, source=mri if as_image else tmp_path / "mr")
    datasets = read_series(out)
    for ds in datasets:
        assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "PID-0042"
        assert ds.PatientBirthDate == "19700101" and ds.PatientSex == "F"
        assert ds.StudyInstanceUID == uids["study"] and ds.AccessionNumber == "ACC123"
        assert ds.StudyDescription == "Lumbar spine MRI" and ds.StudyDate == "20240102"
        assert ds.FrameOfReferenceUID == uids["frame"]  # same patient coordinates as the MRI
        assert ds.PatientPosition == "HFS"
        assert ds.SeriesInstanceUID != uids["series"] and ds.SOPInstanceUID not in uids["sops"]
        assert int(ds.SeriesNumber) == 1003
    back = read_volume(out)
    assert_same_geometry(back, mri)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(sct))


def test_real_dicom_series_as_source(tmp_path):
    folder = REAL / "ct" / "totalsegmentator_example_ct_dicom"
    if not folder.is_dir():
        pytest.skip(f"real DICOM data not found at {folder} (../shared/data/real is absent in this checkout)")
    source = read_volume(folder)
    hu = np.clip(sitk.GetArrayFromImage(source), -1024, 3071).astype(np.int16)
    sct = sitk.GetImageFromArray(hu)
    sct.CopyInformation(source)
    export_dicom_series(sct, tmp_path / "sct", source=folder)
    first = pydicom.dcmread(str(sorted(folder.iterdir())[0]), stop_before_pixels=True)
    ds = read_series(tmp_path / "sct")[0]
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "StudyDate"):
        if keyword in first:
            assert str(getattr(ds, keyword)) == str(getattr(first, keyword)), keyword
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    back = read_volume(tmp_path / "sct")
    assert_same_geometry(back, source)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), hu)


def test_cancel_and_refusals_leave_nothing(tmp_path):
    sct = oblique_sct()
    token = CancelToken()

    def progress(fraction, stage="", message=""):
        if message.startswith("slice 3 "):
            token.cancel()

    with pytest.raises(Cancelled):
        export_dicom_series(sct, tmp_path / "cancelled", progress=progress, cancel=token)
    assert list(tmp_path.iterdir()) == []  # neither the series nor a temporary folder
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(VolumeWriteError, match="not empty"):
        export_dicom_series(sct, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    uids = write_mr_series(tmp_path / "mr")
    assert uids
    with pytest.raises(VolumeWriteError, match="inputs are never overwritten"):
        export_dicom_series(sct, tmp_path / "mr", source=tmp_path / "mr", overwrite=True)
    assert len(list((tmp_path / "mr").iterdir())) == 5
    sheared = oblique_sct()
    sheared.SetDirection((1, 0.3, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InvalidParameterError, match="not orthonormal"):
        export_dicom_series(sheared, tmp_path / "sheared")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "mr"]


def _ipp(path: Path) -> np.ndarray:
    return np.array([float(v) for v in pydicom.dcmread(str(path), stop_before_pixels=True).ImagePositionPatient])


def test_exported_slices_lie_where_the_source_slices_lie_real_mri(tmp_path, real_data_dir):
    """Each exported slice k lies where the source MRI's slice k lies, by the source files' own tags."""
    from SyntheticCTLib.kernel import dicom_series

    folder = real_data_dir / "mri_dicom" / "canon_oblique_b0" / "8000"  # double oblique
    (volume,) = dicom_series.find_volumes(folder)
    mri = volume.read()
    sct = sitk.GetImageFromArray(np.clip(sitk.GetArrayFromImage(mri), -1024, 3071).astype(np.int16))
    sct.CopyInformation(mri)
    export_dicom_series(sct, tmp_path / "sct", source=mri)
    exported = read_series(tmp_path / "sct")
    assert len(exported) == len(volume.frames) == 40
    for ds, frame in zip(exported, volume.frames):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], _ipp(frame.path), atol=0.05)
        source = pydicom.dcmread(str(frame.path), stop_before_pixels=True)
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient],
            [float(v) for v in source.ImageOrientationPatient],
            atol=1e-3,
        )


def test_exported_tilted_ct_lies_on_the_regularised_grid_and_on_its_source_planes(tmp_path, real_data_dir, caplog):
    """The gantry-tilted CT: the export takes the regularised grid, and its planes are the source files' planes."""
    import logging

    folder = real_data_dir / "ct" / "dcm_qa_ct_ge_head_tilt_dicom"
    regular = read_volume(folder)
    hu = np.rint(np.clip(sitk.GetArrayFromImage(regular), -1024, 3071)).astype(np.int16)
    sct = sitk.GetImageFromArray(hu)
    sct.CopyInformation(regular)
    export_dicom_series(sct, tmp_path / "sct", source=folder)
    exported = read_series(tmp_path / "sct")
    assert len(exported) == regular.GetDepth() == 37
    direction = np.array(regular.GetDirection()).reshape(3, 3)
    normal = direction[:, 2]
    planes = {}
    for k, ds in enumerate(exported):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(ipp, regular.TransformIndexToPhysicalPoint((0, 0, k)), atol=0.05)
        planes[k] = float(np.dot(ipp, normal))
    # Source slices of the 4 mm part (and the last) lie on grid planes k: the exported slice k has the same plane.
    sources = sorted(folder.iterdir(), key=lambda p: float(np.dot(_ipp(p), normal)))
    step = regular.GetSpacing()[2]
    matched = 0
    for path in sources:
        d = float(np.dot(_ipp(path), normal))
        k = (d - planes[0]) / step
        if abs(k - round(k)) * step <= 0.05:
            assert abs(planes[int(round(k))] - d) <= 0.05
            matched += 1
    assert matched >= 15
    # A plain series reader (what a PACS or navigation system does) reads back the same grid, without a warning.
    with caplog.at_level(logging.WARNING):
        back = sitk.ReadImage([str(p) for p in sorted((tmp_path / "sct").iterdir())])
    assert_same_geometry(back, sct, tol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), hu)
    assert ds.FrameOfReferenceUID == pydicom.dcmread(str(sources[0]), stop_before_pixels=True).FrameOfReferenceUID


def test_synthesize_dicom_out_on_the_tilted_ct_writes_slices_where_the_source_slices_lie(tmp_path, real_data_dir):
    """End to end: `synthesize -i TILTED_DIR --dicom-out` places every slice on the regularised grid (not 49 mm off)."""
    torch = pytest.importorskip("torch")
    from SyntheticCTLib.cli.main import main
    from SyntheticCTLib.models.architectures import build_network
    from SyntheticCTLib.models.package import write_model_package

    kwargs = {"depth": 2, "width": 4, "norm": "instance"}
    torch.manual_seed(0)
    card = {
        "name": "tiny-one",
        "version": "0.0.1",
        "architecture": {"name": "unet3d", "kwargs": dict(kwargs, in_channels=1)},
        "inputs": [{"name": "image"}],
        "spacing_mm": [4.0, 4.0, 4.0],
        "normalization": [{"method": "percentile", "lower": 0.5, "upper": 99.5}],
        "output": {"scale": 1000.0, "offset": 0.0, "clip": [-1024, 3071]},
        "patch_size": [32, 32, 32],
        "overlap": 0.25,
    }
    package = write_model_package(
        tmp_path / "tiny", card, build_network("unet3d", in_channels=1, **kwargs).state_dict()
    )
    folder = real_data_dir / "ct" / "dcm_qa_ct_ge_head_tilt_dicom"
    out = tmp_path / "sct_dicom"
    args = ["synthesize", "-i", str(folder), "-o", str(tmp_path / "sct.nii.gz"), "--dicom-out", str(out)]
    assert main(args + ["--model", str(package), "--device", "cpu", "--progress", "none"]) == 0
    regular = read_volume(folder)
    exported = read_series(out)
    assert len(exported) == 37
    normal = np.array(regular.GetDirection()).reshape(3, 3)[:, 2]
    planes = []
    for k, ds in enumerate(exported):
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(ipp, regular.TransformIndexToPhysicalPoint((0, 0, k)), atol=0.05)
        planes.append(float(np.dot(ipp, normal)))
    source_planes = sorted(float(np.dot(_ipp(p), normal)) for p in folder.iterdir())
    # Each source slice plane of the 4 mm part is the exported slice plane of the same index.
    np.testing.assert_allclose(planes[:14], source_planes[:14], atol=0.05)
    assert abs(planes[-1] - source_planes[-1]) <= 0.05
