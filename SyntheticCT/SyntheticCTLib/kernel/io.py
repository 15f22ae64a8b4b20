"""Reading and writing 3D volumes with their exact geometry.

Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``)
and a folder holding a DICOM series. Origin, spacing and direction stay in the ``sitk.Image``.

Every reading error is a :class:`~SyntheticCTLib.kernel.errors.VolumeReadError` that names the path and
the problem. Writing is atomic (a temporary file in the target folder, then a rename) and refuses to
overwrite a file that was given as an input.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import VolumeReadError, VolumeWriteError

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_SPACING_MM = 50.0


@dataclass(frozen=True)
class DicomSeriesInfo:
    """One DICOM series found in a folder."""

    series_uid: str
    n_files: int
    description: str
    files: tuple


def volume_suffix(path: PathLike) -> str:
    """Return the volume suffix of ``path`` (``.nii.gz`` counts as one), or '' when it has none."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def list_dicom_series(folder: PathLike) -> list:
    """List the DICOM series in ``folder`` (not recursive), largest first."""
    folder = Path(folder)
    reader = sitk.ImageSeriesReader
    series = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = tuple(reader.GetGDCMSeriesFileNames(str(folder), uid))
        description = ""
        try:
            file_reader = sitk.ImageFileReader()
            file_reader.SetFileName(files[0])
            file_reader.ReadImageInformation()
            if file_reader.HasMetaDataKey("0008|103e"):
                description = file_reader.GetMetaData("0008|103e").strip()
        except RuntimeError:
            pass
        series.append(DicomSeriesInfo(uid, len(files), description, files))
    series.sort(key=lambda s: s.n_files, reverse=True)
    return series


