"""Read DICOM the way scanners send it: one volume per echo, image type, orientation and time point.

A DICOM *series* is not a volume. A multi-echo gradient echo sends all its echoes in one series,
often magnitude and phase together; an enhanced (multi-frame) file holds them all as frames; a
3-plane localizer holds three orientations; an fMRI series holds every time point. This module:

- scans a file or folder (recursively) with pydicom, one record per 2D frame (classic files and the
  per-frame functional groups of enhanced multi-frame files alike);
- splits the frames into volumes by series, image type (magnitude, phase, real, imaginary, field
  map), echo (EchoNumbers, EchoTime), orientation and matrix, and, where slice positions repeat,
  by temporal position / acquisition number / trigger time / b-value / acquisition time;
- sorts each volume along the slice normal (``row x column`` of ImageOrientationPatient), never by
  InstanceNumber, and takes geometry from the orientation and position tags alone (never from
  PatientPosition: prone, decubitus and feet-first exams come out as their tags say);
- detects gantry tilt (positions that drift in-plane), uneven slice steps and missing slices. A
  tilted or uneven stack is resampled onto a regular grid in the patient frame (axes row, column,
  normal; first and last slice planes kept) so that every slice lies where its file says, with one
  plain warning. Missing slices, huge gaps, repeated positions that nothing tells apart and single
  slices are refused with the file and the reason.

Pixels come from pydicom (stored values times the frame's own RescaleSlope plus RescaleIntercept),
or from SimpleITK for a compressed file that pydicom cannot decode.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.acquisition import Acquisition, acquisition_from_metadata, echo_time_warnings
from SyntheticCTLib.kernel.errors import VolumeReadError
from SyntheticCTLib.kernel.types import PathLike

logger = logging.getLogger(__name__)

IMAGE_TYPES = ("magnitude", "phase", "real", "imaginary", "field_map", "other")
_SHORT_TYPE = {
    "magnitude": "mag",
    "phase": "phase",
    "real": "real",
    "imaginary": "imag",
    "field_map": "fmap",
    "other": "other",
}

POSITION_TOL_MM = 0.02
"""Slice positions within this of a regular grid are regular (DICOM positions carry rounding)."""
ORIENTATION_TOL = 1e-3
MAX_GAP_RATIO = 3.0
"""A step over this many times the usual step is a gap that cannot be made regular."""

# Keys that tell apart frames at the same position, tried in this order ("format": one series exported
# both as classic single-frame files and as an enhanced multi-frame file).
_SPLIT_KEYS = (
    "format",
    "temporal position",
    "acquisition number",
    "trigger time",
    "b-value",
    "acquisition time",
    "stack",
)


# -- records ---------------------------------------------------------------------------------------------


@dataclass
class FrameRecord:
    """One 2D frame: a classic single-frame file, or one frame of an enhanced multi-frame file."""

    path: Path
    frame: Optional[int]
    series_uid: str
    series_number: Optional[int]
    series_description: str
    modality: str
    image_type: str
    echo_time: Optional[float]
    echo_number: Optional[int]
    row: np.ndarray
    col: np.ndarray
    position: np.ndarray
    pixel_spacing: Tuple[float, float]
    rows: int
    cols: int
    slope: float = 1.0
    intercept: float = 0.0
    instance: Optional[int] = None
    split: Dict[str, Any] = field(default_factory=dict)
    tilt_tag: Optional[float] = None

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.col)

    def name(self) -> str:
        return f"{self.path}" + (f" frame {self.frame + 1}" if self.frame is not None else "")


@dataclass
class DicomVolume:
    """One 3D volume found in DICOM: frames sorted along the normal, its geometry and what was noticed."""

    id: str
    series_uid: str
    series_number: Optional[int]
    series_description: str
    modality: str
    image_type: str
    echo_time_ms: Optional[float]
    echo_number: Optional[int]
    frames: List[FrameRecord]
    size: Tuple[int, int, int] = (0, 0, 0)
    spacing: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    warnings: List[str] = field(default_factory=list)
    error: Optional[str] = None
    regularized: bool = False
    group_key: Tuple = ()
    """Series, orientation and time point: volumes that differ only in echo share it."""

    @property
    def files(self) -> List[str]:
        seen: Dict[str, None] = {}
        for f in self.frames:
            seen.setdefault(str(f.path), None)
        return list(seen)

    @property
    def readable(self) -> bool:
        return self.error is None

    def to_dict(self) -> Dict[str, Any]:
        """The ``inspect --json`` entry."""
        return {
            "id": self.id,
            "series_uid": self.series_uid,
            "series_description": self.series_description,
            "modality": self.modality,
            "image_type": self.image_type,
            "echo_time_ms": self.echo_time_ms,
            "echo_number": self.echo_number,
            "size": list(self.size),
            "spacing": [float(v) for v in self.spacing],
            "origin": [float(v) for v in self.origin],
            "direction": [float(v) for v in self.direction],
            "files": self.files,
            "warnings": list(self.warnings) + ([self.error] if self.error else []),
            "readable": self.readable,
        }

    def read(self) -> sitk.Image:
        """The volume's voxels on its (regular) grid; raises :class:`VolumeReadError` if it was refused."""
        if self.error is not None:
            raise VolumeReadError(self.error)
        return _read_pixels(self)


