"""The child-process runner that the Slicer modules use: argument lists, progress lines, cancel.

Real child processes throughout (this interpreter running small scripts, and the real command line
where its subcommands exist); the cancel tests check with the operating system that the child and
its grandchild are gone.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from SyntheticCTLib.apps.runner import (
    ChildJob,
    JobBusyError,
    JobResult,
    JobSlot,
    ProcessRunner,
    RunnerEvent,
    child_environment,
    compare_args,
    describe_event,
    ensure_packages,
    find_python,
    library_path,
    missing_packages,
    models_add_args,
    models_fetch_args,
    register_args,
    run_to_completion,
    synthesize_args,
)
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.progress import JsonLinesProgress, parse_progress_line

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
LIB_PATHS = [REPO / "SyntheticCT", REPO / "SyntheticCTRegistration"]


def _subparsers():
    """The real command line's subcommand parsers, by name."""
    import argparse

    from SyntheticCTLib.cli.main import build_parser

    parser = build_parser()
    for action in parser._actions:  # noqa: SLF001 - argparse keeps subparsers here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return parser, dict(action.choices)
    return parser, {}


def _parse_with_cli(args):
    """Parse a built argument list (without ``python -m SyntheticCTLib``) with the real parser."""
    parser, subs = _subparsers()
    assert args[0] in subs, f"the '{args[0]}' subcommand is missing from the command line"
    return parser.parse_args(args)


# ------------------------------------------------------------------------------------------------
# argument lists
# ------------------------------------------------------------------------------------------------


def test_synthesize_args_list_every_input_in_order(tmp_path):
    inputs = [tmp_path / "echo1.nrrd", tmp_path / "echo 2.nrrd", tmp_path / "echo3.nrrd"]
    args = synthesize_args(
        inputs,
        tmp_path / "sct.nrrd",
        model="phantom-spine-megre",
        device="cpu",
        uncertainty=tmp_path / "spread.nrrd",
        dicom_out=tmp_path / "dicom",
        python="/opt/PythonSlicer",
    )
    assert args[:4] == ["/opt/PythonSlicer", "-m", "SyntheticCTLib", "synthesize"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "-i"] == [str(p) for p in inputs]
    assert args[args.index("-o") + 1] == str(tmp_path / "sct.nrrd")
    assert args[args.index("--model") + 1] == "phantom-spine-megre"
    assert args[args.index("--device") + 1] == "cpu"
    assert args[args.index("--uncertainty") + 1] == str(tmp_path / "spread.nrrd")
    assert args[args.index("--dicom-out") + 1] == str(tmp_path / "dicom")
    assert args[-2:] == ["--progress", "json"]
    assert all(isinstance(a, str) for a in args)


def test_argument_builders_default_to_this_interpreter(tmp_path):
    args = synthesize_args([tmp_path / "a.nii.gz"], tmp_path / "b.nii.gz")
    assert args[:3] == [PY, "-m", "SyntheticCTLib"]
    assert "--uncertainty" not in args and "--dicom-out" not in args
    assert args[args.index("--model") + 1] == "default" and args[args.index("--device") + 1] == "auto"


@pytest.mark.parametrize("bad", [{"device": "gpu"}, {"model": " "}])
def test_synthesize_args_reject_bad_options(tmp_path, bad):
    with pytest.raises(InvalidParameterError):
        synthesize_args([tmp_path / "a.nrrd"], tmp_path / "b.nrrd", **bad)


def test_synthesize_args_need_an_input(tmp_path):
    with pytest.raises(InvalidParameterError, match="at least one input"):
        synthesize_args([], tmp_path / "b.nrrd")


@pytest.mark.parametrize("mode", ["rigid", "affine", "deformable", "bone-local"])
def test_register_args(tmp_path, mode):
    args = register_args(
        tmp_path / "ct.nrrd",
        tmp_path / "sct.nrrd",
        tmp_path / "t.tfm",
        mode=mode,
        resampled=tmp_path / "r.nrrd",
        bone_labels=tmp_path / "bones.nrrd",
        bone_threshold=180,
        initial_transform=tmp_path / "start.h5",
    )
    assert args[3] == "register"
    assert args[args.index("--fixed") + 1] == str(tmp_path / "ct.nrrd")
    assert args[args.index("--moving") + 1] == str(tmp_path / "sct.nrrd")
    assert args[args.index("-o") + 1] == str(tmp_path / "t.tfm")
    assert args[args.index("--mode") + 1] == mode
    assert args[args.index("--resampled") + 1] == str(tmp_path / "r.nrrd")
    assert args[args.index("--bone-labels") + 1] == str(tmp_path / "bones.nrrd")
    assert float(args[args.index("--bone-threshold") + 1]) == 180.0
    assert args[args.index("--initial-transform") + 1] == str(tmp_path / "start.h5")
    assert args[-2:] == ["--progress", "json"]


