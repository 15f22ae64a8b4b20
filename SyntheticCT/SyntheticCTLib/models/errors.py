"""Errors of model packages, the catalog, the cache and downloads."""

from __future__ import annotations

from SyntheticCTLib.kernel.errors import SyntheticCTError


class ModelPackageError(SyntheticCTError, ValueError):
    """A model package is missing, malformed, or unsafe to load."""


class SchemaVersionError(ModelPackageError):
    """``model.json`` declares a schema_version newer than this code understands."""


class ArchitectureError(ModelPackageError):
    """An architecture cannot be built with the given arguments, or its weights do not fit it."""


class UnknownArchitectureError(ArchitectureError, KeyError):
    """The named architecture is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ChecksumError(ModelPackageError):
    """A file's SHA-256 does not match the expected one."""


class UnsafeArchiveError(ModelPackageError):
    """An archive member would be written outside the target folder, or is a link or device."""


class CatalogError(SyntheticCTError, ValueError):
    """A catalog is malformed, or a model is not in it."""


class ModelNotFoundError(CatalogError, LookupError):
    """No model of that name in any catalog, and it is not a path."""


class BundledModelMissingError(ModelNotFoundError):
    """The catalog names a bundled model whose files are not installed."""


class DownloadError(SyntheticCTError, OSError):
    """A download failed (network, HTTP status, timeout, refused scheme)."""