# -- tags ------------------------------------------------------------------------------------------------


def _float(value: Any) -> Optional[float]:
    try:
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        out = float(value)
        return out if math.isfinite(out) else None
    except (TypeError, ValueError, IndexError):
        return None


def _int(value: Any) -> Optional[int]:
    f = _float(value)
    return int(round(f)) if f is not None else None


def classify_image_type(tokens: Iterable[str], complex_component: str = "", ge_type: Optional[int] = None) -> str:
    """magnitude | phase | real | imaginary | field_map | other, from ImageType/FrameType values."""
    values = [str(t).strip().upper() for t in tokens if str(t).strip()]
    values += [complex_component.strip().upper()] if complex_component else []
    joined = set(values)
    if joined & {"FIELD_MAP", "FIELDMAP", "B0 MAP", "B0MAP", "B0_MAP", "B0"}:
        return "field_map"
    if joined & {"P", "PHASE", "PHASE MAP", "PHA"} or any(v.startswith("P_") for v in values):
        return "phase"
    if joined & {"R", "REAL"} or any(v.startswith("R_") for v in values):
        return "real"
    if joined & {"I", "IMAGINARY"} or any(v.startswith("I_") for v in values):
        return "imaginary"
    if joined & {"M", "MAG", "MAGNITUDE"} or any(v.startswith("M_") for v in values):
        return "magnitude"
    if ge_type is not None:
        return {0: "magnitude", 1: "phase", 2: "real", 3: "imaginary"}.get(ge_type, "other")
    return "other"


def _item(ds, keyword: str):
    seq = getattr(ds, keyword, None) if ds is not None else None
    return seq[0] if seq else None


def _functional(frame_group, shared_group, keyword: str):
    """The first item of functional-group sequence ``keyword``, per-frame first, then shared."""
    for group in (frame_group, shared_group):
        item = _item(group, keyword)
        if item is not None:
            return item
    return None


def _orientation(values: Any, where: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        iop = np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        iop = np.zeros(0)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        raise VolumeReadError(f"'{where}' has no valid ImageOrientationPatient.")
    row, col = iop[:3], iop[3:]
    if np.linalg.norm(row) < 1e-3 or np.linalg.norm(col) < 1e-3:
        raise VolumeReadError(f"'{where}' has a zero ImageOrientationPatient vector.")
    row = row / np.linalg.norm(row)
    col = col - np.dot(col, row) * row  # Gram-Schmidt: IOP is printed with a few digits
    col = col / np.linalg.norm(col)
    return row, col


def _position(values: Any, where: str) -> np.ndarray:
    try:
        ipp = np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        ipp = np.zeros(0)
    if ipp.shape != (3,) or not np.all(np.isfinite(ipp)):
        raise VolumeReadError(f"'{where}' has no valid ImagePositionPatient.")
    return ipp


def _spacing(values: Any, where: str) -> Tuple[float, float]:
    try:
        ps = [float(v) for v in values]
    except (TypeError, ValueError):
        ps = []
    if len(ps) != 2 or not all(math.isfinite(v) and v > 0 for v in ps):
        raise VolumeReadError(f"'{where}' has no valid PixelSpacing.")
    return ps[0], ps[1]


def _common(ds, path: Path) -> Dict[str, Any]:
    description = str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or "").strip()
    return {
        "path": path,
        "series_uid": str(ds.get("SeriesInstanceUID", "") or f"no-uid:{path.parent}"),
        "series_number": _int(ds.get("SeriesNumber")),
        "series_description": description,
        "modality": str(ds.get("Modality", "") or ""),
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "tilt_tag": _float(ds.get("GantryDetectorTilt")),
    }


def _ge_image_type(ds) -> Optional[int]:
    elem = ds.get((0x0043, 0x102F))
    return _int(elem.value) if elem is not None else None


def _classic_frames(ds, path: Path) -> List[FrameRecord]:
    where = str(path)
    row, col = _orientation(ds.get("ImageOrientationPatient"), where)
    split = {
        "format": "classic",
        "temporal position": _int(ds.get("TemporalPositionIdentifier")),
        "acquisition number": _int(ds.get("AcquisitionNumber")),
        "trigger time": _float(ds.get("TriggerTime")),
        "b-value": _float(ds.get("DiffusionBValue")),
        "acquisition time": str(ds.get("AcquisitionTime", "") or "") or None,
    }
    return [
        FrameRecord(
            frame=None,
            image_type=classify_image_type(ds.get("ImageType", []) or [], "", _ge_image_type(ds)),
            echo_time=_float(ds.get("EchoTime")),
            echo_number=_int(ds.get("EchoNumbers")),
            row=row,
            col=col,
            position=_position(ds.get("ImagePositionPatient"), where),
            pixel_spacing=_spacing(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), where),
            slope=_float(ds.get("RescaleSlope")) or 1.0,
            intercept=_float(ds.get("RescaleIntercept")) or 0.0,
            instance=_int(ds.get("InstanceNumber")),
            split=split,
            **_common(ds, path),
        )
    ]


