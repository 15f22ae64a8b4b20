"""The model catalog: the shipped catalog, the user's additions and institution catalogs, merged.

Sources, in order of precedence (a name found in an earlier source hides the same name later):

1. models the user added (``user_catalog.json`` in the cache): from a URL, a local ``.zip`` or a folder;
2. the catalog shipped in ``Resources/catalog.json``, with the bundled default model (no network);
3. catalogs the user added by URL (an institution hosting its own models), cached for offline use. They
   may only add names: an entry named like a shipped or user-added model is ignored with a warning, so
   that a catalog can never replace the model that runs. A remote catalog needs ``https`` (plain ``http``
   for a loopback address or when explicitly allowed) and may name only http(s) URLs.

A catalog model's package must carry the entry's name and version in its ``model.json``.

A catalog is JSON: a list of entries, or ``{"models": [...]}``. An entry has ``name``, ``version``,
either ``url`` (+ ``sha256`` of the ``.zip``, and optionally ``size`` in bytes) or ``path`` (bundled, relative
to ``Resources``; only in the shipped catalog), and ``description``, ``anatomy``, ``sequence``, ``inputs``.
Downloaded models are extracted, verified, into ``<cache>/models/<name>/<version>/``.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from SyntheticCTLib.kernel.io import sweep_stale_partials
from SyntheticCTLib.kernel.jsonio import write_json
from SyntheticCTLib.kernel.progress import CancelToken, ProgressCallback, bytes_progress, no_progress, with_cancel
from SyntheticCTLib.kernel.types import PathLike
from SyntheticCTLib.models import cache as _cache
from SyntheticCTLib.models.download import DEFAULT_RETRIES, DEFAULT_TIMEOUT, check_url, download
from SyntheticCTLib.models.errors import (
    BundledModelMissingError,
    CatalogError,
    ChecksumError,
    ModelNotFoundError,
    ModelPackageError,
)
from SyntheticCTLib.models.hashing import normalize_sha256, sha256_file
from SyntheticCTLib.models.package import (
    MODEL_CARD,
    ModelPackage,
    extract_package_zip,
    input_label,
    load_model_package,
    read_card,
)

logger = logging.getLogger(__name__)


DEFAULT_ALIAS = "default"
DEFAULT_MODEL = "phantom-spine-megre"
CATALOG_SCHEMA_VERSION = 1
ORIGIN_FILE = ".origin.json"
SOURCE_BUNDLED = "bundled"
SOURCE_USER = "user"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_ENTRY_FIELDS = (
    "name",
    "version",
    "url",
    "path",
    "sha256",
    "size",
    "description",
    "anatomy",
    "sequence",
    "inputs",
    "license",
)


def resources_dir() -> Path:
    """``SyntheticCTLib/Resources`` of the installed package."""
    return Path(__file__).resolve().parents[1] / "Resources"


def shipped_catalog_path() -> Path:
    return resources_dir() / "catalog.json"


@dataclass
class CatalogEntry:
    """One model in a catalog, with where it comes from (``source``) and, once listed, its ``status``."""

    name: str
    version: str
    url: Optional[str] = None
    path: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None
    description: str = ""
    anatomy: str = ""
    sequence: str = ""
    inputs: Any = None
    license: str = ""
    source: str = SOURCE_BUNDLED
    extra: Dict[str, Any] = field(default_factory=dict)
    status: str = ""
    local_path: Optional[str] = None

    @property
    def kind(self) -> str:
        """``"bundled"`` (shipped, no network), ``"remote"`` (a URL) or ``"local"`` (user-added file/folder)."""
        if self.url:
            return "remote"
        return SOURCE_BUNDLED if self.source == SOURCE_BUNDLED else "local"

    def to_dict(self, *, with_status: bool = False) -> Dict[str, Any]:
        data = {k: getattr(self, k) for k in _ENTRY_FIELDS if getattr(self, k) not in (None, "")}
        data.update(self.extra)
        data["source"] = self.source
        if with_status:
            data["status"] = self.status
            data["local_path"] = self.local_path
        return data


def _check_name(value: Any, what: str, source: str) -> str:
    text = str(value or "")
    reserved = what == "name" and text == DEFAULT_ALIAS
    if not _NAME.match(text) or text in (".", "..") or reserved:
        extra = " and not 'default'" if what == "name" else ""
        raise CatalogError(
            f"Catalog '{source}': {what} {value!r} is not usable; use letters, digits, '.', '_', "
            f"'+', '-', not starting with a symbol{extra}."
        )
    return text


def _is_remote(url: Optional[str]) -> bool:

    return bool(url) and urllib.parse.urlsplit(str(url)).scheme.lower() in ("http", "https")


def parse_entry(data: Any, source: str, *, base_url: Optional[str] = None, allow_path: bool = False) -> CatalogEntry:
    """Validate one catalog entry; relative URLs are resolved against ``base_url``.

    An entry of a remote catalog (``base_url`` over http or https) may name only http(s) URLs: a
    ``file:`` URL there would make the catalog's author read the user's local files."""

    if not isinstance(data, dict):
        raise CatalogError(f"Catalog '{source}': every entry must be an object (got {type(data).__name__}).")
    name = _check_name(data.get("name"), "name", source)
    version = _check_name(data.get("version"), "version", source)
    url, path = data.get("url"), data.get("path")
    if bool(url) == bool(path):
        raise CatalogError(f"Catalog '{source}': model '{name}' needs exactly one of 'url' or 'path'.")
    sha = data.get("sha256")
    if url:
        if base_url:
            url = urllib.parse.urljoin(base_url, str(url))
        try:
            check_url(url)
        except CatalogError:
            raise
        except Exception as e:
            raise CatalogError(f"Catalog '{source}': model '{name}': {e}") from None
        if _is_remote(base_url) and not _is_remote(url):
            raise CatalogError(
                f"Catalog '{source}': model '{name}' has url '{url}'; a remote catalog may name only http(s) URLs."
            )
        if not sha:
            raise CatalogError(
                f"Catalog '{source}': model '{name}' has a url but no sha256; a download must be verifiable."
            )
    if path and not allow_path:
        raise CatalogError(
            f"Catalog '{source}': model '{name}' names a local path; only the shipped catalog and "
            "the user's own additions may."
        )
    if sha:
        try:
            sha = normalize_sha256(sha, f"sha256 of model '{name}'")
        except ModelPackageError as e:
            raise CatalogError(f"Catalog '{source}': {e}") from None
    size = data.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise CatalogError(f"Catalog '{source}': model '{name}' has size {size!r}; give bytes as an integer.")
    extra = {k: v for k, v in data.items() if k not in _ENTRY_FIELDS and k not in ("source", "status", "local_path")}
    return CatalogEntry(
        name=name,
        version=version,
        url=url or None,
        path=path or None,
        sha256=sha or None,
        size=size,
        description=str(data.get("description", "")),
        anatomy=str(data.get("anatomy", "")),
        sequence=str(data.get("sequence", "")),
        inputs=data.get("inputs"),
        license=str(data.get("license", "")),
        source=source,
        extra=extra,
    )


def parse_catalog(
    data: Any, source: str, *, base_url: Optional[str] = None, allow_path: bool = False
) -> List[CatalogEntry]:
    """Validate a catalog (a list of entries, or ``{"models": [...]}``); tag every entry with ``source``."""
    if isinstance(data, dict):
        version = data.get("schema_version", 1)
        if isinstance(version, int) and version > CATALOG_SCHEMA_VERSION:
            raise CatalogError(
                f"Catalog '{source}' uses schema_version {version}, newer than this version of "
                f"SyntheticCT understands ({CATALOG_SCHEMA_VERSION}); update SyntheticCT."
            )
        data = data.get("models")
    if not isinstance(data, list):
        raise CatalogError(f"Catalog '{source}' must be a JSON list of models or an object with a 'models' list.")
    entries = []
    for item in data:
        entries.append(parse_entry(item, source, base_url=base_url, allow_path=allow_path))
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CatalogError(f"Catalog '{source}' lists model(s) more than once: {', '.join(duplicates)}.")
    return entries


MAX_CATALOG_BYTES = 16 * 1024**2


def _read_json(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > MAX_CATALOG_BYTES:
            raise CatalogError(f"The {what} '{path}' is larger than {MAX_CATALOG_BYTES} bytes; refusing it.")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"The {what} '{path}' does not exist.") from None
    except RecursionError:
        raise CatalogError(f"The {what} '{path}' is not usable JSON: it is nested too deeply.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if isinstance(e, CatalogError):
            raise
        raise CatalogError(f"The {what} '{path}' is not readable JSON: {e}") from e


def load_shipped_catalog() -> List[CatalogEntry]:
    path = shipped_catalog_path()
    if not path.is_file():
        logger.warning("No shipped model catalog at '%s'.", path)
        return []
    return parse_catalog(_read_json(path, "shipped catalog"), SOURCE_BUNDLED, allow_path=True)


def default_model_name() -> str:
    """The model that ``"default"`` names: the shipped catalog's ``"default"``, else :data:`DEFAULT_MODEL`."""
    path = shipped_catalog_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return DEFAULT_MODEL
    name = data.get("default") if isinstance(data, dict) else None
    return str(name) if isinstance(name, str) and _NAME.match(name) else DEFAULT_MODEL


