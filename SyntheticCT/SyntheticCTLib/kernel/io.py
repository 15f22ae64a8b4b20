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
from typing import Iterable, Optional

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import VolumeReadError, VolumeWriteError
from SyntheticCTLib.kernel.types import PathLike

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


def _read_dicom_series(folder: Path, series_uid: Optional[str], volume: Optional[str] = None) -> sitk.Image:
    """One volume from a DICOM folder (split by echo, image type, orientation and time; see dicom_series)."""
    from SyntheticCTLib.kernel import dicom_series

    volumes = dicom_series.find_volumes(folder)
    if series_uid is None and volume is None and len({v.series_uid for v in volumes}) > 1:
        counts: dict = {}
        for v in volumes:
            counts[v.series_uid] = counts.get(v.series_uid, 0) + len(v.frames)
        series_uid = max(counts, key=lambda uid: counts[uid])
        first = next(v for v in volumes if v.series_uid == series_uid)
        logger.warning(
            "'%s' holds %d DICOM series; reading the largest (%s, %d images, '%s'). Name another with series_uid.",
            folder,
            len(counts),
            series_uid,
            counts[series_uid],
            first.series_description,
        )
    return dicom_series.read_dicom_volume(folder, volume, series_uid=series_uid)


def _is_dicom_file(path: Path) -> bool:
    from SyntheticCTLib.kernel.dicom_series import is_dicom_file

    return is_dicom_file(path)


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


def read_volume(path: PathLike, *, series_uid: Optional[str] = None, volume: Optional[str] = None) -> sitk.Image:
    """Read a scalar 3D volume from a file or a DICOM series folder.

    Parameters
    ----------
    path
        A ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file, or a folder with
        a DICOM series.
    series_uid
        For a DICOM folder with several series, the SeriesInstanceUID to read. By default the
        series with the most files is read, with a warning.
    volume
        For a DICOM folder, the id of one volume (``syntheticct inspect`` lists them: one per echo,
        image type, orientation and time point). A folder holding several volumes needs one.

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
        if path.is_dir() or _is_dicom_file(path):
            image = _read_dicom_series(path, series_uid, volume)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:  # SimpleITK reports every I/O failure as RuntimeError
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown cause"
        if "spacing" in first.lower():
            raise VolumeReadError(f"'{path}' has absurd voxel spacing (zero or negative): {first}") from e
        raise VolumeReadError(
            f"Could not read '{path}': the file is unreadable or corrupt ({first}). Supported: .nii, .nii.gz, "
            ".nrrd, .mha, .mhd, or a folder with a DICOM series."
        ) from e
    return validate_volume(image, path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(output: PathLike, inputs: Iterable[PathLike]) -> None:
    """Raise :class:`VolumeWriteError` when ``output`` is one of ``inputs`` (inputs are never overwritten)."""
    out = Path(output)
    for candidate in inputs:
        candidate = Path(candidate)
        if out.resolve() == candidate.resolve() or _same_file(out, candidate):
            raise VolumeWriteError(f"Refusing to write '{out}': it is an input file, and inputs are never overwritten.")


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
    check_not_input(path, inputs)
    try:
        with atomic_output(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=compress and volume_suffix(path) != ".nii")
    except RuntimeError as e:
        raise VolumeWriteError(f"Could not write '{path}': {str(e).strip().splitlines()[-1]}") from e
    return path