def _enhanced_frames(ds, path: Path) -> List[FrameRecord]:
    n = int(ds.NumberOfFrames)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is None or len(per_frame) != n:
        raise VolumeReadError(f"'{path}' is a multi-frame file without one per-frame functional group per frame.")
    common = _common(ds, path)
    top_type = ds.get("ImageType", []) or []
    out = []
    for k, fg in enumerate(per_frame):
        where = f"{path} frame {k + 1}"
        orient = _functional(fg, shared, "PlaneOrientationSequence")
        pos = _functional(fg, shared, "PlanePositionSequence")
        measures = _functional(fg, shared, "PixelMeasuresSequence")
        if orient is None or pos is None or measures is None:
            raise VolumeReadError(f"'{where}' lacks its plane orientation, position or pixel measures.")
        row, col = _orientation(orient.get("ImageOrientationPatient"), where)
        echo = _functional(fg, shared, "MREchoSequence")
        ftype = _functional(fg, shared, "MRImageFrameTypeSequence") or _functional(
            fg, shared, "CTImageFrameTypeSequence"
        )
        content = _functional(fg, None, "FrameContentSequence")
        transform = _functional(fg, shared, "PixelValueTransformationSequence")
        timing = _functional(fg, shared, "MRTimingAndRelatedParametersSequence")
        diffusion = _functional(fg, shared, "MRDiffusionSequence")
        cardiac = _functional(fg, shared, "CardiacSynchronizationSequence")
        tokens = list(ftype.get("FrameType", []) or []) if ftype is not None else list(top_type)
        component = str(ftype.get("ComplexImageComponent", "") or "") if ftype is not None else ""
        echo_time = _float(echo.get("EffectiveEchoTime")) if echo is not None else None
        if echo_time is None and timing is not None:
            echo_time = _float(timing.get("EchoTime"))
        if echo_time is None:
            echo_time = _float(ds.get("EchoTime"))
        split = {
            "format": "enhanced",
            "temporal position": _int(content.get("TemporalPositionIndex")) if content is not None else None,
            "acquisition number": _int(content.get("FrameAcquisitionNumber")) if content is not None else None,
            "trigger time": _float(cardiac.get("NominalCardiacTriggerDelayTime")) if cardiac is not None else None,
            "b-value": _float(diffusion.get("DiffusionBValue")) if diffusion is not None else None,
            "acquisition time": str(content.get("FrameAcquisitionDateTime", "") or "") or None
            if content is not None
            else None,
            "stack": str(content.get("StackID", "") or "") or None if content is not None else None,
        }
        slope = _float(transform.get("RescaleSlope")) if transform is not None else _float(ds.get("RescaleSlope"))
        intercept = (
            _float(transform.get("RescaleIntercept")) if transform is not None else _float(ds.get("RescaleIntercept"))
        )
        out.append(
            FrameRecord(
                frame=k,
                image_type=classify_image_type(tokens, component),
                echo_time=echo_time,
                echo_number=None,
                row=row,
                col=col,
                position=_position(pos.get("ImagePositionPatient"), where),
                pixel_spacing=_spacing(measures.get("PixelSpacing"), where),
                slope=slope if slope is not None else 1.0,
                intercept=intercept if intercept is not None else 0.0,
                instance=k + 1,
                split=split,
                **common,
            )
        )
    return out