def _read_dicom_series(folder: Path, series_uid: Optional[str]) -> sitk.Image:
    series = list_dicom_series(folder)
    if not series:
        raise VolumeReadError(f"'{folder}' is a folder with no DICOM series in it.")
    if series_uid is not None:
        chosen = [s for s in series if s.series_uid == series_uid]
        if not chosen:
            known = ", ".join(s.series_uid for s in series)
            raise VolumeReadError(
                f"'{folder}' has no DICOM series with SeriesInstanceUID {series_uid}; it holds: {known}."
            )
        info = chosen[0]
    else:
        info = series[0]
        if len(series) > 1:
            logger.warning(
                "'%s' holds %d DICOM series; reading the largest (%s, %d files, '%s'). Name another with series_uid.",
                folder,
                len(series),
                info.series_uid,
                info.n_files,
                info.description,
            )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(info.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOn()
    image = reader.Execute()
    # Keep the series' first-slice tags on the image so that exporters can copy patient/study tags.
    for key in reader.GetMetaDataKeys(0):
        try:
            image.SetMetaData(key, reader.GetMetaData(0, key))
        except (RuntimeError, UnicodeDecodeError):
            continue
    return image


# -- NIfTI header checks (before SimpleITK reads: ITK fills a short file with zeros and turns NaN into 0) --------

MAX_ABS_INTENSITY = 1e15
"""Float voxels beyond this are corrupt data (and overflow float32 arithmetic downstream)."""
MIN_READ_SPACING_MM = 0.05
MAX_READ_SPACING_MM = 20.0
"""Voxel sizes accepted when reading a volume; anything outside is a corrupt or hand-edited header."""

_NIFTI_TYPES = {  # datatype code -> (numpy kind, bytes per voxel)
    2: ("u1", 1),
    4: ("i2", 2),
    8: ("i4", 4),
    16: ("f4", 4),
    32: ("c8", 8),
    64: ("f8", 8),
    128: ("u1", 3),
    256: ("i1", 1),
    512: ("u2", 2),
    768: ("u4", 4),
    1024: ("i8", 8),
    1280: ("u8", 8),
    1536: ("f16", 16),
    1792: ("c16", 16),
    2048: ("c32", 32),
    2304: ("u1", 4),
}
_CHUNK = 1 << 22


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a NIfTI-1 or NIfTI-2 header that the reading checks need."""

    version: int
    endian: str
    dims: tuple
    datatype: int
    vox_offset: int
    pixdim: tuple
    qform_code: int
    sform_code: int
    quatern: tuple
    qoffset: tuple
    srow: tuple

    @property
    def n_voxels(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def bytes_per_voxel(self) -> int:
        return _NIFTI_TYPES[self.datatype][1]

    @property
    def data_bytes(self) -> int:
        return self.n_voxels * self.bytes_per_voxel


def _open_maybe_gzip(path: Path):
    import gzip

    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def read_nifti_header(path: PathLike) -> NiftiHeader:
    """Parse the header of a ``.nii``/``.nii.gz``; raise :class:`VolumeReadError` naming ``path`` when it is bad."""
    import struct
    import zlib

    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            raw = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise VolumeReadError(f"Could not read '{path}': the file is unreadable or corrupt ({e}).") from e
    if len(raw) < 348:
        raise VolumeReadError(f"'{path}' is truncated: {len(raw)} bytes, shorter than a NIfTI header (348).")
    for endian in ("<", ">"):
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size in (348, 540):
            break
    else:
        raise VolumeReadError(f"'{path}' is not a NIfTI file (header size field {raw[:4]!r}).")
    e = endian
    if size == 348:
        dim = struct.unpack(e + "8h", raw[40:56])
        datatype = struct.unpack(e + "h", raw[70:72])[0]
        pixdim = struct.unpack(e + "8f", raw[76:108])
        vox_offset = struct.unpack(e + "f", raw[108:112])[0]
        qform_code, sform_code = struct.unpack(e + "2h", raw[252:256])
        q = struct.unpack(e + "6f", raw[256:280])
        srow = struct.unpack(e + "12f", raw[280:328])
    else:
        if len(raw) < 540:
            raise VolumeReadError(f"'{path}' is truncated: {len(raw)} bytes, shorter than a NIfTI-2 header (540).")
        datatype = struct.unpack(e + "h", raw[12:14])[0]
        dim = struct.unpack(e + "8q", raw[16:80])
        pixdim = struct.unpack(e + "8d", raw[104:168])
        vox_offset = struct.unpack(e + "q", raw[168:176])[0]
        qform_code, sform_code = struct.unpack(e + "2i", raw[344:352])
        q = struct.unpack(e + "6d", raw[352:400])
        srow = struct.unpack(e + "12d", raw[400:496])
    n_dim = dim[0]
    if not 1 <= n_dim <= 7:
        raise VolumeReadError(f"'{path}' has a corrupt NIfTI header: dim[0] is {n_dim}, not 1 to 7.")
    dims = tuple(int(d) for d in dim[1 : n_dim + 1])
    if any(d < 1 for d in dims):
        raise VolumeReadError(f"'{path}' has a corrupt NIfTI header: image size {dims} has a size below 1.")
    if datatype not in _NIFTI_TYPES:
        raise VolumeReadError(f"'{path}' has a corrupt NIfTI header: unknown datatype code {datatype}.")
    if not np.isfinite(vox_offset) or vox_offset < size:
        vox_offset = size + 4 if size == 348 else 544
    return NiftiHeader(
        version=1 if size == 348 else 2,
        endian=e,
        dims=dims,
        datatype=int(datatype),
        vox_offset=int(vox_offset),
        pixdim=tuple(float(p) for p in pixdim),
        qform_code=int(qform_code),
        sform_code=int(sform_code),
        quatern=tuple(float(v) for v in q[:3]),
        qoffset=tuple(float(v) for v in q[3:]),
        srow=tuple(float(v) for v in srow),
    )


def _quaternion_matrix(b: float, c: float, d: float, qfac: float) -> np.ndarray:
    a2 = 1.0 - (b * b + c * c + d * d)
    a = float(np.sqrt(a2)) if a2 > 1e-7 else 0.0
    if a == 0.0:
        norm = float(np.sqrt(b * b + c * c + d * d)) or 1.0
        b, c, d = b / norm, c / norm, d / norm
    r = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    if qfac < 0:
        r[:, 2] = -r[:, 2]
    return r


def check_nifti_geometry(header: NiftiHeader, path: PathLike) -> None:
    """Refuse voxel sizes out of range, and a qform or sform that disagrees with ``pixdim``."""
    name = str(path)
    spatial = min(3, len(header.dims))
    pixdim = header.pixdim[1 : 1 + spatial]
    if any((not np.isfinite(p)) or p <= 0 for p in pixdim):
        raise VolumeReadError(
            f"'{name}' has voxel size (pixdim) {tuple(pixdim)} mm; each must be positive (a hand-edited or "
            "corrupt header)."
        )
    if header.sform_code > 0:
        srow = np.asarray(header.srow, dtype=float).reshape(3, 4)
        if not np.all(np.isfinite(srow)):
            raise VolumeReadError(f"'{name}' has a non-finite sform matrix.")
        norms = np.linalg.norm(srow[:, :spatial], axis=0)
        if np.any(np.abs(norms - np.asarray(pixdim)) > 1e-3 * np.maximum(np.asarray(pixdim), 1e-6) + 1e-5):
            raise VolumeReadError(
                f"'{name}' has an sform whose voxel size {tuple(round(float(v), 6) for v in norms)} mm disagrees "
                f"with its pixdim {tuple(round(p, 6) for p in pixdim)} mm; the header was edited or is corrupt."
            )
        # Both claiming the same space (ITK writes them so) yet describing different grids: edited or corrupt.
        # (A qform in scanner space beside an sform in a template space is legitimate, and not compared.)
        if header.qform_code > 0 and header.qform_code == header.sform_code and spatial == 3:
            qfac = -1.0 if header.pixdim[0] < 0 else 1.0
            rotation = _quaternion_matrix(*header.quatern, qfac)
            q_affine = rotation * np.asarray(pixdim)[None, :]
            s_affine = srow[:, :3]  # both are RAS+: compared as stored
            tol = 1e-2 * max(pixdim)
            if np.abs(q_affine - s_affine).max() > tol or np.abs(np.asarray(header.qoffset) - srow[:, 3]).max() > max(
                tol, 1e-2
            ):
                raise VolumeReadError(
                    f"'{name}' has a qform and an sform that describe different grids (directions "
                    f"{np.round(q_affine / np.asarray(pixdim), 3).tolist()} vs "
                    f"{np.round(s_affine / np.asarray(pixdim), 3).tolist()}); the header was edited or is corrupt."
                )


def check_nifti_data(path: PathLike, header: Optional[NiftiHeader] = None) -> NiftiHeader:
    """Check that a ``.nii``/``.nii.gz`` holds all the data its header announces, with no NaN or Inf.

    SimpleITK fills a short file with zeros and reads NaN and Inf as 0, so both are checked here, on the
    stored bytes, before the image is read. Returns the header.
    """
    import zlib

    path = Path(path)
    header = header or read_nifti_header(path)
    need = header.data_bytes
    kind, width = _NIFTI_TYPES[header.datatype]
    floating = kind.startswith("f") and width in (4, 8)
    compressed = path.name.lower().endswith(".gz")
    if not compressed:
        size = path.stat().st_size
        if size < header.vox_offset + need:
            raise VolumeReadError(
                f"'{path}' is truncated: its header announces {header.dims} voxels ({need} bytes of data) but the "
                f"file holds {max(size - header.vox_offset, 0)} bytes of data."
            )
        if not floating:
            return header
    dtype = np.dtype(header.endian + kind) if floating else None
    got = 0
    n_bad = 0
    carry = b""
    try:
        with _open_maybe_gzip(path) as f:
            skip = header.vox_offset
            while skip > 0:
                block = f.read(min(skip, _CHUNK))
                if not block:
                    break
                skip -= len(block)
            while got < need:
                block = f.read(min(_CHUNK, need - got))
                if not block:
                    break
                got += len(block)
                if dtype is not None:
                    block = carry + block
                    usable = len(block) - len(block) % dtype.itemsize
                    values = np.frombuffer(block[:usable], dtype=dtype)
                    n_bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                    carry = block[usable:]
    except (OSError, EOFError, zlib.error) as e:
        raise VolumeReadError(f"Could not read '{path}': the file is truncated or corrupt ({e}).") from e
    if got < need:
        raise VolumeReadError(
            f"'{path}' is truncated: its header announces {header.dims} voxels ({need} bytes of data) but the "
            f"file holds {got} bytes of data."
        )
    if n_bad:
        raise VolumeReadError(f"'{path}' has {n_bad} NaN or Inf voxels.")
    return header


def available_memory_bytes() -> Optional[int]:
    """Memory available to a new allocation (``MemAvailable`` on Linux), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_memory_for(path: PathLike, size: Iterable[int], bytes_per_voxel: int) -> None:
    """Refuse a volume whose voxels (plus a float32 working copy) do not fit in the available memory."""
    n = 1
    for s in size:
        n *= int(s)
    need = n * (int(bytes_per_voxel) + 4)
    available = available_memory_bytes()
    if available is not None and need > available:
        raise VolumeReadError(
            f"'{path}' announces {tuple(int(s) for s in size)} voxels: about {need / 1e9:.1f} GB to read and "
            f"process, more than the {available / 1e9:.1f} GB of memory available; a corrupt header or the "
            "wrong file?"
        )


# -- MetaImage and NRRD header checks (SimpleITK can crash on a corrupt text header) --------------------------

_MET_TYPES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}
_NRRD_TYPES = {
    "signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1, "uint8_t": 1,
    "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2, "int16_t": 2,
    "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2, "uint16_t": 2,
    "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4, "uint32": 4, "uint32_t": 4,
    "longlong": 8, "long long": 8, "long long int": 8, "signed long long": 8, "signed long long int": 8,
    "int64": 8, "int64_t": 8, "ulonglong": 8, "unsigned long long": 8, "unsigned long long int": 8,
    "uint64": 8, "uint64_t": 8, "float": 4, "double": 8,
}  # fmt: skip
_NRRD_ENCODINGS = ("raw", "gzip", "gz", "bzip2", "bz2", "ascii", "txt", "text", "hex")
MAX_HEADER_BYTES = 1 << 16


