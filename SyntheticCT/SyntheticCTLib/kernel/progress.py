"""Progress and cancellation: one callback shape and one cancel mechanism for the whole library.

The library reports progress through a :class:`ProgressCallback`, ``report(fraction, stage,
message="")``, with ``fraction`` in [0, 1]. Work is cancelled in one way: a :class:`CancelToken`,
which :func:`with_cancel` checks at every progress update (it raises
:class:`~SyntheticCTLib.kernel.errors.Cancelled` through the callback, so every loop that reports
progress is a cancellation point). Byte counts (downloads) are adapted to fractions at their edge
with :func:`bytes_progress`. The command line turns the callback into a tqdm bar, JSON lines on
stdout (for the Slicer GUI, which runs the command line as a child process), or nothing.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Callable, List, Optional, TextIO

from SyntheticCTLib.kernel.errors import Cancelled

try:  # Python >= 3.8
    from typing import Protocol
except ImportError:  # pragma: no cover - Python 3.7 is not supported; kept for type checkers only
    Protocol = object  # type: ignore[assignment]


class ProgressCallback(Protocol):
    """``report(fraction, stage="", message="")``: ``fraction`` in [0, 1] of the whole task.

    ``stage`` names the step (e.g. ``"inference"``); ``message`` is a short human-readable detail.
    A callback may raise :class:`~SyntheticCTLib.kernel.errors.Cancelled` (see :func:`with_cancel`).
    """

    def __call__(self, fraction: float, stage: str = "", message: str = "") -> None: ...


def no_progress(fraction: float, stage: str = "", message: str = "") -> None:
    """A progress callback that ignores every update."""


def scaled(report: Optional[ProgressCallback], start: float, stop: float) -> ProgressCallback:
    """Map a sub-task's [0, 1] progress onto ``[start, stop]`` of the parent's progress."""
    parent = report or no_progress

    def _report(fraction: float, stage: str = "", message: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        parent(start + (stop - start) * fraction, stage, message)

    return _report


class CancelToken:
    """A thread-safe flag; :meth:`check` raises :class:`Cancelled` once :meth:`cancel` was called."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("The operation was cancelled.")


def with_cancel(report: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> ProgressCallback:
    """Wrap ``report`` so that every update first checks ``cancel``."""
    parent = report or no_progress
    if cancel is None:
        return parent

    def _report(fraction: float, stage: str = "", message: str = "") -> None:
        cancel.check()
        parent(fraction, stage, message)

    return _report


def bytes_progress(
    report: Optional[ProgressCallback], label: str = "", stage: str = "download"
) -> Callable[[int, Optional[int]], None]:
    """Adapt ``report`` to a byte counter ``(done, total)``: a fraction when the total is known, MB always."""
    parent = report or no_progress
    prefix = f"{label}: " if label else ""
    started: List[float] = []

    def _bytes(done: int, total: Optional[int]) -> None:
        now = time.monotonic()
        if not started:
            started.append(now)
        elapsed = now - started[0]
        rate = f", {done / 1e6 / elapsed:.1f} MB/s" if elapsed > 0.5 and done else ""
        if total:
            parent(min(done / total, 1.0), stage, f"{prefix}{done / 1e6:.1f} / {total / 1e6:.1f} MB{rate}")
        else:
            parent(0.0, stage, f"{prefix}{done / 1e6:.1f} MB{rate}")

    return _bytes


class JsonLinesProgress:
    """Write each update as one flushed JSON object a line: ``{"stage", "fraction", "message"}``."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream

    def __call__(self, fraction: float, stage: str = "", message: str = "") -> None:
        stream = self.stream or sys.stdout
        line = {"stage": stage, "fraction": round(min(max(float(fraction), 0.0), 1.0), 4), "message": message}
        stream.write(json.dumps(line) + "\n")
        stream.flush()

    def close(self) -> None:
        pass


class TqdmProgress:
    """A tqdm bar on stderr, one bar per stage, in percent (the message carries units such as MB/s)."""

    BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"

    def __init__(self) -> None:
        self._bar = None
        self._stage: Optional[str] = None

    def __call__(self, fraction: float, stage: str = "", message: str = "") -> None:
        from tqdm.auto import tqdm  # lazy: tqdm is for the command line only

        if stage != self._stage or self._bar is None:
            self.close()
            self._bar = tqdm(total=1000, desc=stage or "working", bar_format=self.BAR_FORMAT, file=sys.stderr)
            self._stage = stage
        target = int(round(min(max(float(fraction), 0.0), 1.0) * 1000))
        self._bar.n = target
        if message:
            self._bar.set_postfix_str(message, refresh=False)
        self._bar.refresh()

    def write(self, text: str) -> None:
        """Write a line above the bar (the bar is redrawn below it), never onto it."""
        if self._bar is None:
            sys.stderr.write(text + "\n")
            return
        self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def parse_progress_line(line: str) -> Optional[dict]:
    """Parse one line of ``--progress json`` output; return None for any other line.

    Used by the Slicer modules, which read a child process's stdout.
    """
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or "fraction" not in obj or "stage" not in obj:
        return None
    try:
        fraction = float(obj["fraction"])
    except (TypeError, ValueError):
        return None
    return {
        "stage": str(obj["stage"]),
        "fraction": min(max(fraction, 0.0), 1.0),
        "message": str(obj.get("message", "")),
    }