def scan_frames(path: PathLike) -> Tuple[List[FrameRecord], List[str]]:
    """Every image frame under ``path`` (a file or a folder, searched recursively), and what was skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    BytesLength = getattr(pydicom.errors, "BytesLengthException", InvalidDicomError)  # noqa: N806
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = [path]
    frames: List[FrameRecord] = []
    skipped: List[str] = []
    seen: Dict[str, Path] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        # BytesLengthException (an Exception): a corrupt, e.g. bit-flipped, file meta group.
        except (InvalidDicomError, OSError, ValueError, AttributeError, EOFError, KeyError, TypeError, BytesLength):
            skipped.append(f"{f}: not DICOM")
            continue
        if "Rows" not in ds or "Columns" not in ds:
            continue  # a DICOMDIR, a structured report, a presentation state: not an image
        sop = str(ds.get("SOPInstanceUID", "") or "")
        if sop and sop in seen:  # the same instance twice (a copied file): one is enough
            skipped.append(f"{f}: the same SOPInstanceUID as '{seen[sop]}'")
            continue
        if sop:
            seen[sop] = f
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            skipped.append(f"{f}: a colour image ({ds.get('PhotometricInterpretation', '?')}), not a scalar volume")
            continue
        try:
            if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
                frames.extend(_enhanced_frames(ds, f))
            else:
                frames.extend(_classic_frames(ds, f))
        except VolumeReadError as e:
            skipped.append(str(e))
    return frames, skipped


# -- splitting -------------------------------------------------------------------------------------------


def _has_repeats(frames: Sequence[FrameRecord]) -> bool:
    if len(frames) < 2:
        return False
    normal = frames[0].normal
    d = np.sort(np.array([np.dot(f.position, normal) for f in frames]))
    return bool(np.any(np.diff(d) < POSITION_TOL_MM))


def _split_repeats(frames: List[FrameRecord]) -> Tuple[List[Tuple[Optional[str], Any, List[FrameRecord]]], str]:
    """Split frames whose positions repeat by the first key that separates them: [(key, value, frames)]."""
    if not _has_repeats(frames):
        return [(None, None, frames)], ""
    for key in _SPLIT_KEYS:
        values = [f.split.get(key) for f in frames]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        parts: Dict[Any, List[FrameRecord]] = {}
        for f, v in zip(frames, values):
            parts.setdefault(v, []).append(f)
        if not any(_has_repeats(p) for p in parts.values()):
            return [(key, v, parts[v]) for v in sorted(parts, key=_sort_key)], ""
    return [(None, None, frames)], "slices repeat at the same position and no tag (temporal position, acquisition "
    "number, trigger time, b-value, acquisition time) tells them apart"


def _sort_key(value: Any):
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))


def _close(a: np.ndarray, b: np.ndarray, tol: float = ORIENTATION_TOL) -> bool:
    return bool(np.max(np.abs(a - b)) <= tol)


def _group(frames: List[FrameRecord]) -> List[Dict[str, Any]]:
    """Group frames by series, image type, echo, orientation and matrix; then split repeats by time."""
    # Echo numbers where the files do not give them: the rank of the echo time within the series.
    tes: Dict[str, set] = {}
    for f in frames:
        if f.echo_time is not None:
            tes.setdefault(f.series_uid, set()).add(round(f.echo_time, 4))
    for f in frames:  # (a single echo time says nothing about the echo number)
        if f.echo_number is None and f.echo_time is not None and len(tes[f.series_uid]) > 1:
            f.echo_number = sorted(tes[f.series_uid]).index(round(f.echo_time, 4)) + 1

    groups: Dict[Tuple, Dict[str, Any]] = {}
    orientations: Dict[str, List[np.ndarray]] = {}
    for f in frames:
        iops = orientations.setdefault(f.series_uid, [])
        iop = np.concatenate([f.row, f.col])
        o_index = next((i for i, known in enumerate(iops) if _close(known, iop)), None)
        if o_index is None:
            iops.append(iop)
            o_index = len(iops) - 1
        key = (
            f.series_uid,
            f.image_type,
            f.echo_number,
            round(f.echo_time, 3) if f.echo_time is not None else None,
            o_index,
            f.rows,
            f.cols,
            round(f.pixel_spacing[0], 4),
            round(f.pixel_spacing[1], 4),
        )
        if key in groups:
            groups[key]["frames"].append(f)
        else:
            groups[key] = {"key": key, "frames": [f], "orientation": o_index}
    out = []
    for g in groups.values():
        parts, problem = _split_repeats(g["frames"])
        for split_key, split_value, part in parts:
            out.append({**g, "frames": part, "split": (split_key, split_value), "problem": problem})
    return out


# -- geometry --------------------------------------------------------------------------------------------


def _geometry(volume: DicomVolume) -> None:
    """Sort frames along the normal; set size, spacing, origin and direction; note tilt, unevenness, gaps."""
    frames = volume.frames
    row, col = frames[0].row, frames[0].col
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    frames.sort(key=lambda f: float(np.dot(f.position, normal)))
    f0 = frames[0]
    d = np.array([np.dot(f.position, normal) for f in frames])
    dx, dy = f0.pixel_spacing[1], f0.pixel_spacing[0]  # PixelSpacing = row spacing (y), column spacing (x)
    direction = np.column_stack([row, col, normal])
    volume.direction = tuple(float(v) for v in direction.ravel())
    volume.origin = tuple(float(v) for v in f0.position)
    n = len(frames)
    if n == 1:
        volume.size = (f0.cols, f0.rows, 1)
        volume.spacing = (dx, dy, 1.0)
        volume.error = f"'{f0.name()}' is a single slice, not a 3D volume."
        return
    steps = np.diff(d)
    first = frames[0].name()
    if np.any(steps < POSITION_TOL_MM):
        k = int(np.argmin(steps))
        volume.error = (
            f"'{frames[k].name()}' and '{frames[k + 1].name()}' lie at the same position "
            f"({d[k]:.2f} mm along the normal); nothing tells the two slices apart."
        )
        volume.size, volume.spacing = (f0.cols, f0.rows, n), (dx, dy, float(np.median(steps)))
        return
    median = float(np.median(steps))
    span = float(d[-1] - d[0])
    regular_step = span / (n - 1)
    residual = np.abs(d - d[0] - regular_step * np.arange(n))
    offsets = np.array([f.position - f0.position for f in frames]) - np.outer(d - d[0], normal)
    in_plane = np.linalg.norm(offsets, axis=1)
    tilted = bool(np.max(in_plane) > POSITION_TOL_MM)
    uneven = bool(np.max(residual) > POSITION_TOL_MM)
    if not tilted and not uneven:
        volume.size = (f0.cols, f0.rows, n)
        volume.spacing = (dx, dy, regular_step)
        return
    if uneven:
        ratios = steps / median
        multiples = np.rint(ratios)
        if np.all(np.abs(ratios - multiples) < 0.05) and np.any(multiples >= 2):
            k = int(np.argmax(ratios))
            missing = int(np.sum(multiples - 1))
            volume.error = (
                f"{missing} slice(s) missing from the series of '{first}': a {steps[k]:.2f} mm gap between "
                f"'{frames[k].name()}' and '{frames[k + 1].name()}' where the other slices are {median:.2f} mm apart."
            )
        elif np.max(ratios) > MAX_GAP_RATIO:
            k = int(np.argmax(ratios))
            volume.error = (
                f"'{frames[k].name()}' and '{frames[k + 1].name()}' are {steps[k]:.2f} mm apart where the usual "
                f"step is {median:.2f} mm: a gap that cannot be made regular without inventing slices."
            )
        if volume.error:
            volume.size, volume.spacing = (f0.cols, f0.rows, n), (dx, dy, median)
            return
    if uneven and np.max(residual) > 0.1 * regular_step:
        # Steps of different sizes (e.g. 4 mm, then 7 mm): the finest usual step, so that no part loses detail.
        step = float(np.min(steps[steps >= 0.5 * median]))
        nz = int(round(span / step)) + 1
    else:  # jitter around one step, or a tilt alone: the same number of slices
        nz = n
    step = span / (nz - 1)
    volume.size = (f0.cols, f0.rows, nz)
    volume.spacing = (dx, dy, step)
    volume.regularized = True
    what = []
    if tilted:
        angle = math.degrees(math.atan2(float(np.linalg.norm(offsets[-1])), span))
        tag = f", GantryDetectorTilt {f0.tilt_tag:g}" if f0.tilt_tag else ""
        what.append(f"gantry tilt {angle:.1f} degrees{tag}")
    if uneven:
        what.append(f"uneven slice steps ({float(steps.min()):.2f} to {float(steps.max()):.2f} mm)")
    volume.warnings.append(
        f"{_upper_first(' and '.join(what))} in the series of '{first}': resampled onto a regular grid of {nz} "
        f"slices {step:.3f} mm apart in the patient frame, so that every slice lies where its file says."
    )


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


# -- naming ----------------------------------------------------------------------------------------------


def _build_volumes(groups: List[Dict[str, Any]]) -> List[DicomVolume]:
    by_series: Dict[str, List[Dict[str, Any]]] = {}
    for g in groups:
        by_series.setdefault(g["key"][0], []).append(g)
    numbers: Dict[Any, set] = {}
    for uid, gs in by_series.items():
        numbers.setdefault(gs[0]["frames"][0].series_number, set()).add(uid)
    volumes: List[DicomVolume] = []
    for uid, gs in by_series.items():
        f0 = gs[0]["frames"][0]
        base = (
            str(f0.series_number) if f0.series_number is not None else "s" + "".join(c for c in uid if c.isalnum())[-6:]
        )
        if len(numbers.get(f0.series_number, ())) > 1:
            base += "-" + uid.replace(".", "")[-6:]
        types = {g["key"][1] for g in gs}
        echoes = {(g["key"][2], g["key"][3]) for g in gs}
        orients = {g["orientation"] for g in gs}
        for g in gs:
            split_key, split_value = g["split"]
            values = sorted({x["split"][1] for x in gs if x["split"][0] == split_key}, key=_sort_key)
            tokens = [base]
            if len(types) > 1 or g["key"][1] not in ("magnitude", "other"):
                tokens.append(_SHORT_TYPE[g["key"][1]])
            if len(echoes) > 1:
                tokens.append(f"e{g['key'][2]}")
            if len(orients) > 1:
                tokens.append(f"o{g['orientation'] + 1}")
            if split_key == "format":  # the same slices exported both as classic and as enhanced files
                tokens.append(str(split_value))
            elif split_key is not None:
                tokens.append(f"t{values.index(split_value) + 1}")
            fr = g["frames"][0]
            volume = DicomVolume(
                id="_".join(tokens),
                series_uid=uid,
                series_number=fr.series_number,
                series_description=fr.series_description,
                modality=fr.modality,
                image_type=fr.image_type,
                echo_time_ms=fr.echo_time,
                echo_number=fr.echo_number,
                frames=list(g["frames"]),
                group_key=(uid, g["orientation"], g["split"], fr.rows, fr.cols),
            )
            if g["problem"]:
                volume.error = f"In the series of '{fr.name()}': {g['problem']}."
            _geometry(volume)
            if volume.error is None:
                slopes = {(f.slope, f.intercept) for f in volume.frames}
                if len(slopes) > 1 and volume.image_type != "phase":
                    volume.warnings.append(
                        f"{len(slopes)} different rescale slopes/intercepts across the slices; each slice's own is applied."
                    )
            volumes.append(volume)
    seen: Dict[str, int] = {}
    for v in volumes:
        if v.id in seen:
            seen[v.id] += 1
            v.id = f"{v.id}-{seen[v.id]}"
        else:
            seen[v.id] = 1
    volumes.sort(key=lambda v: (v.series_number if v.series_number is not None else 1 << 30, v.series_uid, v.id))
    return volumes


def find_volumes(path: PathLike) -> List[DicomVolume]:
    """Every volume in the DICOM file or folder ``path`` (refused ones too, with ``error`` set)."""
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"No file or folder at '{path}'.")
    frames, skipped = scan_frames(path)
    for reason in skipped:
        logger.debug("Skipped %s", reason)
    if not frames:
        reasons = [r for r in skipped if not r.endswith(": not DICOM")] or skipped
        extra = f" ({reasons[0]})" if reasons and (reasons is not skipped or not path.is_dir()) else ""
        raise VolumeReadError(f"'{path}' holds no DICOM series{extra}.")
    return _build_volumes(_group(frames))


def describe(volume: DicomVolume) -> str:
    """One line naming a volume for messages: id, description, type, TE, size."""
    te = f", TE {volume.echo_time_ms:g} ms" if volume.echo_time_ms is not None else ""
    desc = f" '{volume.series_description}'" if volume.series_description else ""
    return f"{volume.id}{desc} ({volume.modality} {volume.image_type}{te}, {'x'.join(map(str, volume.size))})"


def select_volume(volumes: List[DicomVolume], path: PathLike, volume_id: Optional[str] = None) -> DicomVolume:
    """The volume named ``volume_id``, or the only readable one; otherwise a clear error listing them."""
    if volume_id is not None:
        for v in volumes:
            if v.id == volume_id:
                return v
        raise VolumeReadError(
            f"'{path}' has no volume '{volume_id}'; it holds: {'; '.join(describe(v) for v in volumes)}."
        )
    readable = [v for v in volumes if v.readable]
    if len(readable) == 1:
        return readable[0]
    if not readable:
        raise VolumeReadError(" ".join(v.error or "" for v in volumes[:3]).strip())
    raise VolumeReadError(
        f"'{path}' holds {len(readable)} volumes: {'; '.join(describe(v) for v in readable)}. "
        "Choose one by its id (`syntheticct inspect` lists them; --volume ID, or read_volume(path, volume=ID))."
    )


def read_dicom_volume(path: PathLike, volume_id: Optional[str] = None, *, series_uid: Optional[str] = None):
    """Read one volume from DICOM: the one named ``volume_id``, or the only one there is."""
    volumes = find_volumes(path)
    if series_uid is not None:
        chosen = [v for v in volumes if v.series_uid == series_uid]
        if not chosen:
            known = ", ".join(sorted({v.series_uid for v in volumes}))
            raise VolumeReadError(
                f"'{path}' has no DICOM series with SeriesInstanceUID {series_uid}; it holds: {known}."
            )
        volumes = chosen
    volume = select_volume(volumes, path, volume_id)
    image = volume.read()
    for message in volume.warnings:
        logger.warning("%s", message)
    return image


# -- pixels ----------------------------------------------------------------------------------------------


def _file_pixels(path: Path) -> Tuple[np.ndarray, bool, Any]:
    """(frames x rows x cols, already_rescaled, the pydicom dataset or None) for one file."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        array = np.asarray(ds.pixel_array)
        rescaled = False
    except Exception:  # no decoder for this transfer syntax in pydicom: SimpleITK (GDCM) decodes it
        ds = None
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as e:
            raise VolumeReadError(f"Cannot decode the pixels of '{path}': {str(e).strip().splitlines()[-1]}") from e
        array = sitk.GetArrayFromImage(image)
        rescaled = True
    if array.ndim == 2:
        array = array[None]
    return array, rescaled, ds