def _numbers(text: str, count: Optional[int], what: str, path: Path, *, positive: bool = False) -> List[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").replace("(", " ").replace(")", " ").split()]
    except ValueError:
        raise VolumeReadError(f"'{path}' has a corrupt header: {what} is {text.strip()!r}, not numbers.") from None
    if count is not None and len(values) != count:
        raise VolumeReadError(f"'{path}' has a corrupt header: {what} has {len(values)} values, not {count}.")
    if not all(np.isfinite(values)) or (positive and any(v <= 0 for v in values)):
        raise VolumeReadError(f"'{path}' has a corrupt header: {what} is {text.strip()!r}.")
    return values


def _sizes(text: str, count: int, what: str, path: Path) -> List[int]:
    parts = text.split()
    if len(parts) != count or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise VolumeReadError(
            f"'{path}' has a corrupt header: {what} is {text.strip()!r}; {count} positive integers are needed."
        )
    return [int(p) for p in parts]


def check_metaimage_header(path: PathLike) -> Tuple[List[int], int]:
    """Check a ``.mha``/``.mhd`` header's fields before SimpleITK parses them; return (sizes, bytes per voxel)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES).decode("latin-1")
    fields: dict = {}
    header_end = None
    offset = 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        key, sep, value = line.partition("=")
        if not sep:
            if line.strip():
                raise VolumeReadError(f"'{path}' has a corrupt MetaImage header line {line.strip()[:60]!r}.")
            continue
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            header_end = offset
            break
    if header_end is None:
        raise VolumeReadError(f"'{path}' has a corrupt MetaImage header: no ElementDataFile line.")
    ndims_text = fields.get("ndims", "")
    if not ndims_text.isdigit() or not 2 <= int(ndims_text) <= 4:
        raise VolumeReadError(f"'{path}' has a corrupt MetaImage header: NDims is {ndims_text!r}.")
    n = int(ndims_text)
    sizes = _sizes(fields.get("dimsize", ""), n, "DimSize", path)
    for key in ("elementspacing", "elementsize"):
        if key in fields:
            _numbers(fields[key], n, key, path, positive=True)
    for key in ("offset", "position", "origin"):
        if key in fields:
            _numbers(fields[key], n, key, path)
    for key in ("transformmatrix", "rotation", "orientation"):
        if key in fields:
            _numbers(fields[key], n * n, key, path)
    channels = fields.get("elementnumberofchannels", "1")
    if not channels.isdigit() or not 1 <= int(channels) <= 64:
        raise VolumeReadError(f"'{path}' has a corrupt MetaImage header: ElementNumberOfChannels is {channels!r}.")
    element = fields.get("elementtype", "").upper()
    if element not in _MET_TYPES:
        raise VolumeReadError(f"'{path}' has a corrupt MetaImage header: ElementType is {element!r}.")
    for key in ("compresseddatasize", "headersize"):
        if key in fields and not fields[key].lstrip("-").isdigit():
            raise VolumeReadError(f"'{path}' has a corrupt MetaImage header: {key} is {fields[key]!r}.")
    bytes_per = _MET_TYPES[element] * int(channels)
    compressed = fields.get("compresseddata", "false").lower() == "true"
    local = fields.get("elementdatafile", "").upper() == "LOCAL"
    if local and not compressed:
        need = bytes_per
        for s in sizes:
            need *= s
        have = path.stat().st_size - header_end
        if have < need:
            raise VolumeReadError(
                f"'{path}' is truncated: its header announces {tuple(sizes)} voxels ({need} bytes of data) but the "
                f"file holds {max(have, 0)} bytes of data."
            )
    return sizes, bytes_per


def check_nrrd_header(path: PathLike) -> Tuple[List[int], int]:
    """Check a ``.nrrd``/``.nhdr`` header's fields before SimpleITK parses them; return (sizes, bytes per voxel)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(MAX_HEADER_BYTES).decode("latin-1")
    lines = head.splitlines()
    if not lines or not lines[0].startswith("NRRD000"):
        raise VolumeReadError(f"'{path}' is not a NRRD file (it does not start with 'NRRD000').")
    fields: dict = {}
    for line in lines[1:]:
        if not line.strip():
            break
        if line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise VolumeReadError(f"'{path}' has a corrupt NRRD header line {line.strip()[:60]!r}.")
        fields[key.strip().lower()] = value.strip()
    dim_text = fields.get("dimension", "")
    if not dim_text.isdigit() or not 1 <= int(dim_text) <= 4:
        raise VolumeReadError(f"'{path}' has a corrupt NRRD header: dimension is {dim_text!r}.")
    n = int(dim_text)
    sizes = _sizes(fields.get("sizes", ""), n, "sizes", path)
    kind = fields.get("type", "").lower()
    if kind not in _NRRD_TYPES:
        raise VolumeReadError(f"'{path}' has a corrupt NRRD header: type is {kind!r}.")
    encoding = fields.get("encoding", "").lower()
    if encoding not in _NRRD_ENCODINGS:
        raise VolumeReadError(f"'{path}' has a corrupt NRRD header: encoding is {encoding!r}.")
    if "spacings" in fields:
        for v in fields["spacings"].split():
            if v.lower() != "nan":
                _numbers(v, 1, "spacings", path, positive=True)
    space_dim = None
    if "space dimension" in fields:
        if not fields["space dimension"].isdigit() or not 1 <= int(fields["space dimension"]) <= 4:
            raise VolumeReadError(
                f"'{path}' has a corrupt NRRD header: space dimension is {fields['space dimension']!r}."
            )
        space_dim = int(fields["space dimension"])
    if "space directions" in fields:
        groups = [g for g in fields["space directions"].replace("none", "( none )").split(")") if g.strip()]
        if len(groups) != n:
            raise VolumeReadError(
                f"'{path}' has a corrupt NRRD header: space directions has {len(groups)} axes, not {n}."
            )
        for group in groups:
            if "none" in group:
                continue
            values = _numbers(group, space_dim, "space directions", path)
            if not any(values):
                raise VolumeReadError(f"'{path}' has a corrupt NRRD header: a space direction is zero.")
    if "space origin" in fields:
        _numbers(fields["space origin"], space_dim, "space origin", path)
    return sizes, _NRRD_TYPES[kind]


def _check_before_reading(path: Path) -> None:
    """Header checks that run before SimpleITK allocates anything (size vs file and memory, NIfTI data)."""
    if volume_suffix(path) in (".nii", ".nii.gz"):
        header = read_nifti_header(path)
        check_memory_for(path, header.dims, header.bytes_per_voxel)
        check_nifti_geometry(header, path)
        check_nifti_data(path, header)
        return
    if volume_suffix(path) in (".mha", ".mhd"):
        sizes, bytes_per = check_metaimage_header(path)
    elif volume_suffix(path) in (".nrrd", ".nhdr"):
        sizes, bytes_per = check_nrrd_header(path)
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # a RuntimeError here is mapped by read_volume
        sizes = reader.GetSize()
        bytes_per = max(1, int(reader.GetNumberOfComponents())) * _component_bytes(reader.GetPixelID())
    check_memory_for(path, sizes, bytes_per)


def _component_bytes(pixel_id: int) -> int:
    sizes = {
        sitk.sitkUInt8: 1,
        sitk.sitkInt8: 1,
        sitk.sitkUInt16: 2,
        sitk.sitkInt16: 2,
        sitk.sitkUInt32: 4,
        sitk.sitkInt32: 4,
        sitk.sitkUInt64: 8,
        sitk.sitkInt64: 8,
        sitk.sitkFloat32: 4,
        sitk.sitkFloat64: 8,
    }
    return sizes.get(pixel_id, 8)


def validate_volume(image: sitk.Image, source: PathLike = "<image>", *, check_finite: bool = True) -> sitk.Image:
    """Check that ``image`` is a usable scalar 3D volume; raise :class:`VolumeReadError` naming ``source``."""
    name = str(source)
    dim = image.GetDimension()
    if dim == 4:
        raise VolumeReadError(
            f"'{name}' is a 4D image (size {image.GetSize()}); a scalar 3D volume is required. "
            "Split the time points or echoes into separate 3D files."
        )
    if dim != 3:
        raise VolumeReadError(f"'{name}' is {dim}D (size {image.GetSize()}); a 3D volume is required.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeReadError(
            f"'{name}' is a vector image with {image.GetNumberOfComponentsPerPixel()} components "
            "per voxel; a scalar 3D volume is required. Save each channel as its own file."
        )
    size = image.GetSize()
    if min(size) == 0:
        raise VolumeReadError(f"'{name}' is empty (size {size}).")
    spacing = image.GetSpacing()
    if any((not np.isfinite(s)) or s <= 0 or s > MAX_SPACING_MM for s in spacing):
        raise VolumeReadError(
            f"'{name}' has absurd voxel spacing {tuple(spacing)} mm; each spacing must be "
            f"positive and at most {MAX_SPACING_MM:g} mm."
        )
    if check_finite and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(array).all():
            n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise VolumeReadError(f"'{name}' has {n_bad} NaN or Inf voxels.")
    return image


def read_volume(path: PathLike, *, series_uid: Optional[str] = None) -> sitk.Image:
    """Read a scalar 3D volume from a file or a DICOM series folder.

    Parameters
    ----------
    path
        A ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file, or a folder with
        a DICOM series.
    series_uid
        For a DICOM folder with several series, the SeriesInstanceUID to read. By default the
        series with the most files is read, with a warning.

    Raises
    ------
    VolumeReadError
        The path is missing, unreadable, corrupt, not 3D, not scalar, empty, has non-finite
        voxels or absurd spacing. The message names the path.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"No file or folder at '{path}'.")
    try:
        if path.is_dir():
            image = _read_dicom_series(path, series_uid)
        else:
            _check_before_reading(path)
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:  # SimpleITK reports every I/O failure as RuntimeError
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown cause"
        if "spacing" in first.lower():
            raise VolumeReadError(f"'{path}' has absurd voxel spacing (zero or negative): {first}") from e
        raise VolumeReadError(
            f"Could not read '{path}': the file is unreadable or corrupt ({first}). Supported: .nii, .nii.gz, "
            ".nrrd, .mha, .mhd, or a folder with a DICOM series."
        ) from e
    except MemoryError:
        raise VolumeReadError(f"'{path}' does not fit in memory ({describe_size(path)}).") from None
    except OSError as e:
        if isinstance(e, VolumeReadError):
            raise
        raise VolumeReadError(f"Could not read '{path}': {e.strerror or e}.") from e
    validate_volume(image, path)
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        peak = float(max(abs(float(array.min())), abs(float(array.max()))))
        if peak > MAX_ABS_INTENSITY:
            raise VolumeReadError(
                f"'{path}' has intensities up to {peak:.3g}, beyond any scanner's range (at most "
                f"{MAX_ABS_INTENSITY:g}): corrupt data."
            )
    spacing = image.GetSpacing()
    if any(s < MIN_READ_SPACING_MM or s > MAX_READ_SPACING_MM for s in spacing):
        raise VolumeReadError(
            f"'{path}' has voxel size {tuple(round(s, 6) for s in spacing)} mm, outside "
            f"{MIN_READ_SPACING_MM:g}-{MAX_READ_SPACING_MM:g} mm: a corrupt or hand-edited header."
        )
    return image


def describe_size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes on disk"
    except OSError:
        return "size unknown"


def read_volumes(paths: Iterable[PathLike]) -> list:
    """Read several volumes (e.g. the echoes of a multi-echo MRI) with :func:`read_volume`."""
    return [read_volume(p) for p in paths]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _strip_suffix(path: Path, suffix: str) -> str:
    return path.name[: len(path.name) - len(suffix)]


def files_written(path: PathLike) -> List[Path]:
    """Every file that writing the volume ``path`` creates: ``.mhd`` + its ``.raw``/``.zraw``, ``.nhdr`` + its
    ``.raw``/``.raw.gz``, ``.hdr`` + ``.img``; else ``path`` alone."""
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith(".mhd"):
        stem = _strip_suffix(path, ".mhd")
        return [path, path.with_name(stem + ".raw"), path.with_name(stem + ".zraw")]
    if lower.endswith(".nhdr"):
        stem = _strip_suffix(path, ".nhdr")
        return [path, path.with_name(stem + ".raw"), path.with_name(stem + ".raw.gz")]
    if lower.endswith((".hdr", ".img")):
        stem = path.name[:-4]
        return [path.with_name(stem + ".hdr"), path.with_name(stem + ".img")]
    return [path]


def _detached_data_files(path: Path) -> List[Path]:
    """The data files that a ``.mhd`` (``ElementDataFile``) or ``.nhdr`` (``data file``) header names."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 16).decode("latin-1")
    except OSError:
        return []
    lines = [ln.strip() for ln in text.splitlines()]
    names: List[str] = []
    for i, line in enumerate(lines):
        key, sep, value = line.partition(":" if path.name.lower().endswith(".nhdr") else "=")
        key = key.strip().lower().replace(" ", "")
        if not sep or key not in ("elementdatafile", "datafile"):
            continue
        value = value.strip().lstrip("=").strip()
        if value.upper().startswith("LIST"):
            names += [ln for ln in lines[i + 1 :] if ln]
        elif value and value.upper() != "LOCAL":
            names.append(value.split()[0] if "%" in value else value)
        break
    out = []
    for name in names:
        candidate = Path(name)
        out.append(candidate if candidate.is_absolute() else path.parent / candidate)
    return out


def files_read(path: PathLike) -> List[Path]:
    """Every file that reading the volume ``path`` touches (a detached header's data files included)."""
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith((".mhd", ".nhdr")):
        return [path] + _detached_data_files(path)
    if lower.endswith((".hdr", ".img")):
        return files_written(path)
    return [path]


def check_not_input(output: PathLike, inputs: Iterable[PathLike]) -> None:
    """Raise :class:`VolumeWriteError` when writing ``output`` would replace any file of ``inputs``.

    Every file the output's format writes (an ``.mhd``'s data file, ...) is compared with every file each
    input's format reads (the data file an input ``.mhd`` names, ...): inputs are never overwritten.
    """
    out = Path(output)
    written = files_written(out)
    for candidate in inputs:
        for read in files_read(Path(candidate)):
            for target in written:
                if target.resolve() == read.resolve() or _same_file(target, read):
                    if target == out and read == Path(candidate):
                        raise VolumeWriteError(
                            f"Refusing to write '{out}': it is an input file, and inputs are never overwritten."
                        )
                    raise VolumeWriteError(
                        f"Refusing to write '{out}': its file '{target}' is the input file '{read}' (read through "
                        f"'{candidate}'), and inputs are never overwritten."
                    )


def check_output_file(path: PathLike, inputs: Iterable[PathLike] = (), *, what: str = "output") -> Path:
    """Check before any long work that the volume file ``path`` can be written: a known suffix, not a
    folder, not an input, its folder creatable and writable. Raises :class:`VolumeWriteError`."""
    path = Path(path)
    if not volume_suffix(path):
        raise VolumeWriteError(
            f"Cannot write the {what} '{path}': unknown volume format; use one of {', '.join(VOLUME_SUFFIXES)}."
        )
    if path.is_dir():
        raise VolumeWriteError(f"Cannot write the {what} '{path}': it is an existing folder; name a file.")
    check_not_input(path, inputs)
    parent = path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise VolumeWriteError(f"Cannot write the {what} '{path}': '{existing}' is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VolumeWriteError(f"Cannot write the {what} '{path}': the folder '{existing}' is not writable.")
    return path


# -- locks, staged outputs committed together, stale temporary items -----------------------------------------

LOCK_SUFFIX = ".lock"
STALE_SECONDS = 6 * 3600.0
"""A temporary item of ours untouched for this long is left over from a killed run."""
_TEMP_SUFFIXES = (".partial", ".extracting", ".writing", ".old", ".work", ".fetch", ".installing")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class OutputLock:
    """An exclusive lock on output paths (a ``.NAME.lock`` file beside each, holding the owner's pid).

    A lock held by a live process makes :meth:`acquire` raise :class:`VolumeWriteError`; one left by a
    process that is gone is taken over. Use as a context manager.
    """

    def __init__(self, paths: Iterable[PathLike]) -> None:
        self.paths = [Path(p) for p in paths]
        self.held: List[Path] = []

    @staticmethod
    def lock_path(path: Path) -> Path:
        return path.parent / f".{path.name}{LOCK_SUFFIX}"

    def acquire(self) -> OutputLock:
        try:
            for path in self.paths:
                self._take(path)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, path: Path) -> None:
        lock = self.lock_path(path)
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VolumeWriteError(f"Cannot create the folder '{lock.parent}': {e.strerror or e}.") from e
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = int(lock.read_text(encoding="ascii").split()[0])
                except (OSError, ValueError, IndexError):
                    owner = -1
                if owner > 0 and _pid_alive(owner):
                    raise VolumeWriteError(
                        f"'{path}' is being written by another run (process {owner}); wait for it to finish "
                        f"or choose another output (lock file '{lock}')."
                    ) from None
                logger.warning("Removing the stale lock '%s' of a run that is gone.", lock)
                try:
                    lock.unlink()
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:
                raise VolumeWriteError(f"Cannot write into '{lock.parent}': {e.strerror or e}.") from e
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
            self.held.append(lock)
            return
        raise VolumeWriteError(f"Could not take the lock '{lock}' for '{path}'.")

    def release(self) -> None:
        for lock in self.held:
            try:
                lock.unlink()
            except OSError:
                pass
        self.held = []

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


class StagedOutputs:
    """Outputs written to temporary places beside their targets, then renamed into place together.

    :meth:`file` and :meth:`folder` return where to write; :meth:`commit` moves everything into place, or
    nothing: a failure part-way puts back what was there. Leaving the context without a commit (an error,
    Ctrl-C, SIGTERM) removes every temporary item.
    """

    def __init__(self) -> None:
        self._stages: List[Tuple[Path, Path]] = []  # (temporary folder, final parent folder)

    def _stage(self, target: Path) -> Path:
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
        except OSError as e:
            raise VolumeWriteError(f"Cannot write into '{parent}': {e.strerror or e}.") from e
        self._stages.append((stage, parent))
        return stage / target.name

    def file(self, target: PathLike) -> Path:
        """A temporary path for the file ``target`` (companion files written beside it follow it)."""
        return self._stage(Path(target))

    def folder(self, target: PathLike) -> Path:
        """A temporary path (not created) for the folder ``target``."""
        return self._stage(Path(target))

    def commit(self) -> None:
        done: List[Tuple[Path, Path, Optional[Path]]] = []  # (final, staged item, backup of what was there)
        try:
            for stage, parent in self._stages:
                for item in sorted(stage.iterdir()):
                    final = parent / item.name
                    backup = None
                    if final.exists() or final.is_symlink():
                        backup = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=parent))
                        if final.is_dir() and not final.is_symlink():
                            os.replace(final, backup / final.name)
                        else:  # a hard link keeps the old file in place until the atomic replace
                            try:
                                os.link(final, backup / final.name, follow_symlinks=False)
                            except OSError:
                                os.replace(final, backup / final.name)
                    done.append((final, item, backup))
                    os.replace(item, final)
        except BaseException:
            for final, item, backup in reversed(done):
                try:
                    if final.exists() and not item.exists():
                        os.replace(final, item)  # take the new one out
                    if backup is not None and (backup / final.name).exists():
                        os.replace(backup / final.name, final)
                except OSError:
                    logger.error("Could not put back '%s' after a failed commit.", final)
            raise
        finally:
            for _, _, backup in done:
                if backup is not None:
                    shutil.rmtree(backup, ignore_errors=True)
        self.discard()

    def discard(self) -> None:
        for stage, _ in self._stages:
            shutil.rmtree(stage, ignore_errors=True)
        self._stages = []

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, *exc) -> bool:
        self.discard()
        return False


