"""Shared pytest fixtures: a small phantom (session-scoped) and the optional real-data folder."""

from __future__ import annotations

import os
import subprocess
import sys
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
def planted_error(small_phantom):
    """The small phantom's CT, an sCT whose bone is grown by 3 voxels (6 mm) in one half (a planted error), and
    |sCT - CT|, as float32 images and an array."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    ct = sitk.Cast(small_phantom.ct, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(ct)
    bone = array > 200
    block = np.zeros_like(bone)
    block[:, :, : array.shape[2] // 2] = True
    grown = ndimage.binary_dilation(bone, iterations=3) & block & ~bone & (array > -500)
    wrong = array.copy()
    wrong[grown] = 700.0
    sct = sitk.GetImageFromArray(wrong)
    sct.CopyInformation(ct)
    return ct, sct, np.abs(wrong - array)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder of real CT/MRI volumes (``../shared/data/real``); skips the test when it is absent."""
    if not REAL_DATA_DIR.is_dir():
        pytest.skip(f"real data folder {REAL_DATA_DIR} is absent (it lives beside the repository, not in it)")
    return REAL_DATA_DIR


def _run_torchrun(args, *, nproc: int = 2, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node NPROC -m SyntheticCTLib ARGS`` (list args, no shell)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command += ["-m", "SyntheticCTLib", *[str(a) for a in args]]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture
def torchrun():
    """A function running the ``syntheticct`` command line under a real ``torchrun`` (gloo, CPU)."""
    return _run_torchrun


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 (``http_fixture.LoopbackServer``), stopped after the test."""
    from http_fixture import LoopbackServer

    srv = LoopbackServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def resources(tmp_path, monkeypatch):
    """A copy of the shipped Resources folder (catalog only, the bundled model absent), so that catalogs are
    tested offline and the bundled model can be absent or present."""
    import shutil

    from SyntheticCTLib.models import catalog

    folder = tmp_path / "Resources"
    folder.mkdir()
    shutil.copy(catalog.shipped_catalog_path(), folder / "catalog.json")
    monkeypatch.setattr(catalog, "resources_dir", lambda: folder)
    return folder