def _read_pixels(volume: DicomVolume) -> sitk.Image:
    """Each frame's stored values times its own slope plus intercept: integers stay integers (the smallest
    of int16, uint16, int32 that holds them), anything else is float32."""
    cache: Dict[Path, Tuple[np.ndarray, bool, Any]] = {}
    first_ds = None
    planes = []
    integral = True
    lo, hi = math.inf, -math.inf
    for f in volume.frames:
        if f.path not in cache:
            cache.clear()
            cache[f.path] = _file_pixels(f.path)
        array, rescaled, ds = cache[f.path]
        if not planes:
            first_ds = ds
        k = f.frame or 0
        if k >= array.shape[0] or array.shape[1:] != (f.rows, f.cols):
            raise VolumeReadError(f"'{f.name()}': the pixel data does not match Rows x Columns x frames.")
        plane = array[k]
        if not rescaled and (f.slope != 1.0 or f.intercept != 0.0):
            plane = plane.astype(np.float64) * f.slope + f.intercept
        if plane.dtype.kind == "f":
            if integral and bool(np.all(plane == np.rint(plane))):
                plane = plane.astype(np.int64)
            else:
                integral = False
                plane = plane.astype(np.float32)
        if plane.dtype.kind in "iu" and plane.dtype.itemsize > 4:
            plane = plane.astype(np.int32) if abs(plane).max(initial=0) < 2**31 - 1 else plane
        lo, hi = min(lo, float(plane.min())), max(hi, float(plane.max()))
        planes.append(plane)
    dtype = np.dtype(np.float32)
    if integral:
        dtype = np.dtype(np.int64)
        for candidate in (np.int16, np.uint16, np.int32):
            if np.iinfo(candidate).min <= lo and hi <= np.iinfo(candidate).max:
                dtype = np.dtype(candidate)
                break
    stack = np.empty((len(planes),) + planes[0].shape, dtype=dtype)
    for k, plane in enumerate(planes):
        stack[k] = plane
    del planes
    if volume.regularized:
        stack = _regularize(volume, stack)
    image = sitk.GetImageFromArray(stack)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    _copy_tags(image, volume.frames[0].path, first_ds)
    return image