def _load_user(root: Path) -> Dict[str, Any]:
    path = _cache.user_catalog_path(root)
    if not path.is_file():
        return {"schema_version": CATALOG_SCHEMA_VERSION, "models": [], "catalogs": []}
    data = _read_json(path, "user catalog")
    if not isinstance(data, dict):
        raise CatalogError(f"The user catalog '{path}' must hold a JSON object.")
    data.setdefault("models", [])
    data.setdefault("catalogs", [])
    return data


def _save_user(root: Path, data: Dict[str, Any]) -> None:
    data["schema_version"] = CATALOG_SCHEMA_VERSION
    write_json(_cache.user_catalog_path(root), data)


def _catalog_file(root: Path, url: str) -> Path:
    return _cache.catalogs_dir(root) / (hashlib.sha256(url.encode("utf-8")).hexdigest()[:16] + ".json")


def _all_entries(root: Path) -> List[CatalogEntry]:
    """Every entry of every source, in precedence order (duplicates kept; first wins).

    The user's own models and the shipped ones come first; added catalogs may only add names."""
    user = _load_user(root)
    entries = parse_catalog(user["models"], SOURCE_USER, allow_path=True)
    entries += load_shipped_catalog()
    for item in user["catalogs"]:
        url = item.get("url", "")
        path = root / item.get("file", "")
        try:
            entries += parse_catalog(_read_json(path, f"cached copy of catalog {url}"), url, base_url=url)
        except CatalogError as e:
            logger.warning("Skipping catalog '%s': %s", url, e)
    return entries