def _newest_mtime(path: Path) -> float:
    try:
        newest = path.lstat().st_mtime
    except OSError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        try:
            for child in path.iterdir():
                try:
                    newest = max(newest, child.lstat().st_mtime)
                except OSError:
                    continue
        except OSError:
            pass
    return newest


def is_temporary_name(name: str) -> bool:
    """True for the names of our temporary items (``.NAME.xxxx.partial`` and friends)."""
    return name.startswith(".") and name.endswith(_TEMP_SUFFIXES)


def sweep_stale_partials(folder: PathLike, *, max_age: float = STALE_SECONDS, everything: bool = False) -> List[Path]:
    """Delete our temporary items in ``folder`` untouched for ``max_age`` seconds (left by a killed run).

    Only names of ours (:func:`is_temporary_name`) are touched, unless ``everything`` (a folder that is
    entirely ours, such as the cache's downloads). Returns what was removed.
    """
    import time

    folder = Path(folder)
    removed: List[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not (everything or is_temporary_name(entry.name)):
            continue
        if now - _newest_mtime(entry) < max_age:
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as e:
            logger.debug("Could not remove the stale '%s': %s", entry, e)
            continue
        logger.info("Removed '%s', left over by an interrupted run.", entry)
        removed.append(entry)
    return removed


def ensure_output_dir(path: PathLike, *, what: str = "output folder") -> Path:
    """Create the folder ``path`` (with its parents) for outputs and return it.

    Raises :class:`VolumeWriteError`, naming ``what`` and the path, when ``path`` is a file, cannot be
    created, or is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise VolumeWriteError(f"Cannot write the {what} '{out}': it is a file, not a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VolumeWriteError(f"Cannot create the {what} '{out}': {e.strerror or e}.") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise VolumeWriteError(f"The {what} '{out}' is not writable.")
    return out


def replace_folder(new: PathLike, target: PathLike) -> Path:
    """Move the finished folder ``new`` onto ``target`` (same parent folder) by renames only.

    An existing ``target`` is moved aside first and deleted only once ``new`` is in place; if the
    move fails, it is put back. Used for outputs that are folders (a DICOM series, a model package).
    """
    new, target = Path(new), Path(target)
    old: Optional[Path] = None
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(new, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def atomic_output(path: PathLike):
    """Context manager giving a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.

    >>> with atomic_output("out.json") as tmp:   # doctest: +SKIP
    ...     tmp.write_text("{}")
    """
    return _AtomicOutput(Path(path))


class _AtomicOutput:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp_dir: Optional[Path] = None

    def __enter__(self) -> Path:
        parent = self.path.parent
        if not parent.exists():
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise VolumeWriteError(f"Cannot create the folder '{parent}': {e.strerror or e}.") from e
        try:
            self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial", dir=parent))
        except OSError as e:
            raise VolumeWriteError(f"Cannot write into '{parent}': {e.strerror or e}.") from e
        return self.tmp_dir / self.path.name

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp_dir is not None
        try:
            if exc_type is None:
                produced = sorted(self.tmp_dir.iterdir(), key=lambda p: p.name != self.path.name)
                # Companion files (e.g. an .mhd's .raw) first, the named file last.
                for item in reversed(produced):
                    os.replace(item, self.path.parent / item.name)
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return False


def write_volume(image: sitk.Image, path: PathLike, *, inputs: Iterable[PathLike] = (), compress: bool = True) -> Path:
    """Write ``image`` to ``path`` atomically, keeping its geometry exactly.

    The format follows the suffix (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``).
    ``inputs`` lists files that must not be overwritten. Returns the written path.
    """
    path = Path(path)
    if not volume_suffix(path):
        raise VolumeWriteError(
            f"Cannot write '{path}': unknown volume format; use one of {', '.join(VOLUME_SUFFIXES)}."
        )
    if path.is_dir():
        raise VolumeWriteError(f"Cannot write '{path}': it is an existing folder; name a file.")
    check_not_input(path, inputs)
    try:
        with atomic_output(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=compress and volume_suffix(path) != ".nii")
    except RuntimeError as e:
        raise VolumeWriteError(f"Could not write '{path}': {str(e).strip().splitlines()[-1]}") from e
    except OSError as e:
        if isinstance(e, VolumeWriteError):
            raise
        raise VolumeWriteError(f"Could not write '{path}': {e.strerror or e}.") from e
    return path


# -- MRI channels ----------------------------------------------------------------------------------------------

MIN_CHANNEL_OVERLAP = 0.5
"""The least fraction of the first channel's field of view that another channel must cover to be resampled."""


def describe_grid_with_direction(image: sitk.Image) -> str:
    """Size, spacing, origin and direction of an image's grid, on one line."""
    direction = np.round(np.asarray(image.GetDirection(), dtype=float).reshape(3, 3), 3).tolist()
    return (
        f"size {image.GetSize()}, spacing {tuple(round(s, 4) for s in image.GetSpacing())} mm, "
        f"origin {tuple(round(o, 2) for o in image.GetOrigin())}, direction {direction}"
    )


def overlap_fraction(reference: sitk.Image, other: sitk.Image) -> float:
    """The fraction of ``reference``'s box (in its index space) that ``other``'s box covers (0 to 1)."""
    import itertools

    size = np.asarray(reference.GetSize(), dtype=float)
    lo_ref, hi_ref = np.full(3, -0.5), size - 0.5
    corners = []
    other_size = other.GetSize()
    for corner in itertools.product(*[(-0.5, s - 0.5) for s in other_size]):
        point = other.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        corners.append(reference.TransformPhysicalPointToContinuousIndex(point))
    corners = np.asarray(corners, dtype=float)
    lo = np.maximum(corners.min(axis=0), lo_ref)
    hi = np.minimum(corners.max(axis=0), hi_ref)
    extent = np.clip(hi - lo, 0.0, None)
    return float(np.prod(extent) / np.prod(hi_ref - lo_ref))


def check_mri_channels(images: List[sitk.Image], names: List[str], *, resample: bool = False) -> None:
    """Refuse MRI channels that cannot give a meaningful synthesis, before any inference.

    A channel that is constant (all zeros: an empty echo) is refused. Channels must share the first
    channel's voxel grid; with ``resample`` a channel on another grid is accepted (and resampled by the
    inference) only when it covers at least :data:`MIN_CHANNEL_OVERLAP` of the first channel's field of view.
    Raises :class:`~SyntheticCTLib.kernel.errors.InvalidParameterError` or
    :class:`~SyntheticCTLib.kernel.errors.GeometryMismatchError`; messages name the channel.
    """
    from SyntheticCTLib.kernel.errors import GeometryMismatchError, InvalidParameterError
    from SyntheticCTLib.kernel.geometry import same_grid

    stats = sitk.MinimumMaximumImageFilter()
    for image, name in zip(images, names):
        stats.Execute(image)
        if not stats.GetMaximum() > stats.GetMinimum():
            raise InvalidParameterError(
                f"MRI channel '{name}' is constant (every voxel is {stats.GetMinimum():g}): it holds no signal to "
                "synthesize from."
            )
    reference = images[0]
    for image, name in zip(images[1:], names[1:]):
        if same_grid(reference, image):
            continue
        if not resample:
            raise GeometryMismatchError(
                f"MRI channel '{name}' is not on the grid of '{names[0]}': {describe_grid_with_direction(image)} vs "
                f"{describe_grid_with_direction(reference)}. Channels of one acquisition share a grid; pass "
                "--resample-channels to resample it onto the first channel's grid."
            )
        fraction = overlap_fraction(reference, image)
        if fraction < MIN_CHANNEL_OVERLAP:
            raise GeometryMismatchError(
                f"MRI channel '{name}' covers {100 * fraction:.0f}% of the field of view of '{names[0]}' (at least "
                f"{100 * MIN_CHANNEL_OVERLAP:.0f}% needed to resample it): {describe_grid_with_direction(image)} vs "
                f"{describe_grid_with_direction(reference)}. Is it from the same acquisition?"
            )
