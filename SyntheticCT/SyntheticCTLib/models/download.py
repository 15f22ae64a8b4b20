"""Verified, resumable, cancellable downloads with the standard library only (urllib).

:func:`download` streams a URL (``https``, ``http`` or ``file`` only) to a temporary file beside the
destination, verifies its SHA-256, then renames it into place. A dropped connection is retried with
backoff, resuming with an HTTP ``Range`` request where the server answers 206 (else the transfer
restarts). Every connect and every read is bounded by ``timeout``. A failed, cancelled or corrupt
download leaves nothing behind; the destination, if it existed, is untouched.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from SyntheticCTLib import __version__
from SyntheticCTLib.kernel.errors import SyntheticCTError
from SyntheticCTLib.kernel.progress import CancelToken
from SyntheticCTLib.kernel.types import PathLike
from SyntheticCTLib.models.errors import ChecksumError, DownloadError
from SyntheticCTLib.models.hashing import check_sha256, normalize_sha256, sha256_file

logger = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("https", "http", "file")
CHUNK = 1 << 16
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 4
RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)
MAX_ATTEMPTS = 100

BytesProgress = Callable[[int, Optional[int]], None]
"""``progress(bytes_done, bytes_total)``; ``bytes_total`` is None when unknown. May raise Cancelled."""


def check_url(url: str) -> str:
    """Return ``url`` if its scheme is https, http or file; else raise :class:`DownloadError`."""
    scheme = urllib.parse.urlsplit(str(url)).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise DownloadError(
            f"Refusing to download '{url}': only {', '.join(ALLOWED_SCHEMES)} URLs are accepted "
            f"(got {scheme + ':' if scheme else 'no scheme'})."
        )
    return str(url)


def path_to_url(path: PathLike) -> str:
    """A ``file:`` URL for a local path."""
    return Path(path).resolve().as_uri()


class _SafeRedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError(f"Refusing a redirect from '{req.full_url}' to '{newurl}' (scheme {scheme or 'none'}).")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_SafeRedirectHandler)


class _Retryable(Exception):
    """An attempt failed in a way worth retrying."""


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _wait(seconds: float, cancel: Optional[CancelToken]) -> None:
    end = time.monotonic() + seconds
    while True:
        if cancel is not None:
            cancel.check()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def download(
    url: str,
    dest: PathLike,
    *,
    sha256: Optional[str] = None,
    expected_size: Optional[int] = None,
    progress: Optional[BytesProgress] = None,
    cancel: Optional[CancelToken] = None,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = 0.5,
    tmp_dir: Optional[PathLike] = None,
) -> Path:
    """Download ``url`` to ``dest``, verified against ``sha256``; return ``dest``.

    Parameters
    ----------
    url
        An ``https``, ``http`` or ``file`` URL.
    dest
        The final file. If it already exists with the expected SHA-256, nothing is downloaded.
    sha256
        Expected hex digest; a mismatch raises :class:`ChecksumError` and keeps nothing. None skips the
        check (only for files whose trust comes from elsewhere).
    expected_size
        Bytes expected; a transfer larger than this is aborted as corrupt.
    progress
        ``progress(bytes_done, bytes_total)`` after every chunk; may raise :class:`Cancelled`.
    cancel
        A :class:`CancelToken`, checked between chunks and during backoff.
    timeout
        Seconds allowed for connecting and for each read; a stalled transfer fails the attempt.
    retries
        Attempts after a failure that made no progress (connection errors, timeouts, HTTP 5xx/408/429),
        with exponential backoff starting at ``backoff`` seconds. An attempt that received bytes
        resets the count; a resumed attempt sends ``Range: bytes=<done>-``.
    tmp_dir
        Folder for the temporary file (default: ``dest``'s folder, so that the final rename is atomic).

    Raises
    ------
    DownloadError
        Refused scheme, HTTP error, network failure or timeout after the retries.
    ChecksumError
        The downloaded bytes do not have the expected SHA-256.
    Cancelled
        Cancelled through ``cancel`` or ``progress``.
    """
    url = check_url(url)
    dest = Path(dest)
    expected = normalize_sha256(sha256, "expected sha256") if sha256 is not None else None
    if expected and dest.is_file() and sha256_file(dest) == expected:
        logger.info("'%s' is already present with the expected SHA-256; not downloading.", dest)
        return dest
    tmp_parent = Path(tmp_dir) if tmp_dir is not None else dest.parent
    tmp_parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=tmp_parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            _transfer(
                url,
                f,
                expected_size=expected_size,
                progress=progress,
                cancel=cancel,
                timeout=timeout,
                retries=retries,
                backoff=backoff,
            )
            f.flush()
            os.fsync(f.fileno())
        if expected:
            try:
                check_sha256(sha256_file(tmp), expected, url)
            except ChecksumError as e:
                raise ChecksumError(f"{e} Nothing was kept.") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return dest


def _transfer(
    url: str,
    f,
    *,
    expected_size: Optional[int],
    progress: Optional[BytesProgress],
    cancel: Optional[CancelToken],
    timeout: float,
    retries: int,
    backoff: float,
) -> None:
    opener = _opener()
    done = 0
    total: Optional[int] = expected_size
    failures = 0
    attempts = 0
    while True:
        attempts += 1
        if cancel is not None:
            cancel.check()
        start_done = done
        try:
            done, total = _attempt(opener, url, f, done, total, expected_size, progress, cancel, timeout)
            return
        except SyntheticCTError:
            raise
        except _Retryable as e:
            reason = str(e)
            done = f.tell()
        if done > start_done:
            failures = 0
        failures += 1
        if failures > retries or attempts >= MAX_ATTEMPTS:
            raise DownloadError(f"Download of '{url}' failed after {attempts} attempt(s): {reason}")
        delay = backoff * 2 ** (failures - 1)
        logger.warning("Download of '%s' interrupted at %d bytes (%s); retrying in %.1f s.", url, done, reason, delay)
        _wait(delay, cancel)


def _attempt(opener, url, f, done, total, expected_size, progress, cancel, timeout):
    headers = {"User-Agent": f"SyntheticCT/{__version__}", "Accept-Encoding": "identity"}
    if done:
        headers["Range"] = f"bytes={done}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = opener.open(request, timeout=timeout)
    except SyntheticCTError:  # a refused redirect
        raise
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and done:
            f.seek(0)
            f.truncate()
            raise _Retryable("the server refused to resume (HTTP 416); restarting") from None
        if e.code in RETRY_STATUS:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from None
        what = "not found" if e.code == 404 else "refused"
        raise DownloadError(f"Download of '{url}' {what}: HTTP {e.code} {e.reason}.") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, FileNotFoundError) or (urllib.parse.urlsplit(url).scheme == "file"):
            raise DownloadError(f"Cannot read '{url}': {reason}.") from None
        raise _Retryable(f"cannot connect: {reason}") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, bad status lines
        raise _Retryable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
    with response:
        status = getattr(response, "status", None) or 200
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if done:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "") or "")
            if status == 206 and match and int(match.group(1)) == done:
                logger.info("Resuming '%s' at byte %d.", url, done)
                if match.group(3) != "*":
                    total = int(match.group(3))
            else:
                logger.info("The server did not resume '%s' (status %s); restarting from byte 0.", url, status)
                f.seek(0)
                f.truncate()
                done = 0
                total = length if length is not None else expected_size
        else:
            total = length if length is not None else expected_size
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(
                f"'{url}' is {total} bytes, not the {expected_size} bytes expected; it is not the expected file."
            )
        if progress is not None:
            progress(done, total)
        while True:
            if cancel is not None:
                cancel.check()
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise _Retryable(f"connection lost after {done} bytes ({type(e).__name__}: {e})") from None
            if not chunk:
                break
            f.write(chunk)
            done += len(chunk)
            if total is not None and done > total:
                raise DownloadError(f"'{url}' sent more than the {total} bytes announced; refusing it.")
            if progress is not None:
                progress(done, total)
        if total is not None and done < total:
            raise _Retryable(f"connection closed after {done} of {total} bytes")
    return done, total
