"""Verified downloads against a real HTTP server on 127.0.0.1: success, 404, corrupt bytes, a cut
connection resumed with a Range request, a stalled server, a cancelled transfer. After each, the cache
holds only verified files."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from http_fixture import sha256_hex, tiny_package_zip

from SyntheticCTLib.kernel.errors import Cancelled
from SyntheticCTLib.kernel.progress import CancelToken
from SyntheticCTLib.models.cache import MARKER as CACHE_MARKER
from SyntheticCTLib.models.catalog import add_catalog, list_models, resolve_model
from SyntheticCTLib.models.download import check_url, download, path_to_url
from SyntheticCTLib.models.errors import ChecksumError, DownloadError
from SyntheticCTLib.models.package import load_model_package

TEMP_MARKERS = (".partial", ".installing", ".fetch", ".work", ".extracting", ".writing", ".removing")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def payload() -> bytes:
    return random.Random(1234).randbytes(1 << 20)


def listing(root: Path) -> list:
    """Files under ``root``, less the marker that says a folder is a cache of ours."""
    return sorted(
        p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file() and p.name != CACHE_MARKER
    )


def assert_cache_verified(root: Path, *, allowed_blobs=()) -> None:
    """Only verified things: no temporary files, every cached package hash-verifies, nothing unexplained."""
    root = Path(root)
    files = listing(root)
    assert not [f for f in files if any(m in f for m in TEMP_MARKERS)], files
    packages = sorted(p.parent for p in root.glob("models/*/*/model.json"))
    explained = set()
    for folder in packages:
        package = load_model_package(folder, verify=True)  # re-hashes every weight file
        explained |= {(folder / w["file"]).relative_to(root).as_posix() for w in package.card["weights"]}
        explained |= {(folder / n).relative_to(root).as_posix() for n in ("model.json", ".origin.json")}
    for f in files:
        ok = f in explained or f == "user_catalog.json" or (f.startswith("catalogs/") and f.endswith(".json"))
        ok = ok or f in allowed_blobs
        assert ok, f"unexpected file in the cache: {f} (cache: {files})"


def test_only_web_and_file_urls_are_accepted():
    for url in ("ftp://example.org/m.zip", "data:text/plain,hi", "javascript:alert(1)", "/just/a/path", "gopher://x"):
        with pytest.raises(DownloadError, match="only https, http, file"):
            check_url(url)
    assert check_url("https://example.org/m.zip") == "https://example.org/m.zip"


def test_good_download_reports_bytes_and_verifies(server, payload, tmp_path):
    url = server.serve("blob.bin", payload)
    calls = []
    dest = download(url, tmp_path / "blob.bin", sha256=sha256_hex(payload), progress=lambda d, t: calls.append((d, t)))
    assert dest.read_bytes() == payload
    assert calls[-1] == (len(payload), len(payload))
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))
    assert listing(tmp_path) == ["blob.bin"]
    assert server.requests == [("/blob.bin", None, 200)]
    # Present with the right hash: not downloaded again, even with the server gone.
    server.stop()
    assert download(url, tmp_path / "blob.bin", sha256=sha256_hex(payload), retries=0) == dest
    assert len(server.requests) == 1


def test_redirects_only_to_web_urls(server, payload, tmp_path):
    target = server.serve("real.bin", payload)
    server.serve("moved.bin", b"", mode=f"redirect:{target}")
    assert download(server.url("moved.bin"), tmp_path / "a.bin", sha256=sha256_hex(payload)).read_bytes() == payload
    for i, (target, reason) in enumerate(
        [("ftp://127.0.0.1/a.bin", "Refusing a redirect"), (f"file://{tmp_path / 'a.bin'}", "refused.*not allowed")]
    ):
        server.serve(f"evil{i}.bin", b"", mode=f"redirect:{target}")
        with pytest.raises(DownloadError, match=reason):
            download(
                server.url(f"evil{i}.bin"), tmp_path / "b.bin", sha256=sha256_hex(payload), retries=2, backoff=0.01
            )
        assert server.hits(f"evil{i}.bin") == 1  # refused, not retried
    assert listing(tmp_path) == ["a.bin"]


def test_file_url(payload, tmp_path):
    src = tmp_path / "src" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(payload)
    dest = download(path_to_url(src), tmp_path / "out" / "blob.bin", sha256=sha256_hex(payload))
    assert dest.read_bytes() == payload


def test_404_leaves_nothing(server, tmp_path):
    (tmp_path / "kept.bin").write_bytes(b"was here before")
    before = listing(tmp_path)
    with pytest.raises(DownloadError, match="404"):
        download(server.url("missing.zip"), tmp_path / "missing.zip", sha256="0" * 64, retries=3, backoff=0.01)
    assert server.hits("missing.zip") == 1  # a 404 is not retried
    assert listing(tmp_path) == before


def test_checksum_mismatch_keeps_nothing_and_names_both_digests(server, payload, tmp_path):
    url = server.serve("blob.bin", payload, mode="wrong")
    served = bytes(b ^ 0xFF for b in payload[:16]) + payload[16:]
    (tmp_path / "blob.bin").write_bytes(b"previous version")
    with pytest.raises(ChecksumError) as info:
        download(url, tmp_path / "blob.bin", sha256=sha256_hex(payload))
    message = str(info.value)
    assert url in message and sha256_hex(payload) in message and sha256_hex(served) in message
    assert listing(tmp_path) == ["blob.bin"]
    assert (tmp_path / "blob.bin").read_bytes() == b"previous version"


def test_cut_connection_is_resumed_with_a_range_request(server, payload, tmp_path):
    url = server.serve("blob.bin", payload, mode="cut")
    calls = []
    dest = download(
        url, tmp_path / "blob.bin", sha256=sha256_hex(payload), backoff=0.01, progress=lambda d, t: calls.append((d, t))
    )
    assert dest.read_bytes() == payload
    first, second = server.requests
    assert first == ("/blob.bin", None, 200)
    resumed_at = int(second[1].replace("bytes=", "").rstrip("-"))
    assert second[2] == 206 and 0 < resumed_at <= len(payload) // 2
    # Progress never went back to zero: the bytes before the cut were kept.
    assert (resumed_at, len(payload)) in calls
    after_cut = calls[calls.index((resumed_at, len(payload))) :]
    assert all(done >= resumed_at for done, _ in after_cut)
    assert listing(tmp_path) == ["blob.bin"]


def test_cut_connection_without_range_support_restarts(server, payload, tmp_path):
    url = server.serve("blob.bin", payload, mode="cut-norange")
    dest = download(url, tmp_path / "blob.bin", sha256=sha256_hex(payload), backoff=0.01)
    assert dest.read_bytes() == payload
    assert [r[2] for r in server.requests] == [200, 200]
    assert server.requests[1][1] is not None  # it asked to resume; the server sent everything again


def test_stalled_server_times_out_with_bounded_retries(server, payload, tmp_path):
    url = server.serve("blob.bin", payload, mode="stall")
    start = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        download(url, tmp_path / "blob.bin", sha256=sha256_hex(payload), timeout=0.3, retries=1, backoff=0.01)
    elapsed = time.monotonic() - start
    assert server.hits("blob.bin") == 2  # one attempt, one retry
    assert elapsed < 5.0
    assert listing(tmp_path) == []


def test_cancelled_download_leaves_nothing(server, payload, tmp_path):
    url = server.serve("blob.bin", payload, mode="slow")
    token = CancelToken()
    seen = []

    def on_bytes(done, total):
        seen.append(done)
        if done >= 64 * 1024:
            token.cancel()

    with pytest.raises(Cancelled):
        download(url, tmp_path / "blob.bin", sha256=sha256_hex(payload), progress=on_bytes, cancel=token)
    assert 64 * 1024 <= max(seen) < len(payload)
    assert listing(tmp_path) == []


# -- through the catalog, into a real cache -------------------------------------------------------
@pytest.fixture
def hosted(server, tmp_path):
    """A tiny model zip and a catalog that points at it (relative URL), served over HTTP."""
    data = tiny_package_zip(tmp_path / "build" / "pkg", tmp_path / "build" / "tiny.zip", name="tiny-spine")
    server.serve("models/tiny.zip", data)
    catalog = {
        "models": [
            {
                "name": "tiny-spine",
                "version": "0.1.0",
                "url": "tiny.zip",
                "sha256": sha256_hex(data),
                "size": len(data),
                "description": "tiny",
                "anatomy": "spine",
                "sequence": "MEGRE",
            }
        ]
    }
    server.serve("models/catalog.json", json.dumps(catalog).encode())
    return server.url("models/catalog.json"), data


def test_catalog_download_into_cache_then_served_offline_without_refetch(server, hosted, tmp_path):
    catalog_url, data = hosted
    cache = tmp_path / "cache"
    entries = add_catalog(catalog_url, cache_dir=cache)
    assert [e.source for e in entries] == [catalog_url]
    assert entries[0].url == server.url("models/tiny.zip")
    fractions = []
    package = resolve_model("tiny-spine", cache_dir=cache, progress=lambda f, s="", m="": fractions.append(f))
    assert package.name == "tiny-spine" and package.in_channels == 2
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert server.hits("models/tiny.zip") == 1
    assert_cache_verified(cache)
    assert {e.name: e.status for e in list_models(cache)}["tiny-spine"] == "cached"

    again = resolve_model("tiny-spine", cache_dir=cache)
    assert again.root == package.root
    assert server.hits("models/tiny.zip") == 1  # never downloaded again

    server.stop()  # offline: the cache serves, catalog included
    offline = resolve_model("tiny-spine", cache_dir=cache)
    assert offline.build_network() is not None
    assert {e.name: e.status for e in list_models(cache)}["tiny-spine"] == "cached"


@pytest.mark.parametrize("mode,error", [("wrong", ChecksumError), ("missing", DownloadError), ("stall", DownloadError)])
def test_failed_model_download_leaves_cache_as_before(server, hosted, tmp_path, mode, error):
    catalog_url, data = hosted
    cache = tmp_path / "cache"
    add_catalog(catalog_url, cache_dir=cache)
    before = listing(cache)
    if mode == "missing":
        server.files.pop("/models/tiny.zip")
    else:
        server.modes["/models/tiny.zip"] = mode
    with pytest.raises(error):
        resolve_model("tiny-spine", cache_dir=cache, timeout=0.3, retries=0)
    assert listing(cache) == before
    assert_cache_verified(cache)


def test_model_download_cancelled_from_progress_callback(server, hosted, tmp_path):
    catalog_url, data = hosted
    cache = tmp_path / "cache"
    add_catalog(catalog_url, cache_dir=cache)
    server.modes["/models/tiny.zip"] = "slow"
    server.slow_chunk = 256
    before = listing(cache)

    def report(fraction, stage="", message=""):
        if stage == "download" and fraction > 0.2:
            raise Cancelled("user pressed cancel")

    with pytest.raises(Cancelled):
        resolve_model("tiny-spine", cache_dir=cache, progress=report)
    assert listing(cache) == before
    assert_cache_verified(cache)


def test_cut_model_download_resumes_into_cache(server, hosted, tmp_path):
    catalog_url, data = hosted
    cache = tmp_path / "cache"
    add_catalog(catalog_url, cache_dir=cache)
    server.modes["/models/tiny.zip"] = "cut"
    package = resolve_model("tiny-spine", cache_dir=cache)
    ranges = [r for p, r, s in server.requests if p == "/models/tiny.zip"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert package.version == "0.1.0"
    assert_cache_verified(cache)
