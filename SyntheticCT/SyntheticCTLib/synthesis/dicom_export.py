"""Write a synthetic CT as a DICOM CT series (CT Image Storage) that a PACS or navigation system accepts.

One file per slice of the ``sitk`` z axis, with:

- new Series and SOP Instance UIDs (:func:`pydicom.uid.generate_uid`); Modality ``CT``; SOP Class CT
  Image Storage; ImageType ``DERIVED\\SECONDARY\\AXIAL``; SeriesDescription, ImageComments and
  DerivationDescription marking the series synthetic and not for diagnostic use; BurnedInAnnotation ``NO``;
- geometry from the image actually synthesized (never from the source's tags): ImageOrientationPatient (the direction's first two columns, oblique
  included), ImagePositionPatient per slice, PixelSpacing (row spacing = y, column spacing = x),
  SliceThickness and SpacingBetweenSlices (z);
- HU through Rescale Slope 1 and Intercept: unsigned 16-bit storage with intercept -1024 (12 bits
  stored when the HU fit in [-1024, 3071], the classic CT layout), or signed 16-bit with intercept 0
  when values fall below -1024;
- patient, study and frame-of-reference tags copied from the source MRI series when there is one:
  an image read from DICOM by :func:`SyntheticCTLib.kernel.io.read_volume` (which keeps the first slice's
  tags as ``"gggg|eeee"`` metadata), a DICOM folder or file, or a pydicom dataset. The frame of
  reference is shared, since the sCT lies in the MRI's patient coordinates.

A direction matrix whose z axis points against ``row x column`` (a left-handed index frame) is
written with its slice order reversed: DICOM readers order slices along ``row x column``, so the
series reads back as the same physical volume with the z axis flipped.

The series is assembled in a temporary folder beside the target and renamed into place: a failed
or cancelled export leaves nothing behind.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib import NOT_FOR_DIAGNOSTIC_USE, __version__
from SyntheticCTLib.kernel.errors import InvalidParameterError, VolumeReadError, VolumeWriteError
from SyntheticCTLib.kernel.io import replace_folder
from SyntheticCTLib.kernel.progress import CancelToken, ProgressCallback, no_progress, with_cancel
from SyntheticCTLib.kernel.types import PathLike

logger = logging.getLogger(__name__)


SERIES_DESCRIPTION = "Synthetic CT - not for diagnostic use"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
POSITION_TOL_MM = 1e-3
"""Largest allowed difference between a slice's written ImagePositionPatient and the image's own."""

# Tags copied from the source MRI: patient, study, frame of reference, and the patient's position.
COPIED_TAGS = (
    (0x0008, 0x0005),  # SpecificCharacterSet
    (0x0010, 0x0010),  # PatientName
    (0x0010, 0x0020),  # PatientID
    (0x0010, 0x0021),  # IssuerOfPatientID
    (0x0010, 0x0030),  # PatientBirthDate
    (0x0010, 0x0032),  # PatientBirthTime
    (0x0010, 0x0040),  # PatientSex
    (0x0010, 0x1000),  # OtherPatientIDs
    (0x0010, 0x1010),  # PatientAge
    (0x0010, 0x1020),  # PatientSize
    (0x0010, 0x1030),  # PatientWeight
    (0x0012, 0x0062),  # PatientIdentityRemoved
    (0x0012, 0x0063),  # DeidentificationMethod
    (0x0020, 0x000D),  # StudyInstanceUID
    (0x0008, 0x0020),  # StudyDate
    (0x0008, 0x0030),  # StudyTime
    (0x0020, 0x0010),  # StudyID
    (0x0008, 0x0050),  # AccessionNumber
    (0x0008, 0x0090),  # ReferringPhysicianName
    (0x0008, 0x1030),  # StudyDescription
    (0x0020, 0x0052),  # FrameOfReferenceUID
    (0x0020, 0x1040),  # PositionReferenceIndicator
    (0x0018, 0x5100),  # PatientPosition
    (0x0018, 0x0015),  # BodyPartExamined
)


@dataclass(frozen=True)
class DicomExport:
    """What :func:`export_dicom_series` wrote."""

    folder: Path
    series_instance_uid: str
    study_instance_uid: str
    n_files: int
    copied_tags: int
    """How many patient/study tags came from the source."""


# -- source tags -----------------------------------------------------------------------------------------


def _source_dataset(source: Any):
    """A pydicom Dataset with the source's tags (only those in :data:`COPIED_TAGS` matter), or None."""
    import pydicom
    from pydicom.datadict import dictionary_VR
    from pydicom.dataset import Dataset

    if source is None:
        return None
    if isinstance(source, Dataset):
        return source
    if isinstance(source, sitk.Image):
        ds = Dataset()
        keys = set(source.GetMetaDataKeys())
        for group, element in COPIED_TAGS:
            key = f"{group:04x}|{element:04x}"
            if key not in keys:
                continue
            value = source.GetMetaData(key).strip().strip("\x00").strip()
            tag = (group << 16) | element
            vr = dictionary_VR(tag)
            ds.add_new(tag, vr, value)
        return ds if len(ds) else None
    path = Path(source)
    if not path.exists():
        raise VolumeReadError(f"The DICOM source '{path}' does not exist.")
    files = [path]
    if path.is_dir():
        from SyntheticCTLib.kernel.io import list_dicom_series

        series = list_dicom_series(path)
        if not series:
            raise VolumeReadError(f"The DICOM source folder '{path}' holds no DICOM series.")
        files = [Path(series[0].files[0])]
    try:
        return pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    except Exception as e:  # pydicom raises InvalidDicomError and various decoding errors
        raise VolumeReadError(f"Cannot read the DICOM source '{files[0]}': {e}") from e


