"""The model catalog and cache: location rules, the shipped catalog and bundled default model, models
added from folders, zips and URLs, institution catalogs, verify/remove/clear, and `syntheticct models`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from http_fixture import sha256_hex, tiny_package_zip, write_tiny_package

from SyntheticCTLib.cli.main import main
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.progress import parse_progress_line
from SyntheticCTLib.models import catalog
from SyntheticCTLib.models.cache import ENV_VAR, cache_dir, platform_cache_dir
from SyntheticCTLib.models.cache import MARKER as CACHE_MARKER
from SyntheticCTLib.models.catalog import (
    add_catalog,
    add_model,
    clear_cache,
    list_models,
    remove_model,
    resolve_model,
    verify_model,
)
from SyntheticCTLib.models.errors import (
    BundledModelMissingError,
    CatalogError,
    ChecksumError,
    DownloadError,
    ModelNotFoundError,
    ModelPackageError,
)

PACKAGE_DIR = Path(catalog.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", ENV_VAR):
        monkeypatch.delenv(var, raising=False)


def listing(root: Path) -> list:
    """Files under ``root``, less the marker that says a folder is a cache of ours."""
    return sorted(
        p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file() and p.name != CACHE_MARKER
    )


def status_of(cache: Path) -> dict:
    return {e.name: (e.status, e.source) for e in list_models(cache)}


# -- cache location -------------------------------------------------------------------------------
def test_platform_cache_dir_rules(tmp_path):
    home = tmp_path / "home"
    assert (
        platform_cache_dir("win32", {"LOCALAPPDATA": str(tmp_path / "lad")}, home)
        == tmp_path / "lad" / "SyntheticCT" / "Cache"
    )
    assert platform_cache_dir("win32", {}, home) == home / "AppData" / "Local" / "SyntheticCT" / "Cache"
    assert (
        platform_cache_dir("darwin", {"XDG_CACHE_HOME": "/ignored"}, home)
        == home / "Library" / "Caches" / "SyntheticCT"
    )
    assert (
        platform_cache_dir("linux", {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, home) == tmp_path / "xdg" / "syntheticct"
    )
    assert platform_cache_dir("linux", {"XDG_CACHE_HOME": "relative/path"}, home) == home / ".cache" / "syntheticct"
    assert platform_cache_dir("linux", {}, home) == home / ".cache" / "syntheticct"


def test_cache_dir_precedence_and_never_inside_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert cache_dir() == tmp_path / "from-env" and (tmp_path / "from-env").is_dir()
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv(ENV_VAR)
    assert cache_dir(create=False) == platform_cache_dir()
    with pytest.raises(InvalidParameterError, match="inside the installed"):
        cache_dir(PACKAGE_DIR / "Resources" / "cache", create=False)
    assert not (PACKAGE_DIR / "Resources" / "cache").exists()


# -- shipped catalog and the bundled default ------------------------------------------------------
def test_shipped_catalog_has_the_bundled_default_needing_no_network(tmp_path):
    shipped = json.loads((PACKAGE_DIR / "Resources" / "catalog.json").read_text())
    default = shipped["default"]
    entries = {e.name: e for e in list_models(tmp_path / "cache")}
    entry = entries[default]
    assert entry.kind == "bundled" and entry.url is None and entry.source == "bundled"
    assert Path(entry.local_path) == PACKAGE_DIR / "Resources" / entry.path
    present = (Path(entry.local_path) / "model.json").is_file()
    assert entry.status == ("bundled" if present else "missing")


def test_default_model_missing_then_present(resources, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(BundledModelMissingError, match="bundled model 'phantom-spine-megre' is missing"):
        resolve_model("default", cache_dir=cache)
    write_tiny_package(resources / "models" / "phantom-spine-megre", name="phantom-spine-megre")
    package = resolve_model("default", cache_dir=cache, download=False)
    assert package.name == "phantom-spine-megre" and package.root == resources / "models" / "phantom-spine-megre"
    assert status_of(cache)["phantom-spine-megre"] == ("bundled", "bundled")
    with pytest.raises(CatalogError, match="bundled"):
        remove_model("default", cache_dir=cache)
    assert listing(cache) == []  # the bundled model needs nothing in the cache


def test_paths_and_unknown_names(tmp_path):
    folder, _ = write_tiny_package(tmp_path / "pkg")
    assert resolve_model(folder, cache_dir=tmp_path / "cache").root == folder
    with pytest.raises(ModelPackageError, match="No model package at"):
        resolve_model(str(tmp_path / "nowhere.zip"), cache_dir=tmp_path / "cache")
    with pytest.raises(ModelNotFoundError, match="No model named 'no-such-model'.*phantom-spine-megre"):
        resolve_model("no-such-model", cache_dir=tmp_path / "cache")


# -- user-added models ----------------------------------------------------------------------------
def test_add_folder_and_zip_then_verify_tamper_and_remove(resources, tmp_path):
    cache = tmp_path / "cache"
    folder, _ = write_tiny_package(tmp_path / "src" / "pkg", name="tiny-spine")
    before_src = listing(folder)
    entry = add_model(folder, cache_dir=cache)
    assert (entry.name, entry.version, entry.status, entry.source) == ("tiny-spine", "0.1.0", "cached", "user")
    assert Path(entry.local_path) == cache / "models" / "tiny-spine" / "0.1.0"
    assert listing(folder) == before_src  # the source is untouched
    user = json.loads((cache / "user_catalog.json").read_text())
    assert user["models"][0]["origin"] == str(folder.resolve())
    assert user["models"][0]["inputs"] == ["echo 1 (TE 2.2 ms)", "echo 2 (TE 4.4 ms)"]
    with pytest.raises(CatalogError, match="already in the catalog"):
        add_model(folder, cache_dir=cache)

    data = tiny_package_zip(tmp_path / "src2" / "pkg", tmp_path / "src2" / "other.zip", name="other", version="2.0")
    before = listing(cache)
    with pytest.raises(ChecksumError, match="other.zip"):
        add_model(tmp_path / "src2" / "other.zip", sha256="f" * 64, cache_dir=cache)
    assert listing(cache) == before
    entry2 = add_model(tmp_path / "src2" / "other.zip", sha256=sha256_hex(data), name="renamed", cache_dir=cache)
    assert (entry2.name, entry2.version, entry2.sha256) == ("renamed", "2.0", sha256_hex(data))
    assert resolve_model("renamed", cache_dir=cache, download=False).name == "other"  # the card keeps its name

    report = verify_model("tiny-spine", cache_dir=cache)
    assert [f["file"] for f in report["files"]] == ["model.safetensors"]
    weights = Path(entry.local_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    with pytest.raises(ChecksumError, match="model.safetensors"):
        verify_model("tiny-spine", cache_dir=cache)

    removed = remove_model("tiny-spine", cache_dir=cache)
    assert removed == [Path(entry.local_path)] and not Path(entry.local_path).exists()
    assert "tiny-spine" not in status_of(cache)
    assert not (cache / "models" / "tiny-spine").exists()
    assert status_of(cache)["renamed"] == ("cached", "user")


def test_add_from_url_needs_sha256_and_downloads_once(server, resources, tmp_path):
    data = tiny_package_zip(tmp_path / "b" / "pkg", tmp_path / "b" / "m.zip", name="web-model")
    url = server.serve("m.zip", data)
    cache = tmp_path / "cache"
    with pytest.raises(CatalogError, match="--sha256"):
        add_model(url, cache_dir=cache)
    assert server.hits("m.zip") == 0
    entry = add_model(url, sha256=sha256_hex(data), cache_dir=cache)
    assert (entry.name, entry.status, entry.url, entry.size) == ("web-model", "cached", url, len(data))
    resolve_model("web-model", cache_dir=cache)
    assert server.hits("m.zip") == 1
    assert verify_model("web-model", cache_dir=cache)["name"] == "web-model"
    assert not list((cache / "downloads").iterdir())
    remove_model("web-model", cache_dir=cache)
    assert listing(cache) == ["user_catalog.json"]


# -- institution catalogs -------------------------------------------------------------------------
def _host_catalog(server, tmp_path, name="inst-spine", extra_entries=()):
    data = tiny_package_zip(tmp_path / "h" / name, tmp_path / "h" / f"{name}.zip", name=name)
    server.serve(f"inst/{name}.zip", data)
    models = [
        {
            "name": name,
            "version": "0.1.0",
            "url": f"{name}.zip",
            "sha256": sha256_hex(data),
            "size": len(data),
            "description": "institution model",
            "anatomy": "spine",
            "sequence": "MEGRE",
        },
        *extra_entries,
    ]
    return server.serve("inst/catalog.json", json.dumps({"models": models}).encode()), data


def test_add_catalog_merges_tags_and_serves_offline(server, resources, tmp_path):
    cache = tmp_path / "cache"
    url, data = _host_catalog(server, tmp_path)
    entries = add_catalog(url, cache_dir=cache)
    assert [(e.name, e.source, e.url) for e in entries] == [("inst-spine", url, server.url("inst/inst-spine.zip"))]
    assert status_of(cache)["inst-spine"] == ("available", url)
    with pytest.raises(ModelNotFoundError, match="models fetch inst-spine"):
        resolve_model("inst-spine", cache_dir=cache, download=False)
    resolve_model("inst-spine", cache_dir=cache)
    server.stop()
    assert status_of(cache)["inst-spine"] == ("cached", url)  # the cached catalog copy serves offline
    assert resolve_model("inst-spine", cache_dir=cache).name == "inst-spine"
    # Re-adding the catalog while offline fails cleanly and keeps the cached copy.
    with pytest.raises(DownloadError):
        add_catalog(url, cache_dir=cache, retries=0)
    assert status_of(cache)["inst-spine"] == ("cached", url)
    assert not [f for f in listing(cache) if f.startswith("downloads/")]


def test_remote_catalog_entries_are_validated(server, resources, tmp_path):
    cache = tmp_path / "cache"
    bad_path = {"name": "sneaky", "version": "1", "path": "/etc"}
    url, _ = _host_catalog(server, tmp_path, extra_entries=[bad_path])
    with pytest.raises(CatalogError, match="'sneaky' names a local path"):
        add_catalog(url, cache_dir=cache)
    no_sha = {"name": "unverifiable", "version": "1", "url": "x.zip"}
    url, _ = _host_catalog(server, tmp_path / "2", extra_entries=[no_sha])
    with pytest.raises(CatalogError, match="'unverifiable' has a url but no sha256"):
        add_catalog(url, cache_dir=cache)
    bad_scheme = {"name": "ftp-model", "version": "1", "url": "ftp://example.org/m.zip", "sha256": "a" * 64}
    url, _ = _host_catalog(server, tmp_path / "3", extra_entries=[bad_scheme])
    with pytest.raises(CatalogError, match="only https, http, file"):
        add_catalog(url, cache_dir=cache)
    assert listing(cache) == []


def test_user_models_take_precedence_and_catalogs_can_be_dropped(server, resources, tmp_path):
    cache = tmp_path / "cache"
    url, _ = _host_catalog(server, tmp_path)
    add_catalog(url, cache_dir=cache)
    with pytest.raises(CatalogError, match="already in the catalog"):
        add_model(write_tiny_package(tmp_path / "mine", name="inst-spine")[0], cache_dir=cache)
    add_model(tmp_path / "mine", name="mine", cache_dir=cache)
    # The institution publishes a model called "mine" too: the user's own stays in front.
    url2, _ = _host_catalog(server, tmp_path / "v2", name="mine")
    assert url2 == url
    assert [e.name for e in add_catalog(url, cache_dir=cache)] == ["mine"]
    assert status_of(cache) == {"mine": ("cached", "user"), "phantom-spine-megre": ("missing", "bundled")}
    cached_copy = cache / json.loads((cache / "user_catalog.json").read_text())["catalogs"][0]["file"]
    assert cached_copy.is_file()
    assert remove_model(url, cache_dir=cache) == [cached_copy]
    assert set(status_of(cache)) == {"mine", "phantom-spine-megre"}
    assert not list((cache / "catalogs").iterdir())


def test_clear_cache_keeps_user_copies_unless_everything(server, resources, tmp_path):
    cache = tmp_path / "cache"
    url, data = _host_catalog(server, tmp_path)
    add_catalog(url, cache_dir=cache)
    resolve_model("inst-spine", cache_dir=cache)
    add_model(write_tiny_package(tmp_path / "mine", name="mine")[0], cache_dir=cache)
    freed = clear_cache(cache)
    assert freed > len(data) // 2
    assert status_of(cache)["inst-spine"] == ("available", url)
    assert status_of(cache)["mine"] == ("cached", "user")
    clear_cache(cache, everything=True)
    assert listing(cache) == []


# -- command line ---------------------------------------------------------------------------------
def test_cli_list_add_verify_remove(resources, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    folder, _ = write_tiny_package(tmp_path / "pkg", name="cli-model")
    assert main(["models", "list", "--json", "--cache-dir", cache]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == ["phantom-spine-megre"] and listed[0]["status"] == "missing"

    assert main(["models", "add", str(folder), "--cache-dir", cache, "--progress", "none"]) == 0
    assert "Added 'cli-model' 0.1.0" in capsys.readouterr().out
    assert main(["models", "--cache-dir", cache, "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["NAME", "VERSION", "STATUS", "SOURCE"]
    assert any(line.split()[:4] == ["cli-model", "0.1.0", "cached", "user"] for line in table)

    assert main(["models", "verify", "cli-model", "--cache-dir", cache]) == 0
    assert capsys.readouterr().out.startswith("OK: 'cli-model' 0.1.0: 1 weight file(s)")
    weights = Path(cache) / "models" / "cli-model" / "0.1.0" / "model.safetensors"
    weights.write_bytes(b"tampered" + weights.read_bytes()[8:])
    assert main(["models", "verify", "cli-model", "--cache-dir", cache]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHA-256 mismatch" in err[0] and str(weights) in err[0]

    assert main(["models", "remove", "cli-model", "--cache-dir", cache]) == 0
    capsys.readouterr()
    assert main(["models", "path", "--cache-dir", cache]) == 0
    assert capsys.readouterr().out.strip() == cache
    assert main(["models", "add", "https://example.org/m.zip", "--cache-dir", cache]) == 1
    assert "--sha256" in capsys.readouterr().err
    assert listing(Path(cache)) == ["user_catalog.json"]


def test_cli_fetch_reports_json_progress(server, resources, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    url, _ = _host_catalog(server, tmp_path)
    assert main(["models", "add-catalog", url, "--cache-dir", cache, "--progress", "none"]) == 0
    capsys.readouterr()
    assert main(["models", "fetch", "inst-spine", "--cache-dir", cache, "--progress", "json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [e for e in map(parse_progress_line, lines) if e]
    assert events and all(e["stage"] == "download" for e in events) and events[-1]["fraction"] == 1.0
    assert lines[-1].startswith("inst-spine 0.1.0: ")
    assert main(["models", "fetch", "inst-spine", "--cache-dir", cache, "--progress", "none"]) == 0
    assert server.hits("inst/inst-spine.zip") == 1
