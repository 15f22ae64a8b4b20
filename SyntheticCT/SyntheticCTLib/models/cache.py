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
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidParameterError(f"Cannot create the model cache folder '{path}': {e.strerror or e}.") from e
    return path


def models_dir(root: Path) -> Path:
    return root / "models"


def downloads_dir(root: Path) -> Path:
    return root / "downloads"


def catalogs_dir(root: Path) -> Path:
    return root / "catalogs"


def user_catalog_path(root: Path) -> Path:
    return root / "user_catalog.json"