def _copy_source_tags(ds, source_ds) -> int:
    if source_ds is None:
        return 0
    n = 0
    for group, element in COPIED_TAGS:
        tag = (group << 16) | element
        if tag in source_ds:
            elem = source_ds[tag]  # empty values too: an anonymised source stays anonymous
            ds.add_new(tag, elem.VR, elem.value)
            n += 1
    return n


# -- geometry --------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    text = format_number_as_ds(float(value))
    return "0" if text in ("-0", "-0.0") else text


def _right_handed(image: sitk.Image) -> sitk.Image:
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InvalidParameterError(
            f"The image's direction matrix {tuple(np.round(direction.ravel(), 5))} is not orthonormal (sheared); "
            "DICOM cannot represent it. Resample onto an orthogonal grid first."
        )
    if np.dot(np.cross(direction[:, 0], direction[:, 1]), direction[:, 2]) < 0:
        logger.info(
            "The image's index frame is left-handed; writing its slices in reverse order, as DICOM "
            "readers order them along row x column."
        )
        flipped = sitk.Flip(image, [False, False, True])
        return flipped
    return image


def _hu_storage(array: np.ndarray, signed: Optional[bool]):
    """(stored array, intercept, pixel_representation, bits_stored)."""
    lo, hi = int(array.min()), int(array.max())
    if signed is None:
        signed = lo < -1024 or hi > 65535 - 1024
    if signed:
        if lo < -32768 or hi > 32767:
            raise InvalidParameterError(f"HU range [{lo}, {hi}] does not fit 16-bit signed storage.")
        return array.astype(np.int16), 0, 1, 16
    if lo < -1024 or hi > 65535 - 1024:
        raise InvalidParameterError(f"HU range [{lo}, {hi}] does not fit unsigned storage with intercept -1024.")
    stored = (array.astype(np.int32) + 1024).astype(np.uint16)
    return stored, -1024, 0, 12 if hi <= 4095 - 1024 else 16


# -- writing ---------------------------------------------------------------------------------------------


def check_dicom_target(out_dir: Path, inputs: Iterable[PathLike], overwrite: bool) -> None:
    resolved = out_dir.resolve()
    for item in inputs:
        p = Path(item).resolve()
        if p == resolved or resolved in p.parents:
            raise VolumeWriteError(
                f"Refusing to write the DICOM series into '{out_dir}': it holds or is an input "
                f"('{item}'), and inputs are never overwritten."
            )
    if out_dir.exists():
        if not out_dir.is_dir():
            raise VolumeWriteError(f"Cannot write a DICOM series to '{out_dir}': it is a file.")
        if any(out_dir.iterdir()) and not overwrite:
            raise VolumeWriteError(
                f"'{out_dir}' exists and is not empty; choose a new folder (or pass overwrite=True to replace it)."
            )