def _regularize(volume: DicomVolume, stack: np.ndarray) -> np.ndarray:
    """Resample the sorted slices onto the volume's regular grid (linear, in-plane shift and along the normal)."""
    from scipy import ndimage

    frames = volume.frames
    direction = np.array(volume.direction).reshape(3, 3)
    row, col, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    origin = np.array(volume.origin)
    dx, dy, dz = volume.spacing
    d = np.array([np.dot(f.position - origin, normal) for f in frames])
    # In-plane offset of each slice's first pixel from the grid's, in pixels (x = column index, y = row index).
    shift_x = np.array([np.dot(f.position - origin, row) / dx for f in frames])
    shift_y = np.array([np.dot(f.position - origin, col) / dy for f in frames])
    fill = float(stack.min())
    nz = volume.size[2]
    rows, cols = stack.shape[1:]
    out = np.empty((nz, rows, cols), dtype=np.float32)
    shifted: Dict[int, np.ndarray] = {}

    def source(k: int) -> np.ndarray:
        if k not in shifted:
            plane = stack[k].astype(np.float32)
            if abs(shift_x[k]) > 1e-6 or abs(shift_y[k]) > 1e-6:
                # grid pixel (y, x) sits at source pixel (y - shift_y, x - shift_x)
                plane = ndimage.shift(plane, (shift_y[k], shift_x[k]), order=1, mode="constant", cval=fill)
            shifted[k] = plane
        return shifted[k]

    for z in range(nz):
        t = z * dz
        b = int(np.searchsorted(d, t - 1e-6))
        b = min(max(b, 0), len(d) - 1)
        if abs(d[b] - t) <= 1e-3 or b == 0:  # on a source plane (or before the first: clamp)
            out[z] = source(b)
            continue
        a = b - 1
        w = (t - d[a]) / (d[b] - d[a])
        out[z] = (1.0 - w) * source(a) + w * source(b)
    return out


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UT", "US", "SS"}


