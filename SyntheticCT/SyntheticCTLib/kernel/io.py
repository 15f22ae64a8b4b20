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
from typing import Iterable, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from SyntheticCTLib.kernel.errors import VolumeReadError, VolumeWriteError
from SyntheticCTLib.kernel.headers import (
    check_memory_for,
    check_metaimage_header,
    check_nifti_data,
    check_nifti_geometry,
    check_nrrd_header,
    read_nifti_header,
)
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


MAX_ABS_INTENSITY = 1e15
"""Float voxels beyond this are corrupt data (and overflow float32 arithmetic downstream)."""
MIN_READ_SPACING_MM = 0.05
MAX_READ_SPACING_MM = 20.0
"""Voxel sizes accepted when reading a volume; anything outside is a corrupt or hand-edited header."""


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
        with native_stderr_to_log(path):
            if path.is_dir() or _is_dicom_file(path):
                image = _read_dicom_series(path, series_uid, volume)
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
            f"'{path}' has absurd voxel spacing {tuple(round(s, 6) for s in spacing)} mm, outside "
            f"{MIN_READ_SPACING_MM:g}-{MAX_READ_SPACING_MM:g} mm: a corrupt or hand-edited header."
        )
    return image


class native_stderr_to_log:  # noqa: N801 - used as a context manager, like a function
    """Catch what C++ code (ITK, MetaIO, GDCM) prints on the process's stderr while reading ``source``, and
    log it as one line (a warning when the read fails, else debug) instead of several raw lines around the
    command line's one error line.

    Only in the main thread of a process whose stderr is a real file descriptor; else a no-op.
    """

    def __init__(self, source: object) -> None:
        self.source = source
        self.saved: Optional[int] = None
        self.buffer = None

    def __enter__(self) -> native_stderr_to_log:
        import sys
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            fd = sys.stderr.fileno()
            sys.stderr.flush()
            self.buffer = tempfile.TemporaryFile()
            self.saved = os.dup(fd)
            os.dup2(self.buffer.fileno(), fd)
            self.fd = fd
        except (AttributeError, OSError, ValueError):
            self._close()
        return self

    def _close(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.saved is None:
            self._close()
            return False
        try:
            os.dup2(self.saved, self.fd)
        finally:
            os.close(self.saved)
            self.saved = None
        try:
            self.buffer.seek(0)
            text = self.buffer.read(1 << 16).decode("utf-8", "replace")
        finally:
            self._close()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: In ")]
        if lines:  # a warning when the read failed; after a successful read (the library's own checks ran), debug
            level = logging.DEBUG if exc_type is None else logging.WARNING
            logger.log(level, "Reading '%s': %s", self.source, " ".join(" ".join(lines).split())[:500])
        return False


def describe_size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes on disk"
    except OSError:
        return "size unknown"


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
