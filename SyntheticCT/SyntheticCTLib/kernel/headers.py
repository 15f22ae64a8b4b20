"""Checks of volume file headers before SimpleITK reads them.

SimpleITK fills a NIfTI file shorter than its header says with zeros, reads NaN and Inf in NIfTI as 0,
trusts a header claiming any size (and allocates it), and can crash on a corrupt MetaImage header. These
functions read the headers themselves (NIfTI-1/2, MetaImage, NRRD) and raise a
:class:`~SyntheticCTLib.kernel.errors.VolumeReadError` naming the file and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np

from SyntheticCTLib.kernel.errors import VolumeReadError
from SyntheticCTLib.kernel.types import PathLike

# -- NIfTI header checks (before SimpleITK reads: ITK fills a short file with zeros and turns NaN into 0) --------


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
    if positive and not all(np.isfinite(v) and v > 0 for v in values):
        raise VolumeReadError(f"'{path}' has absurd voxel spacing in its header ({what} {text.strip()!r}).")
    if not all(np.isfinite(values)):
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