def _copy_tags(image: sitk.Image, path: Path, ds: Any = None) -> None:
    """Keep the first file's public, plain tags on the image as ``gggg|eeee`` metadata (as SimpleITK does)."""
    import pydicom

    if ds is None:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # the pixels were read; tags are a courtesy
            return
    for elem in ds:
        if elem.tag.is_private or elem.VR not in _TEXT_VRS or elem.tag.group in (0x0002, 0x7FE0):
            continue
        if elem.tag in (0x00200032, 0x00200037):  # per-slice geometry: the image's own geometry rules
            continue
        value = elem.value
        if type(value).__name__ == "MultiValue" or isinstance(value, (list, tuple)):
            text = "\\".join(str(v) for v in value)
        else:
            text = "" if value is None else str(value)
        try:
            image.SetMetaData(f"{elem.tag.group:04x}|{elem.tag.element:04x}", text)
        except (RuntimeError, UnicodeError):
            continue


# -- multi-echo ------------------------------------------------------------------------------------------


@dataclass
class EchoSet:
    """The echoes of one multi-echo acquisition, in echo-time order."""

    volumes: List[DicomVolume]

    @property
    def ids(self) -> List[str]:
        return [v.id for v in self.volumes]

    @property
    def echo_times_ms(self) -> List[Optional[float]]:
        return [v.echo_time_ms for v in self.volumes]

    def read(self) -> List[sitk.Image]:
        return [v.read() for v in self.volumes]


def echo_sets(volumes: List[DicomVolume]) -> List[EchoSet]:
    """Readable magnitude volumes (or 'other' where no magnitude is labelled) grouped into echo sets."""
    readable = [v for v in volumes if v.readable]
    for wanted in (("magnitude",), ("other",)):
        chosen = [v for v in readable if v.image_type in wanted]
        if chosen:
            break
    else:
        return []
    sets: Dict[Tuple, List[DicomVolume]] = {}
    for v in chosen:
        key = v.group_key + (v.size, tuple(np.round(v.spacing, 4)), tuple(np.round(v.origin, 3)))
        sets.setdefault(key, []).append(v)
    out = []
    for members in sets.values():
        members.sort(key=lambda v: (v.echo_time_ms if v.echo_time_ms is not None else math.inf, v.echo_number or 0))
        out.append(EchoSet(members))
    return out


