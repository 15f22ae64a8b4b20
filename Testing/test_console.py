"""What a user sees on a terminal: bars, log lines and the last error line, in that order, readable."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(args, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), "MPLBACKEND": "Agg", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "SyntheticCTLib", *args],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        env=env,
        cwd=tmp_path,
    )


def test_progress_bars_show_percent_and_no_per_mille_rate(tmp_path):
    result = _run(["phantom", "case", "--seed", "1", "--size", "24", "24", "16", "--spacing", "4"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "‰" not in result.stderr
    assert "100%" in result.stderr


def test_an_error_is_the_last_line_after_every_bar(tmp_path):
    result = _run(
        [
            "synthesize",
            *[a for e in (1, 2, 3) for a in ("-i", str(tmp_path / f"missing{e}.nii.gz"))],
            "-o",
            "sct.nii.gz",
        ],
        tmp_path,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("syntheticct synthesize: error:"), result.stderr
    assert "missing1.nii.gz" in lines[-1]


@pytest.mark.parametrize("level", ["debug"])
def test_debug_logging_is_not_flooded_by_third_party_font_lookups(tmp_path, level):
    result = _run(
        [
            "phantom",
            "case",
            "--seed",
            "1",
            "--size",
            "24",
            "24",
            "16",
            "--spacing",
            "4",
            "--log-level",
            level,
            "--progress",
            "none",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "findfont" not in result.stderr and "font_manager" not in result.stderr
