"""SHA-256 of files, and checks that name the file, the expected and the actual digest."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Union

from SyntheticCTLib.models.errors import ChecksumError, ModelPackageError

CHUNK = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Union[str, Path]) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def normalize_sha256(value: object, what: str = "sha256") -> str:
    """Lower-case hex digest; raise :class:`ModelPackageError` unless it is 64 hex digits."""
    text = str(value or "").strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:") :]
    if not _HEX64.match(text):
        raise ModelPackageError(f"{what} must be 64 hexadecimal digits (a SHA-256); got {value!r}.")
    return text


def check_sha256(actual: str, expected: str, name: str) -> None:
    """Raise :class:`ChecksumError` naming ``name`` when the digests differ."""
    if actual.lower() != expected.lower():
        raise ChecksumError(
            f"SHA-256 mismatch for '{name}': expected {expected.lower()}, got {actual.lower()}. "
            "The file is corrupt or was altered; it was not used."
        )
