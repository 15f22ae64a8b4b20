"""Run the ``syntheticct`` command line in a child process, for a GUI that must not freeze.

Two parts, both free of Qt and Slicer:

- argument builders (:func:`synthesize_args`, :func:`register_args`, :func:`compare_args`,
  :func:`models_fetch_args`, :func:`models_add_args`) that return the list of arguments for
  ``python -m SyntheticCTLib <command> ... --progress json``;
- :class:`ProcessRunner`, which starts that command with :class:`subprocess.Popen` (list arguments,
  never a shell) in a new process group, reads its stdout and stderr on two reader threads into a
  queue, and turns each line into a :class:`RunnerEvent`. The GUI drains the queue with
  :meth:`ProcessRunner.poll` from its own timer (``qt.QTimer`` in Slicer), so nothing blocks;
- :class:`JobSlot`, the one job helper of both Slicer modules: at most one :class:`ChildJob` at a
  time, started with the command line found by :func:`find_python` and the environment of
  :func:`child_environment`, pumped by a timer that the GUI passes in (``schedule(ms, callback)``);
  :func:`missing_packages` and :func:`ensure_packages` check and install the child's packages through
  an installer the GUI passes in.

:meth:`ProcessRunner.cancel` stops the whole process tree: on POSIX it signals the child's process
group (SIGINT first, so the command line removes its partial output, then SIGKILL after a grace
period, which also reaches grandchildren). On Windows the child starts in a new process group and,
where the Windows API allows it, inside a job object whose termination ends every process in the
tree (the ``PythonSlicer`` launcher and the Python it starts); otherwise the child is terminated.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

from SyntheticCTLib.kernel.devices import check_device
from SyntheticCTLib.kernel.errors import InvalidParameterError
from SyntheticCTLib.kernel.progress import parse_progress_line
from SyntheticCTLib.kernel.types import PathLike
from SyntheticCTLib.registration import MODES

logger = logging.getLogger(__name__)


CLI_MODULE = "SyntheticCTLib"
"""``python -m SyntheticCTLib`` runs the ``syntheticct`` command line."""
REGISTRATION_MODES = MODES
EXIT_CANCELLED = 130

# --------------------------------------------------------------------------------------------------
# Argument lists
# --------------------------------------------------------------------------------------------------


def base_command(python: Optional[PathLike] = None) -> List[str]:
    """``[python, "-m", "SyntheticCTLib"]``; ``python`` defaults to the running interpreter.

    In Slicer, pass ``shutil.which("PythonSlicer")``.
    """
    executable = str(python) if python else sys.executable
    if not executable:
        raise InvalidParameterError("No Python executable to run the syntheticct command line.")
    return [executable, "-m", CLI_MODULE]


def _path(value: PathLike, what: str) -> str:
    text = os.fspath(value)
    if not text:
        raise InvalidParameterError(f"{what} is an empty path.")
    return text


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise InvalidParameterError(f"{what} must be one of {', '.join(choices)} (got {value!r}).")
    return value


def synthesize_args(
    inputs: Sequence[PathLike],
    output: PathLike,
    *,
    model: str = "default",
    device: str = "auto",
    uncertainty: Optional[PathLike] = None,
    dicom_out: Optional[PathLike] = None,
    python: Optional[PathLike] = None,
) -> List[str]:
    """Arguments for ``syntheticct synthesize -i MRI [-i MRI2 ...] -o SCT --model M --device D --progress json``."""
    if not inputs:
        raise InvalidParameterError("synthesize needs at least one input MRI volume.")
    if not str(model).strip():
        raise InvalidParameterError("synthesize needs a model name or path.")
    args = base_command(python) + ["synthesize"]
    for i, path in enumerate(inputs):
        args += ["-i", _path(path, f"Input {i + 1}")]
    args += ["-o", _path(output, "The output"), "--model", str(model), "--device", check_device(device)]
    if uncertainty is not None:
        args += ["--uncertainty", _path(uncertainty, "The uncertainty output")]
    if dicom_out is not None:
        args += ["--dicom-out", _path(dicom_out, "The DICOM output folder")]
    return args + ["--progress", "json"]


def register_args(
    fixed: PathLike,
    moving: PathLike,
    transform: PathLike,
    *,
    mode: str = "rigid",
    resampled: Optional[PathLike] = None,
    fixed_mask: Optional[PathLike] = None,
    moving_mask: Optional[PathLike] = None,
    bone_labels: Optional[PathLike] = None,
    bone_threshold: Optional[float] = None,
    initial_transform: Optional[PathLike] = None,
    python: Optional[PathLike] = None,
) -> List[str]:
    """Arguments for ``syntheticct register --fixed CT --moving IMG -o T.tfm --mode M --progress json``.

    The command writes a JSON summary beside the transform (``T.tfm.json``) and, in bone-local mode,
    one transform per bone (``T.bone<label>.tfm``).
    """
    args = base_command(python) + [
        "register",
        "--fixed",
        _path(fixed, "The fixed image"),
        "--moving",
        _path(moving, "The moving image"),
        "-o",
        _path(transform, "The transform"),
    ]
    args += ["--mode", _choice(mode, REGISTRATION_MODES, "mode")]
    if resampled is not None:
        args += ["--resampled", _path(resampled, "The resampled output")]
    if fixed_mask is not None:
        args += ["--fixed-mask", _path(fixed_mask, "The fixed mask")]
    if moving_mask is not None:
        args += ["--moving-mask", _path(moving_mask, "The moving mask")]
    if bone_labels is not None:
        args += ["--bone-labels", _path(bone_labels, "The bone label map")]
    if bone_threshold is not None:
        args += ["--bone-threshold", _hu(bone_threshold)]
    if initial_transform is not None:
        args += ["--initial-transform", _path(initial_transform, "The initial transform")]
    return args + ["--progress", "json"]


def _hu(value: float) -> str:
    number = float(value)
    if not math.isfinite(number):
        raise InvalidParameterError(f"The bone threshold must be a finite HU value (got {value!r}).")
    return f"{number:g}"


def compare_args(
    reference: PathLike,
    synthetic: PathLike,
    out_dir: PathLike,
    *,
    transform: Optional[PathLike] = None,
    bone_threshold: Optional[float] = None,
    bone_labels: Optional[PathLike] = None,
    bone_transforms: Optional[Mapping[int, PathLike]] = None,
    uncertainty: Optional[PathLike] = None,
    python: Optional[PathLike] = None,
) -> List[str]:
    """Arguments for ``syntheticct compare --reference CT --synthetic SCT -o OUT_DIR --progress json``.

    ``bone_transforms`` maps a bone label to its transform file (bone-local registration); it needs
    ``bone_labels``. ``uncertainty`` is the sCT's spread map (``--uncertainty``).
    """
    args = base_command(python) + [
        "compare",
        "--reference",
        _path(reference, "The reference CT"),
        "--synthetic",
        _path(synthetic, "The synthetic CT"),
    ]
    if transform is not None:
        args += ["--transform", _path(transform, "The transform")]
    if bone_threshold is not None:
        args += ["--bone-threshold", _hu(bone_threshold)]
    if bone_labels is not None:
        args += ["--bone-labels", _path(bone_labels, "The bone label map")]
    if bone_transforms:
        if bone_labels is None:
            raise InvalidParameterError("Per-bone transforms need the bone label map (bone_labels).")
        for label, path in sorted(bone_transforms.items()):
            if int(label) < 1:
                raise InvalidParameterError(f"Bone labels are positive integers (got {label!r}).")
            args += ["--bone-transform", f"{int(label)}={_path(path, 'A bone transform')}"]
    if uncertainty is not None:
        args += ["--uncertainty", _path(uncertainty, "The spread map")]
    return args + ["-o", _path(out_dir, "The output folder"), "--progress", "json"]


def models_fetch_args(name: str, *, python: Optional[PathLike] = None) -> List[str]:
    """Arguments for ``syntheticct models fetch NAME --progress json`` (download and verify a catalog model)."""
    if not str(name).strip():
        raise InvalidParameterError("models fetch needs a model name.")
    return base_command(python) + ["models", "fetch", str(name), "--progress", "json"]


def models_add_args(
    source: str, *, sha256: Optional[str] = None, name: Optional[str] = None, python: Optional[PathLike] = None
) -> List[str]:
    """Arguments for ``syntheticct models add SOURCE [--sha256 HEX] [--name N] --progress json`` (URL, file, folder)."""
    if not str(source).strip():
        raise InvalidParameterError("models add needs a URL, a .zip file or a model folder.")
    args = base_command(python) + ["models", "add", str(source)]
    if sha256:
        args += ["--sha256", str(sha256)]
    if name:
        args += ["--name", str(name)]
    return args + ["--progress", "json"]


def child_environment(
    base: Optional[Mapping[str, str]] = None,
    *,
    python_paths: Sequence[PathLike] = (),
    device: str = "auto",
    cache_dir: Optional[PathLike] = None,
) -> Dict[str, str]:
    """The environment for the child: ``base`` (default: this process's) plus what the command needs.

    ``python_paths`` are prepended to ``PYTHONPATH`` (in Slicer: the module folders holding
    ``SyntheticCTLib``). ``device="cpu"`` hides every GPU
    (``CUDA_VISIBLE_DEVICES=-1``). ``cache_dir`` becomes ``SYNTHETICCT_HOME``. Output is unbuffered
    UTF-8 so that progress lines arrive as they are written.
    """
    env = dict(os.environ if base is None else base)
    paths = [os.fspath(p) for p in python_paths]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    if check_device(device) == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    if cache_dir is not None and os.fspath(cache_dir):
        env["SYNTHETICCT_HOME"] = os.fspath(cache_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerEvent:
    """One thing that happened in the child process.

    ``kind`` is ``"progress"`` (``fraction``, ``stage``, ``message`` set), ``"log"`` (a line of
    output: ``text``, and ``stream`` ``"stdout"`` or ``"stderr"``) or ``"finished"``
    (``returncode``; ``cancelled`` tells whether :meth:`ProcessRunner.cancel` stopped it).
    """

    kind: str
    text: str = ""
    stream: str = ""
    fraction: Optional[float] = None
    stage: str = ""
    message: str = ""
    returncode: Optional[int] = None
    cancelled: bool = False


class ProcessRunner:
    """Run one command in a child process and collect its progress lines, without blocking.

    Parameters
    ----------
    args
        The command and its arguments (a list; no shell is involved).
    env
        The child's whole environment (default: this process's).
    cwd
        The child's working folder.
    grace_s
        After :meth:`cancel`, how long the child may take to clean up before it is killed.

    Examples
    --------
    >>> runner = ProcessRunner([sys.executable, "-c", "print('hello')"])  # doctest: +SKIP
    >>> runner.start(); runner.wait(); [e.text for e in runner.poll() if e.kind == "log"]  # doctest: +SKIP
    ['hello']
    """

    def __init__(
        self,
        args: Sequence[PathLike],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[PathLike] = None,
        grace_s: float = 3.0,
    ) -> None:
        if not args:
            raise InvalidParameterError("ProcessRunner needs a command to run.")
        self.args = [os.fspath(a) for a in args]
        self.env = None if env is None else dict(env)
        self.cwd = None if cwd is None else os.fspath(cwd)
        self.grace_s = float(grace_s)
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self.last_progress: Optional[RunnerEvent] = None
        self.stderr_tail: Deque[str] = collections.deque(maxlen=50)
        self._queue: queue.Queue[RunnerEvent] = queue.Queue()
        self._threads: List[threading.Thread] = []
        self._finished = threading.Event()
        self._cancelled = threading.Event()
        self._job: Any = None

    # -- state ------------------------------------------------------------------------------------
    @property
    def pid(self) -> Optional[int]:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the ``finished`` event was queued."""
        return self.proc is not None and not self._finished.is_set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def error_message(self) -> str:
        """The child's last error line (``syntheticct ...: error: ...``), else its last stderr line."""
        lines = [line for line in self.stderr_tail if line.strip()]
        for line in reversed(lines):
            if "error:" in line or line.startswith("syntheticct"):
                return line.strip()
        return lines[-1].strip() if lines else ""

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> ProcessRunner:
        """Start the child and its reader threads; return self."""
        if self.proc is not None:
            raise RuntimeError("This ProcessRunner was already started; make a new one.")
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":
            flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)
            info = subprocess.STARTUPINFO()
            info.dwFlags |= getattr(subprocess, "STARTF_USESHOWWINDOW", 1)
            info.wShowWindow = 0  # SW_HIDE, as slicer.util.launchConsoleProcess does
            kwargs.update(creationflags=flags, startupinfo=info)
        else:
            kwargs["start_new_session"] = True  # own process group: cancel reaches grandchildren
        logger.debug("Starting: %s", subprocess.list2cmdline(self.args))
        try:
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                shell=False,
                **kwargs,
            )
        except OSError as e:
            raise InvalidParameterError(f"Could not start '{self.args[0]}': {e.strerror or e}.") from e
        if os.name == "nt":
            self._job = _WindowsJob.attach(self.proc)
        readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, "stderr"), daemon=True),
        ]
        for t in readers:
            t.start()
        waiter = threading.Thread(target=self._wait_and_finish, args=(readers,), daemon=True)
        waiter.start()
        self._threads = readers + [waiter]
        return self

    def _read(self, stream, name: str) -> None:
        try:
            for line in iter(stream.readline, ""):
                line = line.rstrip("\r\n")
                progress = parse_progress_line(line) if name == "stdout" else None
                if progress is not None:
                    self._queue.put(
                        RunnerEvent(
                            "progress",
                            text=line,
                            stream=name,
                            fraction=progress["fraction"],
                            stage=progress["stage"],
                            message=progress["message"],
                        )
                    )
                else:
                    if name == "stderr":
                        self.stderr_tail.append(line)
                    self._queue.put(RunnerEvent("log", text=line, stream=name))
        except (OSError, ValueError):  # pipe closed under us (process killed)
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass

    def _wait_and_finish(self, readers: List[threading.Thread]) -> None:
        assert self.proc is not None
        for t in readers:
            t.join()
        code = self.proc.wait()
        self.returncode = code
        if self._job is not None:
            self._job.close()
        self._queue.put(RunnerEvent("finished", returncode=code, cancelled=self.cancelled))
        self._finished.set()

    # -- reading ----------------------------------------------------------------------------------
    def poll(self, max_events: Optional[int] = None) -> List[RunnerEvent]:
        """Return the events queued since the last call, without waiting (call it from a GUI timer)."""
        events: List[RunnerEvent] = []
        while max_events is None or len(events) < max_events:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event.kind == "progress":
                self.last_progress = event
            events.append(event)
        return events

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the child and its readers are done; return the exit code (None on timeout)."""
        if self.proc is None:
            raise RuntimeError("The process was not started.")
        if not self._finished.wait(timeout):
            return None
        return self.returncode

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the child and every process it started. Returns at once; a ``finished`` event follows.

        The child first gets an interrupt (the command line then removes its partial outputs and
        exits with code 130); whatever is left of its process group after ``grace_s`` is killed.
        """
        if self.proc is None or self._cancelled.is_set():
            return
        self._cancelled.set()
        if os.name == "nt":
            self._cancel_windows()
        else:
            _signal_group(self.proc.pid, signal.SIGINT)
            threading.Thread(target=self._escalate_posix, daemon=True).start()

    def _escalate_posix(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        # Kill whatever is left of the group, the child itself if it ignored the interrupt and any
        # grandchild that outlived it. The group id cannot be reused while a member is alive.
        _signal_group(self.proc.pid, signal.SIGKILL)

    def _cancel_windows(self) -> None:  # pragma: no cover - exercised on Windows only
        assert self.proc is not None
        if self._job is not None and self._job.terminate(EXIT_CANCELLED):
            return
        try:
            self.proc.terminate()
        except OSError:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _WindowsJob:  # pragma: no cover - Windows only
    """A Windows job object holding the child, so that the whole tree can be terminated at once."""

    def __init__(self, handle: int, kernel32: Any) -> None:
        self.handle = handle
        self.kernel32 = kernel32

    @classmethod
    def attach(cls, proc: subprocess.Popen) -> Optional[_WindowsJob]:
        try:
            import ctypes

            kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
            kernel32.CreateJobObjectW.restype = ctypes.c_void_p
            kernel32.AssignProcessToJobObject.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            kernel32.TerminateJobObject.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            kernel32.CloseHandle.argtypes = [ctypes.c_void_p]
            handle = kernel32.CreateJobObjectW(None, None)
            if not handle:
                return None
            if not kernel32.AssignProcessToJobObject(handle, ctypes.c_void_p(int(proc._handle))):  # noqa: SLF001
                kernel32.CloseHandle(handle)
                return None
            return cls(handle, kernel32)
        except (OSError, AttributeError, ValueError) as e:
            logger.debug("No job object for the child process (%s); cancel terminates the child only.", e)
            return None

    def terminate(self, code: int) -> bool:
        try:
            return bool(self.kernel32.TerminateJobObject(self.handle, code))
        except OSError:
            return False

    def close(self) -> None:
        if self.handle:
            try:
                self.kernel32.CloseHandle(self.handle)
            except OSError:
                pass
            self.handle = None


@dataclass(frozen=True)
class JobResult:
    """How a :class:`ChildJob` ended: ``returncode``, whether it was ``cancelled``, and the child's error line."""

    returncode: int
    cancelled: bool
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.cancelled

    def describe(self) -> str:
        """Plain words for a status line."""
        if self.cancelled:
            return "Cancelled; nothing was changed."
        if self.returncode == 0:
            return "Done."
        return self.error or f"The command failed (exit code {self.returncode})."


class ChildJob:
    """A :class:`ProcessRunner` with callbacks, pumped from a GUI timer.

    ``on_event(event)`` receives each progress and log event; ``on_finished(result)`` is called once,
    with a :class:`JobResult`, when the child is done. :meth:`pump` drains the queued events and
    returns True while the job still runs, so a GUI calls it from a timer until it returns False::

        job = ChildJob(args, env=env, on_event=show, on_finished=done).start()
        def poll():
            if job.pump():
                qt.QTimer.singleShot(100, poll)
        poll()
    """

    def __init__(
        self,
        args: Sequence[PathLike],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[PathLike] = None,
        on_event=None,
        on_finished=None,
        grace_s: float = 3.0,
    ) -> None:
        self.runner = ProcessRunner(args, env=env, cwd=cwd, grace_s=grace_s)
        self.on_event = on_event
        self.on_finished = on_finished
        self.result: Optional[JobResult] = None

    def start(self) -> ChildJob:
        self.runner.start()
        return self

    @property
    def running(self) -> bool:
        return self.result is None

    def cancel(self) -> None:
        self.runner.cancel()

    def pump(self) -> bool:
        """Handle the queued events; return True while the job runs (call again later).

        Events are taken one at a time, so that a callback that raises loses no later event (the
        ``finished`` one above all).
        """
        if self.result is not None:
            return False
        while True:
            events = self.runner.poll(max_events=1)
            if not events:
                return True
            event = events[0]
            if event.kind == "finished":
                code = event.returncode if event.returncode is not None else -1
                self.result = JobResult(code, event.cancelled, "" if event.cancelled else self.runner.error_message())
                if self.on_finished is not None:
                    self.on_finished(self.result)
                return False
            if self.on_event is not None:
                self.on_event(event)

    def wait(self, timeout: Optional[float] = None, *, interval: float = 0.02, idle=None) -> Optional[JobResult]:
        """Pump until the job ends (or ``timeout``); ``idle()`` runs between pumps (e.g. processEvents)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pump():
            if deadline is not None and time.monotonic() > deadline:
                return None
            if idle is not None:
                idle()
            time.sleep(interval)
        return self.result


def run_to_completion(
    args: Sequence[PathLike],
    *,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[PathLike] = None,
    timeout: Optional[float] = None,
) -> tuple[int, List[RunnerEvent]]:
    """Run ``args`` with a :class:`ProcessRunner` and wait; return ``(exit code, all events)``.

    On timeout the process tree is cancelled and the exit code is the one it ended with.
    """
    runner = ProcessRunner(args, env=env, cwd=cwd).start()
    code = runner.wait(timeout)
    if code is None:
        runner.cancel()
        code = runner.wait()
    assert code is not None
    return code, runner.poll()


Schedule = Callable[[int, Callable[[], None]], Any]
"""``schedule(milliseconds, callback)`` calls ``callback`` once, later, on the GUI thread (``qt.QTimer.singleShot``)."""


class JobBusyError(InvalidParameterError):
    """A job was started while another one still runs."""


class JobSlot:
    """At most one :class:`ChildJob` at a time for a GUI, pumped by a timer passed in; free of Qt.

    Both Slicer modules keep one slot in their Logic. ``schedule`` (``qt.QTimer.singleShot`` in
    Slicer, set by the widget) runs the poll loop; :meth:`start` with ``wait=True`` pumps in place
    instead (self-tests, scripts). A callback that raises while events are handled cancels the job,
    so that a broken GUI never leaves an orphan child.
    """

    def __init__(self, *, schedule: Optional[Schedule] = None, poll_ms: int = 100, label: str = "SyntheticCT") -> None:
        self.schedule = schedule
        self.poll_ms = int(poll_ms)
        self.label = label
        self.job: Optional[ChildJob] = None

    def is_running(self) -> bool:
        """True while the last job started has not finished."""
        return self.job is not None and self.job.running

    def cancel(self) -> None:
        """Stop the running job's whole process tree (a ``finished`` event follows); no-op when idle."""
        if self.job is not None and self.job.running:
            self.job.cancel()

    def start(
        self,
        args: Sequence[PathLike],
        *,
        env: Optional[Mapping[str, str]] = None,
        on_event=None,
        on_finished=None,
        wait: bool = False,
        idle=None,
        timeout: Optional[float] = None,
    ) -> ChildJob:
        """Start ``args``; pump it through ``schedule`` (or in place with ``wait``); return the job."""
        if self.is_running():
            raise JobBusyError(f"Another {self.label} job is running; wait for it or cancel it.")
        if not wait and self.schedule is None:
            raise InvalidParameterError("JobSlot needs a schedule(ms, callback) to poll without waiting.")
        logger.info("%s: running %s", self.label, subprocess.list2cmdline([os.fspath(a) for a in args]))
        job = ChildJob(args, env=env, on_event=on_event, on_finished=on_finished).start()
        self.job = job
        if wait:
            if job.wait(timeout, idle=idle) is None:
                job.cancel()
                job.wait(idle=idle)
        else:
            self._later(job)
        return job

    def _later(self, job: ChildJob) -> None:
        assert self.schedule is not None
        self.schedule(self.poll_ms, lambda: self._poll(job))

    def _poll(self, job: ChildJob) -> None:
        try:
            running = job.pump()
        except Exception:  # a GUI callback failed: stop the child rather than leave it running unseen
            logger.exception("%s: error while handling the child process's output", self.label)
            job.cancel()
            running = job.result is None
        if running:
            self._later(job)


def find_python(names: Sequence[str] = ("PythonSlicer",)) -> str:
    """The first of ``names`` on ``PATH`` (Slicer's ``PythonSlicer`` launcher); a clear error otherwise."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise InvalidParameterError(f"{' or '.join(names)} was not found on PATH; cannot start the child process.")


def library_path() -> str:
    """The folder holding the ``SyntheticCTLib`` package, for the child's ``PYTHONPATH``."""
    return str(Path(__file__).resolve().parents[2])


def missing_packages(packages: Mapping[str, str]) -> List[str]:
    """The requirements of ``packages`` (``{import name: requirement}``) whose module cannot be found."""
    importlib.invalidate_caches()
    return [req for name, req in packages.items() if importlib.util.find_spec(name) is None]


def ensure_packages(
    packages: Mapping[str, str],
    *,
    install: Optional[Callable[[List[str]], Any]] = None,
    confirm: Optional[Callable[[List[str]], bool]] = None,
) -> bool:
    """True when every module of ``packages`` is importable, after ``install(missing)`` if needed.

    Without ``install`` nothing is installed (a self-test on an offline build then skips). ``confirm``
    is asked first when given; False declines.
    """
    missing = missing_packages(packages)
    if not missing:
        return True
    if install is None or (confirm is not None and not confirm(missing)):
        return False
    install(missing)
    return not missing_packages(packages)


def describe_event(event: RunnerEvent) -> str:
    """A one-line text for a log box."""
    if event.kind == "progress":
        pct = 100.0 * (event.fraction or 0.0)
        return f"[{pct:5.1f}%] {event.stage}" + (f": {event.message}" if event.message else "")
    if event.kind == "finished":
        if event.cancelled:
            return "Cancelled."
        return "Finished." if event.returncode == 0 else f"Failed (exit code {event.returncode})."
    return event.text


def output_path(work_dir: PathLike, name: str) -> Path:
    """A path for a child's output file inside ``work_dir`` (created if needed)."""
    folder = Path(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
