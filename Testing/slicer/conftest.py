"""Fixtures for the tests that drive the modules' Logic classes on a real MRML scene (slicer-core).

``slicer-core`` (PyPI; Python 3.11/3.12) provides the real ``vtkMRMLScene``, nodes and module logics;
``slicer_app_standin.py`` stands in only for what it lacks (see there). The child processes are real:
``PythonSlicer`` on ``PATH`` is a launcher for this interpreter, as Slicer's is for its own.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLICER_CORE = importlib.util.find_spec("slicer_core") is not None
SKIP_REASON = (
    "slicer-core is not installed (its wheels are for Python 3.11 and 3.12): "
    'pip install -e ".[slicer]" to run the Slicer logic tests on a real MRML scene'
)


@pytest.fixture(scope="session")
def slicer_modules(tmp_path_factory):
    """The stand-in installed, ``PythonSlicer`` on PATH, and the two module files imported."""
    if not SLICER_CORE:
        pytest.skip(SKIP_REASON)
    import slicer_app_standin

    app = slicer_app_standin.install()
    launcher_dir = tmp_path_factory.mktemp("launcher")
    launcher = launcher_dir / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n', encoding="utf-8")
    launcher.chmod(0o755)
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(launcher_dir), old_path])
    os.environ.setdefault("MPLBACKEND", "Agg")
    for folder in (REPO / "SyntheticCTRegistration", REPO / "SyntheticCT"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import SyntheticCT
    import SyntheticCTRegistration

    yield app, SyntheticCT, SyntheticCTRegistration
    os.environ["PATH"] = old_path


@pytest.fixture
def scene(slicer_modules):
    """A fresh real vtkMRMLScene as slicer.mrmlScene, with the module logics bound to it."""
    import slicer_app_standin

    return slicer_app_standin.new_scene()
