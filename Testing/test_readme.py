"""The README's two commands stay true: CI runs the README's test command, and torch is pinned in both."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    test_commands = [b.strip() for b in _bash_blocks(readme) if b.strip().endswith("python -m pytest")]
    assert len(test_commands) == 1, "the README has one test command"
    assert test_commands[0] in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_torch_is_pinned_to_one_cpu_build_in_the_readme_and_ci():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    pins = set(re.findall(r"torch==[0-9.]+(?:\+cpu)?", readme + ci))
    assert pins and all(p.startswith("torch==2.13.0") for p in pins), pins
    for command in [b for b in _bash_blocks(readme) if "pip install" in b]:
        assert "torch==2.13.0+cpu" in command and "download.pytorch.org/whl/cpu" in command, command