def read_echoes(path: PathLike) -> Tuple[List[sitk.Image], List[Optional[float]], List[str]]:
    """The one multi-echo magnitude set in ``path``: (images in echo-time order, echo times in ms, ids).

    Several candidate sets (e.g. two series, or several time points) are a :class:`VolumeReadError`
    that lists each with its volume ids.
    """
    volumes = find_volumes(path)
    sets = echo_sets(volumes)
    if not sets:
        problems = "; ".join(describe(v) + (f": {v.error}" if v.error else "") for v in volumes)
        raise VolumeReadError(f"'{path}' holds no readable magnitude volume: {problems}.")
    if len(sets) > 1:
        listing = "; ".join(
            f"[{', '.join(s.ids)}] '{s.volumes[0].series_description}' "
            f"TE {', '.join(f'{t:g}' for t in s.echo_times_ms if t is not None) or '?'} ms"
            for s in sets
        )
        raise VolumeReadError(
            f"'{path}' holds {len(sets)} candidate echo sets: {listing}. Give the echoes of one set as separate "
            "inputs (syntheticct convert DIR --volume ID -o echoN.nii.gz)."
        )
    chosen = sets[0]
    for v in chosen.volumes:
        for message in v.warnings:
            logger.warning("%s", message)
    return chosen.read(), chosen.echo_times_ms, chosen.ids


def read_model_echoes(
    path: PathLike, expected_echo_times: Sequence[Optional[float]]
) -> Tuple[List[sitk.Image], Acquisition]:
    """The echoes of the one multi-echo magnitude set in ``path``, in echo-time order, for a model, and their
    acquisition (echo times from the headers, field strength from the MagneticFieldStrength tag).

    ``expected_echo_times`` are the model card's echo times, one per input (None where not given): a set
    with another number of echoes is a :class:`VolumeReadError`. Whether the echo times fit the model is
    the input check's to say (:func:`SyntheticCTLib.synthesis.input_check.check_inputs`, against every
    protocol the model was trained on).
    """
    images, echo_times, ids = read_echoes(path)
    listed = ", ".join(f"{i} (TE {t:g} ms)" if t is not None else i for i, t in zip(ids, echo_times))
    if len(images) != len(expected_echo_times):
        wanted = ", ".join(f"{t:g}" if t is not None else "?" for t in expected_echo_times)
        raise VolumeReadError(
            f"'{path}' holds a {len(images)}-echo set ({listed}) but the model takes {len(expected_echo_times)} "
            f"input(s) (TE {wanted} ms)."
        )
    logger.info("'%s': model inputs in echo-time order: %s.", path, listed)
    tags = acquisition_from_metadata(images)
    field_t = tags.field_strength_t if tags is not None else None
    return images, Acquisition(list(echo_times), field_t, f"the DICOM headers of '{path}'")


def describe_path(path: PathLike) -> List[Dict[str, Any]]:
    """What ``path`` holds, one ``inspect --json`` entry per volume: a DICOM file or folder, or a volume file."""
    from SyntheticCTLib.kernel.io import read_volume, volume_suffix

    path = Path(path)
    if path.is_file() and volume_suffix(path) and not is_dicom_file(path):
        image = read_volume(path)
        return [
            {
                "id": "1",
                "series_uid": "",
                "series_description": "",
                "modality": "",
                "image_type": "other",
                "echo_time_ms": None,
                "echo_number": None,
                "size": list(image.GetSize()),
                "spacing": [float(v) for v in image.GetSpacing()],
                "origin": [float(v) for v in image.GetOrigin()],
                "direction": [float(v) for v in image.GetDirection()],
                "files": [str(path)],
                "warnings": [],
                "readable": True,
            }
        ]
    return [v.to_dict() for v in find_volumes(path)]


def read_any(path: PathLike, volume_id: Optional[str] = None) -> sitk.Image:
    """One volume from a volume file (``volume_id`` None or '1') or from DICOM (by id, or the only one)."""
    from SyntheticCTLib.kernel.io import read_volume, validate_volume, volume_suffix

    path = Path(path)
    if path.is_file() and volume_suffix(path) and not is_dicom_file(path):
        if volume_id not in (None, "1"):
            raise VolumeReadError(f"'{path}' holds one volume (id 1), not '{volume_id}'.")
        return read_volume(path)
    if not path.exists():
        raise VolumeReadError(f"No file or folder at '{path}'.")
    return validate_volume(read_dicom_volume(path, volume_id), path)


def is_dicom_file(path: PathLike) -> bool:
    """True when ``path`` is a file with the DICOM preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


__all__ = [
    "IMAGE_TYPES",
    "DicomVolume",
    "EchoSet",
    "FrameRecord",
    "classify_image_type",
    "describe",
    "describe_path",
    "read_any",
    "echo_sets",
    "echo_time_warnings",
    "read_model_echoes",
    "find_volumes",
    "is_dicom_file",
    "read_dicom_volume",
    "read_echoes",
    "scan_frames",
    "select_volume",
]