def test_register_args_reject_unknown_mode(tmp_path):
    with pytest.raises(InvalidParameterError, match="mode must be one of"):
        register_args(tmp_path / "a", tmp_path / "b", tmp_path / "t.tfm", mode="bspline")


def test_compare_args(tmp_path):
    args = compare_args(
        tmp_path / "ct.nrrd",
        tmp_path / "sct.nrrd",
        tmp_path / "out",
        transform=tmp_path / "t.tfm",
        bone_threshold=250.0,
        bone_labels=tmp_path / "bones.nrrd",
        bone_transforms={2: tmp_path / "t.bone2.tfm", 1: tmp_path / "t.bone1.tfm"},
    )
    assert args[3] == "compare"
    assert args[args.index("--reference") + 1] == str(tmp_path / "ct.nrrd")
    assert args[args.index("--synthetic") + 1] == str(tmp_path / "sct.nrrd")
    assert args[args.index("--transform") + 1] == str(tmp_path / "t.tfm")
    assert float(args[args.index("--bone-threshold") + 1]) == 250.0
    assert args[args.index("--bone-labels") + 1] == str(tmp_path / "bones.nrrd")
    assert [args[i + 1] for i, a in enumerate(args) if a == "--bone-transform"] == [
        f"1={tmp_path / 't.bone1.tfm'}",
        f"2={tmp_path / 't.bone2.tfm'}",
    ]
    assert args[args.index("-o") + 1] == str(tmp_path / "out")
    assert args[-2:] == ["--progress", "json"]
    with pytest.raises(InvalidParameterError, match="finite"):
        compare_args("a", "b", "c", bone_threshold=float("nan"))
    with pytest.raises(InvalidParameterError, match="label map"):
        compare_args("a", "b", "c", bone_transforms={1: "t.tfm"})


def test_models_args():
    fetch = models_fetch_args("phantom-spine-megre")
    assert fetch[3:] == ["models", "fetch", "phantom-spine-megre", "--progress", "json"]
    add = models_add_args("https://example.org/m.zip", sha256="ab" * 32)
    assert add[3:] == ["models", "add", "https://example.org/m.zip", "--sha256", "ab" * 32, "--progress", "json"]
    with pytest.raises(InvalidParameterError):
        models_fetch_args("")


def test_child_environment(tmp_path):
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/existing"}
    env = child_environment(base, python_paths=LIB_PATHS, device="cpu", cache_dir=tmp_path / "cache")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(p) for p in LIB_PATHS] + ["/existing"]
    assert env["CUDA_VISIBLE_DEVICES"] == "-1"
    assert env["SYNTHETICCT_HOME"] == str(tmp_path / "cache")
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/usr/bin"
    assert base == {"PATH": "/usr/bin", "PYTHONPATH": "/existing"}  # the caller's mapping is not changed
    assert "CUDA_VISIBLE_DEVICES" not in child_environment(base, device="auto")


