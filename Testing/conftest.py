"""Shared pytest fixtures: a small phantom (session-scoped) and the optional real-data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def small_phantom():
    """``make_phantom(seed=0, size=(64, 64, 48), spacing=2.0)``, built once per test session. Do not modify it."""
    from SyntheticCTLib.phantom import make_phantom

    return make_phantom(seed=0, size=(64, 64, 48), spacing=2.0)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder of real CT/MRI volumes (``../shared/data/real``); skips the test when it is absent."""
    if not REAL_DATA_DIR.is_dir():
        pytest.skip(f"real data folder {REAL_DATA_DIR} is absent (it lives beside the repository, not in it)")
    return REAL_DATA_DIR
