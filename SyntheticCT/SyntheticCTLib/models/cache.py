"""The per-user cache folder: downloaded models, cached catalogs and the user's own catalog.

Location, first match wins: an explicit argument (Slicer passes its own), ``$SYNTHETICCT_HOME``, then
the platform's user cache folder: ``%LOCALAPPDATA%\\SyntheticCT\\Cache`` on Windows,
``~/Library/Caches/SyntheticCT`` on macOS, ``$XDG_CACHE_HOME/syntheticct`` (default ``~/.cache``)
elsewhere. It is never inside the installed package.

Layout::

    user_catalog.json         models and catalogs the user added
    catalogs/<id>.json        copies of added remote catalogs (serve offline)
    models/<name>/<version>/  extracted, verified model packages (+ .origin.json: where it came from)
    downloads/                temporary files of downloads in progress (removed on failure)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.io import is_temporary_name
from SyntheticCTLib.kernel.types import PathLike

ENV_VAR = "SYNTHETICCT_HOME"
APP_NAME = "SyntheticCT"


def platform_cache_dir(platform: Optional[str] = None, env: Optional[dict] = None, home: Optional[Path] = None) -> Path:
    """The platform's per-user cache folder for SyntheticCT (``platform`` as in ``sys.platform``)."""
    platform = platform or sys.platform
    env = os.environ if env is None else env
    home = Path(home) if home is not None else Path.home()
    if platform.startswith("win"):
        base = env.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(base) / APP_NAME / "Cache"
    if platform == "darwin":
        return home / "Library" / "Caches" / APP_NAME
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".cache"
    return base / APP_NAME.lower()


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]


def cache_dir(override: Optional[PathLike] = None, *, create: bool = True) -> Path:
    """The cache folder: ``override``, else ``$SYNTHETICCT_HOME``, else :func:`platform_cache_dir`.

    Raises :class:`InvalidParameterError` for a folder inside the installed package.
    """
    if override is not None and str(override) != "":
        path = Path(override).expanduser()
    elif os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR]).expanduser()
    else:
        path = platform_cache_dir()
    path = path.absolute()
    package = _package_dir()
    resolved = path.resolve()
    if resolved == package or package in resolved.parents:
        raise InvalidParameterError(
            f"The model cache '{path}' is inside the installed SyntheticCTLib package ('{package}'); choose a "
            f"per-user folder (set {ENV_VAR} or pass a cache folder)."
        )
    if create:
        fresh = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidParameterError(f"Cannot create the model cache folder '{path}': {e.strerror or e}.") from e
        if fresh or _is_empty(path):
            _write_marker(path)
    return path


MARKER = ".syntheticct-cache"
"""The file that marks a folder as a SyntheticCT model cache (written when the cache is created)."""
OWN_NAMES = ("user_catalog.json", "catalogs", "models", "downloads", MARKER)
"""Everything a cache of ours holds at its top level."""


def _is_empty(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def _write_marker(path: Path) -> None:
    try:
        (path / MARKER).write_text(
            "This folder is a SyntheticCT model cache; `syntheticct models clear` may empty it.\n", encoding="utf-8"
        )
    except OSError:  # a read-only folder: the marker is written by the first run that can
        pass


def foreign_entries(root: Path) -> list:
    """Top-level names in ``root`` that a cache of ours never holds (sorted)."""

    try:
        return sorted(p.name for p in root.iterdir() if p.name not in OWN_NAMES and not is_temporary_name(p.name))
    except OSError:
        return []


def require_own_cache(root: Path, action: str) -> None:
    """Refuse ``action`` (a deletion) in a folder that is not a cache of ours.

    A folder is ours when it holds the :data:`MARKER`, or (a cache made before the marker existed) holds
    nothing but names of ours; the marker is then written.
    """
    if (root / MARKER).is_file():
        return
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise InvalidParameterError(
            f"Refusing to {action} '{root}': it is not a SyntheticCT model cache (no {MARKER} file, and it holds "
            f"other files: {shown}). Point --cache-dir or {ENV_VAR} at the cache folder."
        )
    _write_marker(root)


def ensure_writable_dir(path: Path, what: str = "model cache folder") -> Path:
    """Create ``path`` (and parents); raise a one-line :class:`InvalidParameterError` when that fails."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidParameterError(f"Cannot write to the {what} '{path}': {e.strerror or e}.") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidParameterError(f"Cannot write to the {what} '{path}': permission denied.")
    return path


def models_dir(root: Path) -> Path:
    return root / "models"


def downloads_dir(root: Path) -> Path:
    return root / "downloads"


def catalogs_dir(root: Path) -> Path:
    return root / "catalogs"


def user_catalog_path(root: Path) -> Path:
    return root / "user_catalog.json"