@pytest.mark.parametrize("command", ["synthesize", "register", "compare", "models-fetch", "models-add"])
def test_built_arguments_parse_with_the_real_command_line(tmp_path, command):
    """The lists that the GUI builds are accepted by the real ``syntheticct`` parser (contract check)."""
    built = {
        "synthesize": lambda: synthesize_args(
            [tmp_path / "e1.nrrd", tmp_path / "e2.nrrd"],
            tmp_path / "sct.nrrd",
            model="default",
            device="cpu",
            uncertainty=tmp_path / "u.nrrd",
            dicom_out=tmp_path / "dcm",
        ),
        "register": lambda: register_args(
            tmp_path / "ct.nrrd",
            tmp_path / "sct.nrrd",
            tmp_path / "t.tfm",
            mode="bone-local",
            resampled=tmp_path / "r.nrrd",
            bone_labels=tmp_path / "b.nrrd",
            bone_threshold=150,
            initial_transform=tmp_path / "start.h5",
        ),
        "compare": lambda: compare_args(
            tmp_path / "ct.nrrd",
            tmp_path / "sct.nrrd",
            tmp_path / "out",
            transform=tmp_path / "t.tfm",
            bone_threshold=200,
            bone_labels=tmp_path / "b.nrrd",
            bone_transforms={1: tmp_path / "t.bone1.tfm"},
        ),
        "models-fetch": lambda: models_fetch_args("default"),
        "models-add": lambda: models_add_args(str(tmp_path / "m.zip"), sha256="0" * 64),
    }[command]()
    ns = _parse_with_cli(built[3:])
    assert ns.progress == "json"
    assert callable(ns.run)
    if command == "register":
        assert ns.mode == "bone-local" and ns.bone_threshold == 150.0 and ns.bone_labels == str(tmp_path / "b.nrrd")
        assert ns.initial_transform == str(tmp_path / "start.h5")
    if command == "compare":
        assert ns.bone_transform == [f"1={tmp_path / 't.bone1.tfm'}"] and ns.bone_threshold == 200.0


# ------------------------------------------------------------------------------------------------
# progress lines
# ------------------------------------------------------------------------------------------------


def test_progress_lines_round_trip_through_the_json_writer(tmp_path):
    out = tmp_path / "lines.txt"
    with out.open("w") as stream:
        report = JsonLinesProgress(stream)
        report(0.25, "inference", "patch 3/12")
        report(1.7, "done")  # clipped to 1
    parsed = [parse_progress_line(line) for line in out.read_text().splitlines()]
    assert parsed == [
        {"stage": "inference", "fraction": 0.25, "message": "patch 3/12"},
        {"stage": "done", "fraction": 1.0, "message": ""},
    ]
    for other in ["Wrote out.nii.gz", "{not json", json.dumps({"fraction": 0.1}), json.dumps([1, 2]), ""]:
        assert parse_progress_line(other) is None


# ------------------------------------------------------------------------------------------------
# real child processes
# ------------------------------------------------------------------------------------------------

PROGRESS_SCRIPT = textwrap.dedent("""
    import sys
    from SyntheticCTLib.kernel.progress import JsonLinesProgress
    report = JsonLinesProgress()
    for i in range(5):
        report(i / 4, "work", f"step {i + 1}/5")
    print("plain stdout line", flush=True)
    sys.stderr.write("a warning on stderr\\n")
    sys.exit(int(sys.argv[1]))
""")


def _wait_events(runner, timeout=30.0):
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += runner.poll()
        if events and events[-1].kind == "finished":
            return events
        time.sleep(0.01)
    raise AssertionError(f"no finished event after {timeout} s; got {events}")


def test_runner_collects_progress_logs_and_exit_code():
    env = child_environment(python_paths=LIB_PATHS)
    runner = ProcessRunner([PY, "-c", PROGRESS_SCRIPT, "0"], env=env).start()
    events = _wait_events(runner)
    progress = [e for e in events if e.kind == "progress"]
    assert [e.fraction for e in progress] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [e.message for e in progress] == [f"step {i}/5" for i in range(1, 6)]
    logs = [(e.stream, e.text) for e in events if e.kind == "log"]
    assert ("stdout", "plain stdout line") in logs and ("stderr", "a warning on stderr") in logs
    assert events[-1] == RunnerEvent("finished", returncode=0, cancelled=False)
    assert runner.finished and not runner.running and runner.returncode == 0
    assert runner.last_progress is not None and runner.last_progress.fraction == 1.0
    assert describe_event(progress[1]) == "[ 25.0%] work: step 2/5"


def test_runner_reports_failure_and_the_error_line():
    env = child_environment(python_paths=LIB_PATHS)
    code, events = run_to_completion([PY, "-c", PROGRESS_SCRIPT, "3"], env=env, timeout=30)
    assert code == 3 and events[-1].returncode == 3 and not events[-1].cancelled
    assert describe_event(events[-1]) == "Failed (exit code 3)."


