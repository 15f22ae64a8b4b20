"""The kernel's shared contracts: device names, JSON, progress and cancellation, HU constants."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from SyntheticCTLib.cli.main import main
from SyntheticCTLib.kernel import hu
from SyntheticCTLib.kernel.devices import DEVICES, check_device
from SyntheticCTLib.kernel.errors import Cancelled, InvalidParameterError
from SyntheticCTLib.kernel.jsonio import json_safe, write_json
from SyntheticCTLib.kernel.progress import CancelToken, bytes_progress, scaled, with_cancel


@pytest.mark.parametrize("name", [*DEVICES, "cuda:0", "cuda:3", " CPU "])
def test_every_face_accepts_the_same_device_names(name):
    assert check_device(name) == name.strip().lower()


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "tpu", ""])
def test_an_unknown_device_is_one_clear_error(name):
    with pytest.raises(InvalidParameterError, match="Unknown device"):
        check_device(name)


@pytest.mark.parametrize("command", ["synthesize", "demo", "evaluate", "train"])
def test_the_command_line_refuses_an_unknown_device_before_any_work(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--device", "gpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown device 'gpu'" in err and "cuda:N" in err


def test_the_runner_accepts_mps_and_a_numbered_gpu():
    from SyntheticCTLib.apps.runner import child_environment, synthesize_args

    args = synthesize_args(["a.nii.gz"], "b.nii.gz", device="cuda:1")
    assert args[args.index("--device") + 1] == "cuda:1"
    assert child_environment({}, device="mps").get("CUDA_VISIBLE_DEVICES") is None
    assert child_environment({}, device="cpu")["CUDA_VISIBLE_DEVICES"] == "-1"


def test_json_safe_makes_numpy_paths_and_non_finite_values_plain():
    value = {
        1: np.float32(0.5),
        "a": (np.int64(3), np.array([1.0, np.nan])),
        "p": Path("/x/y"),
        "inf": float("inf"),
        "nested": [{"n": np.bool_(True)}],
    }
    assert json_safe(value) == {"1": 0.5, "a": [3, [1.0, None]], "p": "/x/y", "inf": None, "nested": [{"n": True}]}


def test_write_json_is_strict_json_and_leaves_no_temporary_file(tmp_path):
    path = write_json(tmp_path / "out.json", {"mae": float("nan"), "x": np.float64(1.25)})
    assert json.loads(path.read_text()) == {"mae": None, "x": 1.25}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_bytes_progress_turns_bytes_into_fractions_and_megabytes():
    seen = []
    on_bytes = bytes_progress(lambda f, s="", m="": seen.append((f, s, m)), "model")
    on_bytes(2_500_000, 10_000_000)
    on_bytes(3_000_000, None)
    assert seen == [(0.25, "download", "model: 2.5 / 10.0 MB"), (0.0, "download", "model: 3.0 MB")]


def test_cancel_is_one_token_checked_at_every_progress_update():
    seen = []
    token = CancelToken()
    report = with_cancel(scaled(lambda f, s="", m="": seen.append(round(f, 3)), 0.5, 1.0), token)
    report(0.5, "step")
    token.cancel()
    with pytest.raises(Cancelled):
        report(0.6, "step")
    assert seen == [0.75]


def test_hu_constants_are_the_hounsfield_scale_and_the_ct_storage_range():
    assert hu.AIR_HU == -1000.0 and hu.WATER_HU == 0.0
    assert hu.CT_MAX_HU - hu.CT_MIN_HU == 4095.0  # a 12-bit stored range
    assert math.isclose(hu.BONE_THRESHOLD_HU, 200.0)


def test_the_library_defaults_use_the_shared_bone_threshold():
    """The defaults users read in every figure: compare, bone masks, the CLI and training validation."""
    import inspect

    from SyntheticCTLib.comparison import bone, compare

    assert inspect.signature(compare.compare).parameters["bone_threshold"].default == 200.0
    assert inspect.signature(bone.segment_bone).parameters["threshold"].default == 200.0
