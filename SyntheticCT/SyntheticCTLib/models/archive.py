"""Safe zip extraction (no path escaping the target, no links, bounded size) and zipping a folder."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Collection, Optional, Union

from SyntheticCTLib.kernel.io import atomic_output
from SyntheticCTLib.models.errors import ModelPackageError, UnsafeArchiveError

logger = logging.getLogger(__name__)

MAX_MEMBERS = 1000
MAX_TOTAL_BYTES = 4 * 1024**3
MAX_RATIO = 1000  # uncompressed / compressed, per member: a zip bomb guard


def _member_parts(info: zipfile.ZipInfo, archive: Path) -> tuple:
    name = info.filename
    if "\x00" in name:
        raise UnsafeArchiveError(f"'{archive}': member name {name!r} contains a NUL byte; refusing to extract.")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"'{archive}': member '{name}' has an absolute path; refusing to extract.")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"'{archive}': member '{name}' escapes the target folder ('..'); refusing to extract.")
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"'{archive}': member '{name}' is a symbolic link; refusing to extract.")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnsafeArchiveError(f"'{archive}': member '{name}' is not a regular file or folder; refusing to extract.")
    return tuple(p for p in parts if p not in ("", "."))


def safe_extract_zip(
    archive: Union[str, Path],
    target: Union[str, Path],
    *,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    members: Optional[Collection[str]] = None,
) -> Path:
    """Extract ``archive`` into the new folder ``target``, all or nothing.

    Every member is checked before anything is written: absolute paths, ``..`` components, symbolic
    links and special files are refused (:class:`UnsafeArchiveError`), and so are archives with more
    than :data:`MAX_MEMBERS` members, a name listed twice, a name that is both a file and a folder,
    and archives whose total or per-member expansion is absurd. ``members`` (names as stored) limits
    the extraction to those files. Extraction goes to a temporary folder beside ``target``, renamed
    onto ``target`` at the end; on any error nothing is left behind.

    Long because every safety check (names, links, sizes, members) sits beside the extraction it guards.
    """
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise ModelPackageError(f"Cannot extract '{archive}': '{target}' already exists.")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelPackageError(f"'{archive}' is not a readable zip archive: {e}") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise UnsafeArchiveError(f"'{archive}' has {len(infos)} members (more than {MAX_MEMBERS}); refusing.")
        plan = []
        total = 0
        wanted = None if members is None else {m.rstrip("/") for m in members}
        seen = {}
        for info in infos:
            parts = _member_parts(info, archive)
            if not parts:
                continue
            key = "/".join(parts)
            if key in seen:
                raise UnsafeArchiveError(f"'{archive}': member '{info.filename}' is in the archive twice; refusing it.")
            seen[key] = info.is_dir()
            if wanted is not None and key not in wanted:
                continue
            total += info.file_size
            if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > 1 << 20:
                raise UnsafeArchiveError(
                    f"'{archive}': member '{info.filename}' expands {info.file_size} bytes from "
                    f"{info.compress_size}; refusing a likely zip bomb."
                )
            plan.append((info, parts))
        for key in seen:
            parts = key.split("/")
            for i in range(1, len(parts)):
                if seen.get("/".join(parts[:i])) is False:
                    raise UnsafeArchiveError(
                        f"'{archive}': '{'/'.join(parts[:i])}' is both a file and a folder in the archive; refusing it."
                    )
        if wanted is not None:
            absent = sorted(wanted - set(seen))
            if absent:
                raise ModelPackageError(f"'{archive}' lacks {', '.join(repr(a) for a in absent)}.")
        if total > max_total_bytes:
            raise UnsafeArchiveError(f"'{archive}' would expand to {total} bytes (limit {max_total_bytes}); refusing.")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extracting", dir=target.parent))
        except OSError as e:
            raise ModelPackageError(f"Cannot extract '{archive}' into '{target.parent}': {e.strerror or e}.") from e
        try:
            root = tmp.resolve()
            for info, parts in plan:
                out = tmp.joinpath(*parts)
                # Belt and braces: the resolved path must stay inside the temporary root.
                if os.path.commonpath([str(root), str(out.resolve())]) != str(root):
                    raise UnsafeArchiveError(f"'{archive}': member '{info.filename}' escapes the target folder.")
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(info) as src, open(out, "xb") as dst:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        written += len(chunk)
                        if written > info.file_size:
                            raise UnsafeArchiveError(f"'{archive}': member '{info.filename}' is larger than declared.")
                        dst.write(chunk)
            os.replace(tmp, target)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelPackageError(f"'{archive}' is a corrupt zip archive: {e}") from e
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UnsafeArchiveError(
                f"'{archive}': members collide ({e.strerror}: '{e.filename}'); refusing it."
            ) from e
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, ModelPackageError):
                raise
            raise ModelPackageError(f"Cannot extract '{archive}' into '{target.parent}': {e.strerror or e}.") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def zip_folder(folder: Union[str, Path], archive: Union[str, Path], *, arc_root: Optional[str] = None) -> Path:
    """Zip the files of ``folder`` (recursively, no links) into ``archive``, written atomically.

    Members are stored under ``arc_root/`` when given, else at the archive root.
    """

    folder, archive = Path(folder), Path(archive)
    with atomic_output(archive) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_symlink() or not path.is_file():
                    continue
                rel = path.relative_to(folder).as_posix()
                zf.write(path, f"{arc_root}/{rel}" if arc_root else rel)
    return archive
