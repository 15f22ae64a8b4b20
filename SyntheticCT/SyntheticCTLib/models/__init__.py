"""Model packages, the architecture registry, the model catalog, the per-user cache and verified downloads.

Imports are lazy: ``import SyntheticCTLib.models`` does not import torch; the names below load their
module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ARCHITECTURES": "architectures",
    "register_architecture": "architectures",
    "build_network": "architectures",
    "known_architectures": "architectures",
    "UNet3D": "architectures",
    "ModelPackage": "package",
    "load_model_package": "package",
    "write_model_package": "package",
    "SCHEMA_VERSION": "package",
    "cache_dir": "cache",
    "download": "download",
    "list_models": "catalog",
    "resolve_model": "catalog",
    "add_model": "catalog",
    "add_catalog": "catalog",
    "remove_model": "catalog",
    "verify_model": "catalog",
    "fetch_model": "catalog",
    "clear_cache": "catalog",
    "DEFAULT_MODEL": "catalog",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