def _catalog(root: Path) -> Dict[str, CatalogEntry]:
    merged: Dict[str, CatalogEntry] = {}
    reserved = {default_model_name()}
    for entry in _all_entries(root):
        if entry.name in merged or (entry.source not in (SOURCE_USER, SOURCE_BUNDLED) and entry.name in reserved):
            if entry.source in (SOURCE_USER, SOURCE_BUNDLED):
                logger.debug("Model '%s' from '%s' is hidden by the user's own.", entry.name, entry.source)
            else:
                first = merged.get(entry.name)
                logger.warning(
                    "Catalog '%s' lists a model '%s' %s, a name already taken by %s; ignored (a catalog may add "
                    "models, never replace one).",
                    entry.source,
                    entry.name,
                    entry.version,
                    f"the {first.source} model" if first is not None else "the default model",
                )
            continue
        merged[entry.name] = entry
    return merged


def installed_dir(root: Path, entry: CatalogEntry) -> Path:
    """Where ``entry`` lives on disk: the bundled folder, or ``<cache>/models/<name>/<version>``."""
    if entry.kind == SOURCE_BUNDLED:
        return resources_dir() / str(entry.path)
    if entry.path:
        return root / entry.path
    return _cache.models_dir(root) / entry.name / entry.version


def _origin(folder: Path) -> Dict[str, Any]:
    try:
        data = json.loads((folder / ORIGIN_FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _status(root: Path, entry: CatalogEntry) -> Tuple[str, Path]:
    folder = installed_dir(root, entry)
    present = (folder / MODEL_CARD).is_file()
    if entry.kind == SOURCE_BUNDLED:
        return ("bundled" if present else "missing"), folder
    if entry.kind == "local":
        return ("cached" if present else "missing"), folder
    if not present:
        return "available", folder
    return ("cached" if _origin(folder).get("sha256") == entry.sha256 else "outdated"), folder


def list_models(cache_dir: Optional[PathLike] = None) -> List[CatalogEntry]:
    """Every model of the merged catalog, with ``status`` set.

    Status: ``bundled`` (shipped and present), ``missing`` (shipped or user-added, files absent),
    ``cached`` (downloaded or added, ready offline), ``available`` (downloadable), ``outdated`` (the
    cached copy is not the catalog's current archive).
    """
    root = _cache.cache_dir(cache_dir)
    entries = list(_catalog(root).values())
    for entry in entries:
        entry.status, folder = _status(root, entry)
        entry.local_path = str(folder)
    return entries


def find_entry(name: str, cache_dir: Optional[PathLike] = None) -> CatalogEntry:
    """The catalog entry called ``name`` (``"default"`` is the bundled default model)."""
    root = _cache.cache_dir(cache_dir)
    catalog = _catalog(root)
    key = default_model_name() if name == DEFAULT_ALIAS else name
    entry = catalog.get(key)
    if entry is None:
        known = ", ".join(sorted(catalog)) or "none"
        raise ModelNotFoundError(
            f"No model named '{name}' in the catalog (known: {known}), and no file or folder "
            "of that name. Add one with: syntheticct models add SOURCE."
        )
    entry.status, folder = _status(root, entry)
    entry.local_path = str(folder)
    return entry


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.lower().endswith(".zip") or text.startswith(".") or text.startswith("~")


def _entry_or_path(name_or_path: PathLike, root: Path) -> Tuple[Optional[CatalogEntry], Path]:
    """``(entry, path)``: a catalog entry, or None and an existing package path.

    A ``Path``, or text with a path separator or a ``.zip`` suffix, is a path. A bare word is a catalog
    name first, and a path only when no catalog model has that name.
    """
    text = os.fspath(name_or_path)
    candidate = Path(text).expanduser()
    if isinstance(name_or_path, Path) or _looks_like_path(text):
        if not candidate.exists():
            raise ModelPackageError(f"No model package at '{text}' (neither a folder nor a .zip exists there).")
        return None, candidate
    try:
        return find_entry(text, cache_dir=root), candidate
    except ModelNotFoundError:
        if candidate.exists():
            return None, candidate
        raise


def _downloads(root: Path) -> Path:
    """The cache's downloads folder, created, writable, and swept of what killed runs left there."""

    downloads = _cache.ensure_writable_dir(_cache.downloads_dir(root))
    sweep_stale_partials(downloads, everything=True)
    return downloads


def _install_archive(
    root: Path, archive: Path, name: str, version: str, origin: Dict[str, Any], *, replace: bool = False
) -> Path:
    """Extract ``archive`` safely, verify the package, record its origin, rename it into the cache."""

    target = _cache.models_dir(root) / name / version
    _cache.ensure_writable_dir(target.parent)
    sweep_stale_partials(target.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".installing", dir=target.parent))
    try:
        package_root = extract_package_zip(archive, work / "extracted")
        package = load_model_package(package_root, verify=True)
        if (package.name, package.version) != (name, version):
            raise CatalogError(
                f"The archive of catalog model '{name}' {version} holds model '{package.name}' "
                f"{package.version} (its model.json); refusing a package that is not what the catalog names."
            )
        (package_root / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n", encoding="utf-8")
        _move_into_place(package_root, target, replace=replace, work=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _move_into_place(folder: Path, target: Path, *, replace: bool, work: Path) -> None:
    if target.exists():
        if not replace:
            raise CatalogError(f"'{target}' already exists in the cache; remove the model first.")
        os.replace(target, work / "previous")
    os.replace(folder, target)


def _copy_folder(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_symlink():
            raise ModelPackageError(f"Model folder '{src}' holds a symbolic link ('{rel}'); refusing to copy it.")
        if path.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        elif path.is_file() and path.name != ORIGIN_FILE:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst / rel)


def _fetch(
    root: Path,
    entry: CatalogEntry,
    report: ProgressCallback,
    cancel: Optional[CancelToken],
    timeout: float,
    retries: int,
) -> Path:
    downloads = _downloads(root)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".fetch", dir=downloads))
    try:
        archive = download(
            str(entry.url),
            work / "package.zip",
            sha256=entry.sha256,
            expected_size=entry.size,
            progress=bytes_progress(report, entry.name),
            cancel=cancel,
            timeout=timeout,
            retries=retries,
        )
        origin = {
            "url": entry.url,
            "sha256": entry.sha256,
            "size": archive.stat().st_size,
            "catalog": entry.source,
            "fetched": _now(),
        }
        return _install_archive(root, archive, entry.name, entry.version, origin, replace=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def resolve_model(
    name_or_path: PathLike,
    *,
    download: bool = True,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    cache_dir: Optional[PathLike] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
) -> ModelPackage:
    """A loaded, verified :class:`ModelPackage` from a catalog name, ``"default"``, a folder or a ``.zip``.

    A catalog model already in the cache with the catalog's SHA-256 is used as is (no network); otherwise
    it is downloaded (if ``download``), verified and extracted into the cache. ``progress`` is a
    library progress callback (stage ``"download"``).

    Raises
    ------
    ModelNotFoundError
        Not a path and not in the catalog; :class:`BundledModelMissingError` when the bundled model's
        files are not installed; also when the model is not cached and ``download`` is False.
    ModelPackageError, DownloadError, ChecksumError, Cancelled
        As :func:`load_model_package` and :func:`~SyntheticCTLib.models.download.download`.
    """
    report = with_cancel(progress or no_progress, cancel)
    root = _cache.cache_dir(cache_dir)
    entry, candidate = _entry_or_path(name_or_path, root)
    if entry is None:
        package = load_model_package(candidate)
        package.catalog_source = f"path {candidate}"
        return package
    folder = Path(str(entry.local_path))
    if entry.status == "missing":
        if entry.kind == SOURCE_BUNDLED:
            raise BundledModelMissingError(
                f"The bundled model '{entry.name}' is missing: no {MODEL_CARD} in '{folder}'. Reinstall SyntheticCT, "
                "or pass another model (a name from `syntheticct models list`, a folder or a .zip)."
            )
        raise ModelNotFoundError(
            f"Model '{entry.name}' was added from '{entry.extra.get('origin', '?')}' but its "
            f"cached copy '{folder}' is gone; add it again."
        )
    if entry.status in ("bundled", "cached"):
        return _tagged(load_model_package(folder), entry)
    if not download:
        raise ModelNotFoundError(
            f"Model '{entry.name}' is not in the cache ('{root}') and downloading is off; "
            f"run: syntheticct models fetch {entry.name}"
        )
    logger.info("Downloading model '%s' %s from %s", entry.name, entry.version, entry.url)
    _fetch(root, entry, report, cancel, timeout, retries)
    return _tagged(load_model_package(folder), entry)


def _tagged(package: ModelPackage, entry: CatalogEntry) -> ModelPackage:
    """Record on ``package`` which catalog entry it came from (printed by the command line)."""
    where = {SOURCE_BUNDLED: "the shipped catalog", SOURCE_USER: "the user's own models"}.get(
        entry.source, f"catalog {entry.source}"
    )
    package.catalog_source = f"{where} ({entry.kind}{', ' + str(entry.url) if entry.url else ''})"
    return package


def fetch_model(name: str, **kwargs) -> ModelPackage:
    """Download ``name`` into the cache if needed; same arguments as :func:`resolve_model`."""
    return resolve_model(name, download=True, **kwargs)


def _card_summary(card: Dict[str, Any]) -> Dict[str, Any]:

    inputs = card.get("inputs", [])
    sequences = sorted({str(i.get("sequence")) for i in inputs if i.get("sequence")})
    return {
        "description": str(card.get("description", "")),
        "anatomy": str(card.get("anatomy", "")),
        "sequence": ", ".join(sequences),
        "inputs": [input_label(e, i) for i, e in enumerate(inputs)],
        "license": str(card.get("license", "")),
    }


def _check_new_name(root: Path, name: str) -> None:
    existing = _catalog(root).get(name)
    if existing is not None:
        raise CatalogError(
            f"A model named '{name}' is already in the catalog (from {existing.source}); remove it "
            "first or choose another name (--name)."
        )


def add_model(
    source: PathLike,
    *,
    sha256: Optional[str] = None,
    name: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
) -> CatalogEntry:
    """Add a model to the user's catalog: from a URL (``sha256`` required), a local ``.zip`` or a folder.

    The package is verified and copied into the cache before the entry is recorded; the entry's name is
    ``name`` or the package's own. Returns the new entry.

    Long because each source (URL, zip, folder) is checked in full before anything enters the cache, in one place.
    """
    report = with_cancel(progress or no_progress, cancel)
    root = _cache.cache_dir(cache_dir)
    text = os.fspath(source)
    if text.lower().startswith("file:"):  # a local file, checked as one (a zip or a folder, nothing else)
        import urllib.parse
        import urllib.request

        text = urllib.request.url2pathname(urllib.parse.urlsplit(text).path)
    is_url = "://" in text
    if name is not None:
        name = _check_name(name, "name", "--name")
    if sha256 is not None:
        sha256 = normalize_sha256(sha256, "--sha256")
    downloads = _downloads(root)
    work = Path(tempfile.mkdtemp(prefix=".add.", suffix=".work", dir=downloads))
    try:
        if is_url:
            check_url(text)
            if sha256 is None:
                raise CatalogError(
                    f"Adding '{text}' needs its SHA-256 (--sha256 HEX), so that the download can be "
                    "verified; ask the model's provider for it."
                )
            archive = download(
                text,
                work / "package.zip",
                sha256=sha256,
                progress=bytes_progress(report, "model"),
                cancel=cancel,
                timeout=timeout,
                retries=retries,
            )
            digest, origin_text = sha256, text
        else:
            path = Path(text).expanduser()
            if not path.exists():
                raise ModelPackageError(f"No model package at '{path}'.")
            origin_text = str(path.resolve())
            if path.is_dir():
                package = load_model_package(path, verify=True)
                archive = None
                digest = sha256_file(package.root / MODEL_CARD)
            else:
                import zipfile

                if not zipfile.is_zipfile(path):
                    raise ModelPackageError(f"'{path}' is neither a model folder nor a .zip archive of one.")
                archive = path
                digest = sha256_file(path)
                if sha256 is not None and digest != sha256:
                    raise ChecksumError(f"SHA-256 mismatch for '{path}': expected {sha256}, got {digest}.")
        if archive is not None:
            package_root = extract_package_zip(archive, work / "extracted")
        else:
            package_root = work / "copy"
            _copy_folder(package.root, package_root)
        load_model_package(package_root, verify=True)
        card = read_card(package_root)
        model_name = name or _check_name(card["name"], "name", origin_text)
        version = _check_name(card["version"], "version", origin_text)
        _check_new_name(root, model_name)
        archive_size = archive.stat().st_size if archive is not None else None
        rel = f"models/{model_name}/{version}"
        origin = {"origin": origin_text, "sha256": digest, "added": _now()}
        if is_url:
            origin["url"] = text
        (package_root / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n", encoding="utf-8")
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _move_into_place(package_root, target, replace=True, work=work)
        record: Dict[str, Any] = {
            "name": model_name,
            "version": version,
            "sha256": digest,
            **_card_summary(card),
            "source": SOURCE_USER,
            "added": origin["added"],
        }
        if is_url:
            record["url"] = text
            record["size"] = archive_size
        else:
            record["path"] = rel
            record["origin"] = origin_text
        user = _load_user(root)
        user["models"] = [m for m in user["models"] if m.get("name") != model_name] + [record]
        _save_user(root, user)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("Added model '%s' %s to the catalog in '%s'.", model_name, version, root)
    return find_entry(model_name, cache_dir=root)


def add_catalog(
    url: str,
    *,
    sha256: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    allow_http: bool = False,
) -> List[CatalogEntry]:
    """Add (or refresh) a catalog hosted at ``url``; its models join the merged catalog, tagged with ``url``.

    The catalog is validated (every model needs a ``url`` and ``sha256``; relative URLs resolve against
    the catalog's; a remote catalog names only http(s) URLs), then cached so that it serves offline. Its
    models add names; they never replace a shipped or user-added model. A remote catalog needs ``https``
    (anyone on the network could rewrite a plain ``http`` one): ``http`` is accepted for a loopback address,
    or with ``allow_http``. Returns its entries.
    """
    report = with_cancel(progress or no_progress, cancel)
    check_url(url)
    check_catalog_url(url, allow_http=allow_http)
    root = _cache.cache_dir(cache_dir)
    downloads = _downloads(root)
    work = Path(tempfile.mkdtemp(prefix=".catalog.", suffix=".work", dir=downloads))
    try:
        fetched = download(
            url,
            work / "catalog.json",
            sha256=sha256,
            max_bytes=MAX_CATALOG_BYTES,
            progress=bytes_progress(report, "catalog"),
            cancel=cancel,
            timeout=timeout,
            retries=retries,
        )
        entries = parse_catalog(_read_json(fetched, f"catalog downloaded from {url}"), url, base_url=url)
        target = _catalog_file(root, url)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    user = _load_user(root)
    user["catalogs"] = [c for c in user["catalogs"] if c.get("url") != url]
    user["catalogs"].append(
        {"url": url, "file": target.relative_to(root).as_posix(), "added": _now(), "models": len(entries)}
    )
    _save_user(root, user)
    logger.info("Added catalog '%s' with %d model(s).", url, len(entries))
    return entries


def check_catalog_url(url: str, *, allow_http: bool = False) -> str:
    """Refuse a plain ``http`` catalog URL unless its host is a loopback address or ``allow_http``."""

    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "http" or allow_http:
        return url
    host = (parts.hostname or "").lower()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise CatalogError(
            f"Refusing the catalog '{url}': plain http can be altered on the way; use https "
            "(or pass --allow-http if you trust the network)."
        )
    return url


def remove_model(name: str, *, cache_dir: Optional[PathLike] = None) -> List[Path]:
    """Remove a model's cached files; a user-added model also leaves the catalog. Returns removed paths.

    ``name`` may also be the URL of an added catalog, which is then dropped with its cached copy.
    Bundled models cannot be removed.
    """
    root = _cache.cache_dir(cache_dir)
    user = _load_user(root)
    removed: List[Path] = []
    catalogs = [c for c in user["catalogs"] if c.get("url") == name]
    if catalogs:
        for c in catalogs:
            path = root / c.get("file", "")
            if path.is_file():
                path.unlink()
                removed.append(path)
        user["catalogs"] = [c for c in user["catalogs"] if c.get("url") != name]
        _save_user(root, user)
        return removed
    entry = find_entry(name, cache_dir=root)
    if entry.kind == SOURCE_BUNDLED:
        raise CatalogError(f"'{entry.name}' is bundled with SyntheticCT and cannot be removed.")
    folder = installed_dir(root, entry)
    if folder.exists():
        _remove_tree(root, folder)
        removed.append(folder)
    if entry.source == SOURCE_USER:
        user["models"] = [m for m in user["models"] if m.get("name") != entry.name]
        _save_user(root, user)
    elif not removed:
        raise CatalogError(f"Model '{entry.name}' (from {entry.source}) is not in the cache; nothing to remove.")
    return removed


def _remove_tree(root: Path, folder: Path) -> None:
    """Delete ``folder`` (inside the cache only), then its empty parent."""
    folder = folder.resolve()
    models = _cache.models_dir(root).resolve()
    if models not in folder.parents:
        raise CatalogError(f"Refusing to delete '{folder}': it is not inside the model cache '{models}'.")
    trash = Path(tempfile.mkdtemp(prefix=".removing.", dir=models))
    os.replace(folder, trash / "x")  # atomic disappearance, then delete
    shutil.rmtree(trash, ignore_errors=True)
    parent = folder.parent
    if parent != models and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def verify_model(name_or_path: PathLike, *, cache_dir: Optional[PathLike] = None) -> Dict[str, Any]:
    """Re-hash every weight file of an installed model (or a package path) against its ``model.json``.

    For a downloaded model, also check that the cached copy came from the catalog's current archive.
    Returns ``{"name", "version", "path", "files": [{"file", "sha256", "bytes"}]}``; a mismatch raises
    :class:`ChecksumError` naming the file.
    """
    root = _cache.cache_dir(cache_dir)
    entry, candidate = _entry_or_path(name_or_path, root)
    if entry is None:
        package = load_model_package(candidate, verify=True)
    else:
        folder = Path(str(entry.local_path))
        if entry.status == "available":
            raise ModelNotFoundError(f"Model '{entry.name}' is not in the cache; fetch it first.")
        if entry.status == "missing":
            raise ModelNotFoundError(f"Model '{entry.name}' has no files at '{folder}'.")
        if entry.status == "outdated":
            raise ChecksumError(
                f"The cached copy of '{entry.name}' in '{folder}' came from an archive with SHA-256 "
                f"{_origin(folder).get('sha256')}, but the catalog now lists {entry.sha256}; fetch "
                "it again (remove, then fetch)."
            )
        package = load_model_package(folder, verify=True)
    files = [
        {"file": w["file"], "sha256": w["sha256"], "bytes": (package.root / w["file"]).stat().st_size}
        for w in package.card["weights"]
    ]
    return {"name": package.name, "version": package.version, "path": str(package.root), "files": files}


def clear_cache(cache_dir: Optional[PathLike] = None, *, everything: bool = False) -> int:
    """Delete downloaded models and leftover temporary files; return the bytes freed.

    Models the user added from local files and the added catalogs are kept unless ``everything``, which
    empties the whole cache folder (user catalog included).
    """
    root = _cache.cache_dir(cache_dir)
    _cache.require_own_cache(root, "empty" if everything else "clear")
    keep = set()
    if not everything:
        for m in _load_user(root)["models"]:
            if m.get("path"):
                keep.add((root / m["path"]).resolve())
    freed = 0
    targets: List[Path] = []
    if everything:  # only what a cache of ours holds: never another file someone put there
        from SyntheticCTLib.kernel.io import is_temporary_name

        targets = [
            p
            for p in root.iterdir()
            if p.name != _cache.MARKER and (p.name in _cache.OWN_NAMES or is_temporary_name(p.name))
        ]
    else:
        targets.append(_cache.downloads_dir(root))
        models = _cache.models_dir(root)
        if models.is_dir():
            for name_dir in models.iterdir():
                if not name_dir.is_dir():
                    targets.append(name_dir)
                    continue
                for version_dir in name_dir.iterdir():
                    if version_dir.resolve() not in keep:
                        targets.append(version_dir)
    for target in targets:
        if not target.exists():
            continue
        if target.is_dir() and not target.is_symlink():
            freed += sum(p.stat().st_size for p in target.rglob("*") if p.is_file() and not p.is_symlink())
            shutil.rmtree(target)
        else:
            freed += target.lstat().st_size
            target.unlink()
    models = _cache.models_dir(root)
    if models.is_dir():
        for name_dir in models.iterdir():
            if name_dir.is_dir() and not any(name_dir.iterdir()):
                name_dir.rmdir()
    return freed