def test_runner_with_the_real_command_line_error(tmp_path):
    """The real CLI: a missing model ends with exit code 1 and one clear stderr line naming it."""
    _, subs = _subparsers()
    assert "synthesize" in subs, "the 'synthesize' subcommand is missing from the command line"
    args = synthesize_args(
        [tmp_path / "mri.nii.gz"], tmp_path / "sct.nii.gz", model=str(tmp_path / "no-model.zip"), device="cpu"
    )
    runner = ProcessRunner(args, env=child_environment(python_paths=LIB_PATHS, device="cpu")).start()
    events = _wait_events(runner, timeout=120)
    assert events[-1].returncode == 1
    assert runner.error_message().startswith("syntheticct synthesize: error:")
    assert "no-model.zip" in runner.error_message()
    assert not (tmp_path / "sct.nii.gz").exists()


def test_runner_with_the_real_phantom_command(tmp_path):
    _, subs = _subparsers()
    assert "phantom" in subs, "the 'phantom' subcommand is missing from the command line"
    from SyntheticCTLib.apps.runner import base_command

    args = base_command() + [
        "phantom",
        str(tmp_path / "case"),
        "--seed",
        "3",
        "--size",
        "32",
        "32",
        "24",
        "--spacing",
        "3",
        "--progress",
        "json",
    ]
    code, events = run_to_completion(args, env=child_environment(python_paths=LIB_PATHS), timeout=120)
    assert code == 0, [e.text for e in events if e.stream == "stderr"]
    fractions = [e.fraction for e in events if e.kind == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert (tmp_path / "case" / "case.json").exists()


def test_poll_does_not_block_while_the_child_works():
    runner = ProcessRunner([PY, "-c", "import time; time.sleep(2)"]).start()
    try:
        t0 = time.monotonic()
        assert runner.poll() == []
        assert time.monotonic() - t0 < 0.5
        assert runner.running
    finally:
        runner.cancel()
        runner.wait(30)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False
    return True


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


TREE_SCRIPT = textwrap.dedent("""
    import signal, subprocess, sys, time
    ignore = sys.argv[1] == "ignore"
    grandchild = ("import signal, time\\n"
                  + ("signal.signal(signal.SIGINT, signal.SIG_IGN)\\n" if ignore else "")
                  + "time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", grandchild])
    if ignore:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("grandchild", p.pid, flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(os.name != "posix", reason="process groups are a POSIX feature; Windows uses a job object")
@pytest.mark.parametrize("behaviour", ["obey", "ignore"])
def test_cancel_kills_the_child_and_its_grandchild(behaviour):
    """Cancel reaches the whole tree, even processes that ignore the interrupt (killed after the grace)."""
    runner = ProcessRunner([PY, "-c", TREE_SCRIPT, behaviour], grace_s=0.5).start()
    child_pid = runner.pid
    grandchild_pid = None
    deadline = time.monotonic() + 30
    events = []
    while grandchild_pid is None and time.monotonic() < deadline:
        for e in runner.poll():
            events.append(e)
            if e.kind == "log" and e.text.startswith("grandchild "):
                grandchild_pid = int(e.text.split()[1])
        time.sleep(0.01)
    assert grandchild_pid is not None, events
    assert _alive(child_pid) and _alive(grandchild_pid)

    t0 = time.monotonic()
    runner.cancel()
    assert time.monotonic() - t0 < 0.2  # cancel() returns at once; the GUI keeps running
    events = _wait_events(runner, timeout=30)
    assert events[-1].kind == "finished" and events[-1].cancelled
    assert events[-1].returncode != 0
    assert describe_event(events[-1]) == "Cancelled."
    assert _wait_gone(child_pid) and _wait_gone(grandchild_pid)


def test_start_twice_and_bad_executable_are_errors(tmp_path):
    runner = ProcessRunner([PY, "-c", "pass"]).start()
    with pytest.raises(RuntimeError, match="already started"):
        runner.start()
    runner.wait(30)
    with pytest.raises(InvalidParameterError, match="Could not start"):
        ProcessRunner([str(tmp_path / "no-such-python"), "-c", "pass"]).start()
    with pytest.raises(InvalidParameterError):
        ProcessRunner([])


def test_child_job_calls_back_once_and_reports_the_error_line():
    env = child_environment(python_paths=LIB_PATHS)
    script = PROGRESS_SCRIPT.replace(
        'sys.stderr.write("a warning on stderr\\n")',
        'sys.stderr.write("syntheticct synthesize: error: no file at x.nrrd\\n")',
    )
    seen, finished = [], []
    job = ChildJob([PY, "-c", script, "1"], env=env, on_event=seen.append, on_finished=finished.append).start()
    result = job.wait(timeout=30)
    assert result == JobResult(1, False, "syntheticct synthesize: error: no file at x.nrrd")
    assert finished == [result] and not job.running and job.pump() is False
    assert [e.fraction for e in seen if e.kind == "progress"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert not result.ok and result.describe() == "syntheticct synthesize: error: no file at x.nrrd"
    ok = ChildJob([PY, "-c", "pass"]).start().wait(timeout=30)
    assert ok is not None and ok.ok and ok.describe() == "Done."


@pytest.mark.skipif(os.name != "posix", reason="process groups are a POSIX feature")
def test_child_job_cancel():
    finished = []
    job = ChildJob([PY, "-c", "import time; time.sleep(60)"], on_finished=finished.append, grace_s=0.5).start()
    assert job.pump() is True
    job.cancel()
    result = job.wait(timeout=30)
    assert result is not None and result.cancelled and not result.ok
    assert result.describe() == "Cancelled; nothing was changed."
    assert finished == [result]


class _Timer:
    """A GUI timer for JobSlot: callbacks run when the test calls fire(), as a Qt event loop would."""

    def __init__(self) -> None:
        self.pending: list = []
        self.delays: list = []

    def __call__(self, ms, callback) -> None:
        self.delays.append(ms)
        self.pending.append(callback)

    def fire(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self.pending.pop(0)()
            time.sleep(0.01)


def test_job_slot_polls_through_the_timer_passed_in_and_runs_one_job_at_a_time():
    timer = _Timer()
    slot = JobSlot(schedule=timer, poll_ms=25)
    events, finished = [], []
    env = child_environment(python_paths=LIB_PATHS)
    job = slot.start([PY, "-c", PROGRESS_SCRIPT, "0"], env=env, on_event=events.append, on_finished=finished.append)
    assert slot.is_running() and timer.pending and timer.delays == [25]
    with pytest.raises(JobBusyError, match="Another SyntheticCT job is running"):
        slot.start([PY, "-c", "pass"], wait=True)
    timer.fire()
    assert not slot.is_running() and not timer.pending
    assert finished == [job.result] and job.result.ok
    assert [e.fraction for e in events if e.kind == "progress"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(d == 25 for d in timer.delays)


def test_job_slot_cancels_the_child_when_a_callback_raises_and_needs_a_timer_to_not_wait():
    timer = _Timer()
    slot = JobSlot(schedule=timer, poll_ms=10)

    def broken(event):
        raise RuntimeError("GUI callback failed")

    finished = []
    slot.start(
        [PY, "-c", "import time; print('x', flush=True); time.sleep(60)"], on_event=broken, on_finished=finished.append
    )
    t0 = time.monotonic()
    timer.fire(timeout=30)
    assert finished and finished[0].cancelled and time.monotonic() - t0 < 20
    with pytest.raises(InvalidParameterError, match="schedule"):
        JobSlot().start([PY, "-c", "pass"])
    waited = JobSlot().start([PY, "-c", "pass"], wait=True)
    assert waited.result is not None and waited.result.ok


def test_find_python_library_path_and_packages():
    assert find_python((Path(PY).name, "python3")) and Path(find_python((Path(PY).name,))).exists()
    with pytest.raises(InvalidParameterError, match="NoSuchPythonSlicer was not found"):
        find_python(("NoSuchPythonSlicer",))
    assert (Path(library_path()) / "SyntheticCTLib" / "__init__.py").is_file()
    assert missing_packages({"json": "json", "no_such_module_x": "no-such-module-x>=1"}) == ["no-such-module-x>=1"]
    installed = []
    assert ensure_packages({"json": "json"}) is True
    assert ensure_packages({"no_such_module_x": "nsm"}) is False  # no installer: nothing installed, no prompt
    assert ensure_packages({"no_such_module_x": "nsm"}, install=installed.append, confirm=lambda m: False) is False
    assert installed == []
    assert ensure_packages({"no_such_module_x": "nsm"}, install=installed.append) is False  # still missing after
    assert installed == [["nsm"]]