def _save(ds, path: Path) -> None:
    import pydicom

    try:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        pydicom.dcmwrite(str(path), ds, write_like_original=False)


def export_dicom_series(
    sct: sitk.Image,
    out_dir: PathLike,
    *,
    source: Any = None,
    series_description: str = SERIES_DESCRIPTION,
    series_number: Optional[int] = None,
    signed: Optional[bool] = None,
    inputs: Iterable[PathLike] = (),
    overwrite: bool = False,
    extra_tags: Optional[Mapping[str, Any]] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
) -> DicomExport:
    """Write ``sct`` (HU) as a DICOM CT series into the folder ``out_dir``.

    Parameters
    ----------
    sct
        The synthetic CT, HU (integer or float, rounded), 3D.
    out_dir
        The series folder; it must not exist or be empty (or ``overwrite``).
    source
        The source MRI for patient/study tags: a ``sitk.Image`` read from DICOM (its ``"gggg|eeee"``
        metadata), a DICOM folder or file path, or a pydicom Dataset; None: new study, anonymous patient.
    series_description
        Must say that the series is synthetic (``"synthetic"`` is added when missing).
    series_number
        Default: the source's SeriesNumber + 1000, or 1000.
    signed
        Storage: None chooses (unsigned with intercept -1024 unless HU < -1024), True signed, False unsigned.
    inputs
        Paths that must not be written into (e.g. the source folder).
    extra_tags
        Keyword -> value set last (e.g. ``{"InstitutionName": "..."}``).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    report = with_cancel(progress or no_progress, cancel)
    out_dir = Path(out_dir)
    if sct.GetDimension() != 3 or sct.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidParameterError("The synthetic CT must be a scalar 3D image.")
    inputs = list(inputs)
    if source is not None and not isinstance(source, sitk.Image) and isinstance(source, (str, os.PathLike)):
        inputs.append(source)
    check_dicom_target(out_dir, inputs, overwrite)
    if "synthetic" not in series_description.lower():
        series_description = f"Synthetic CT - {series_description}"
    series_description = series_description[:64]

    report(0.0, "dicom", "preparing")
    source_ds = _source_dataset(source)
    image = _right_handed(sct)
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        array = np.rint(array)
    stored, intercept, representation, bits_stored = _hu_storage(array, signed)
    del array

    size = image.GetSize()
    spacing = image.GetSpacing()
    origin = np.array(image.GetOrigin(), dtype=float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    row_dir, col_dir, slice_dir = direction[:, 0], direction[:, 1], direction[:, 2]
    normal = np.cross(row_dir, col_dir)
    iop = [_ds(v) for v in list(row_dir) + list(col_dir)]

    now = datetime.datetime.now()
    date, time_ = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    series_uid = generate_uid()
    base = pydicom.Dataset()
    n_copied = _copy_source_tags(base, source_ds)
    if "StudyInstanceUID" not in base:
        base.StudyInstanceUID = generate_uid()
        base.StudyDate, base.StudyTime = date, time_
        base.StudyID = ""
        base.AccessionNumber = ""
        base.ReferringPhysicianName = ""
    if "PatientName" not in base:
        base.PatientName = "Anonymous"
    if "PatientID" not in base:
        base.PatientID = "SYNTHETIC"
    for keyword in ("PatientBirthDate", "PatientSex"):
        if keyword not in base:
            setattr(base, keyword, "")
    if "FrameOfReferenceUID" not in base:
        base.FrameOfReferenceUID = generate_uid()
    if "PositionReferenceIndicator" not in base:
        base.PositionReferenceIndicator = ""
    if series_number is None:
        src_number = getattr(source_ds, "SeriesNumber", None) if source_ds is not None else None
        if src_number is None and isinstance(source, sitk.Image) and source.HasMetaDataKey("0020|0011"):
            src_number = source.GetMetaData("0020|0011").strip() or None
        try:
            series_number = int(src_number) + 1000 if src_number is not None else 1000
        except (TypeError, ValueError):
            series_number = 1000
    model = ""
    if sct.HasMetaDataKey("SyntheticCT|model"):
        model = f" with model {sct.GetMetaData('SyntheticCT|model')}"
        if sct.HasMetaDataKey("SyntheticCT|model_version"):
            model += f" {sct.GetMetaData('SyntheticCT|model_version')}"

    base.SOPClassUID = CT_IMAGE_STORAGE
    base.Modality = "CT"
    base.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = int(series_number)
    base.SeriesDescription = series_description
    base.SeriesDate, base.SeriesTime = date, time_
    base.ContentDate, base.ContentTime = date, time_
    base.InstanceCreationDate, base.InstanceCreationTime = date, time_
    base.Manufacturer = "SyntheticCT (open source)"
    base.ManufacturerModelName = "SyntheticCT"
    base.SoftwareVersions = __version__
    base.DerivationDescription = (
        f"Synthetic CT computed from MRI by SyntheticCT {__version__}{model}. {NOT_FOR_DIAGNOSTIC_USE}"
    )[:1024]
    base.ImageComments = NOT_FOR_DIAGNOSTIC_USE
    base.BurnedInAnnotation = "NO"
    base.LossyImageCompression = "00"
    base.KVP = ""
    base.AcquisitionNumber = ""
    base.ImageOrientationPatient = iop
    base.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (y), column spacing (x)
    base.SliceThickness = _ds(spacing[2])
    base.SpacingBetweenSlices = _ds(spacing[2])
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = int(size[1]), int(size[0])
    base.BitsAllocated = 16
    base.BitsStored = bits_stored
    base.HighBit = bits_stored - 1
    base.PixelRepresentation = representation
    base.RescaleIntercept = str(intercept)
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    base.WindowCenter = ["40", "500"]
    base.WindowWidth = ["400", "2000"]
    base.WindowCenterWidthExplanation = ["SOFT TISSUE", "BONE"]
    for keyword, value in (extra_tags or {}).items():
        setattr(base, keyword, value)

    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise VolumeWriteError(f"Cannot write into '{parent}': {e.strerror or e}.") from e
    try:
        for k in range(size[2]):
            report(k / size[2], "dicom", f"slice {k + 1} of {size[2]}")
            ds = pydicom.Dataset()
            ds.update(base)
            sop_uid = generate_uid()
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = k + 1
            # The position of slice k is the image's own (the geometry the sCT was computed on), and is
            # checked after formatting: a series that a navigation system overlays must not drift.
            position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)), dtype=float)
            ds.ImagePositionPatient = [_ds(v) for v in position]
            written = np.array([float(v) for v in ds.ImagePositionPatient])
            if np.max(np.abs(written - position)) > POSITION_TOL_MM or (
                np.linalg.norm(position - (origin + k * spacing[2] * slice_dir)) > POSITION_TOL_MM
            ):
                raise VolumeWriteError(
                    f"Slice {k + 1} would be written at {tuple(np.round(written, 3))} instead of "
                    f"{tuple(np.round(position, 3))} mm; nothing was exported."
                )
            ds.SliceLocation = _ds(float(np.dot(position, normal)))
            ds.PixelData = np.ascontiguousarray(stored[k]).astype("<u2" if representation == 0 else "<i2").tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            if int(pydicom.__version__.split(".")[0]) < 3:
                ds.is_little_endian, ds.is_implicit_VR = True, False
            ds["PixelData"].VR = "OW"
            _save(ds, tmp / f"CT{k + 1:05d}.dcm")
        report(1.0, "dicom", f"{size[2]} slices")
        if cancel is not None:
            cancel.check()
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote the DICOM CT series '%s' (%d slices, SeriesInstanceUID %s).", out_dir, size[2], series_uid)
    return DicomExport(
        folder=out_dir,
        series_instance_uid=series_uid,
        study_instance_uid=str(base.StudyInstanceUID),
        n_files=int(size[2]),
        copied_tags=n_copied,
    )


def source_tags(source: Any) -> Dict[str, str]:
    """The patient/study tags :func:`export_dicom_series` would copy from ``source``, keyword -> text."""
    ds = _source_dataset(source)
    out: Dict[str, str] = {}
    if ds is None:
        return out
    for group, element in COPIED_TAGS:
        tag = (group << 16) | element
        if tag in ds:
            out[ds[tag].keyword] = str(ds[tag].value)
    return out


__all__ = [
    "SERIES_DESCRIPTION",
    "COPIED_TAGS",
    "DicomExport",
    "check_dicom_target",
    "export_dicom_series",
    "source_tags",
]
