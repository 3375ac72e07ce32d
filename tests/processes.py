"""Subprocesses in tests, with time limits scaled to how fast this machine starts Python now.

A loaded machine starts an interpreter slowly and runs everything after it slowly too, so a
fixed limit fails a test that was only waiting its turn. Each limit here is

    max(floor, STARTUP_ALLOWANCE * starts * startup + WORK_ALLOWANCE * work * slowdown)

where ``startup`` is the wall time of ``python -c "import torch, ribbed"``, measured once per
test process (the first time a limit is asked for), ``slowdown`` is that over
:data:`QUIET_STARTUP_S`, ``starts`` counts the interpreters the wait covers and ``work`` is what
they do after starting, in seconds on a quiet machine. The floor is the fixed limit these tests
had before: a quiet machine waits as long as it always did, a busy one longer. A limit that
runs out names the measured start-up and the limit it used.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

STARTUP_PROBE = "import torch, ribbed"
QUIET_STARTUP_S = 2.0
"""The probe on a quiet 2-core machine (measured 1.8 s to 2.3 s)."""
STARTUP_ALLOWANCE = 10.0
"""Start-ups a limit allows per interpreter: ``python -m ribbed run`` imports the training stack,
about three times the probe, and three times that again for a machine that turns busy later."""
WORK_ALLOWANCE = 3.0


@functools.cache
def startup_s() -> float:
    """Seconds this machine takes now to start Python and import torch and ribbed."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", STARTUP_PROBE], check=True, capture_output=True)
    return time.perf_counter() - started


@dataclass(frozen=True)
class Limit:
    """A time limit and how it was reached."""

    seconds: float
    floor_s: float
    starts: int
    work_s: float
    startup_s: float

    def __str__(self) -> str:
        return (f"{self.seconds:.3g} s (the larger of the {self.floor_s:.3g}-s floor and {STARTUP_ALLOWANCE:g} x "
                f"{self.starts} start-up(s) of {self.startup_s:.1f} s measured + {WORK_ALLOWANCE:g} x "
                f"{self.work_s:g} s of work x {max(1.0, self.startup_s / QUIET_STARTUP_S):.2f} slowdown)")


def limit(floor_s: float, *, starts: int = 1, work_s: float = 0.0) -> Limit:
    """The time allowed for ``starts`` interpreters to start and do ``work_s`` seconds of work."""
    startup = startup_s()
    slowdown = max(1.0, startup / QUIET_STARTUP_S)
    scaled = STARTUP_ALLOWANCE * starts * startup + WORK_ALLOWANCE * work_s * slowdown
    return Limit(max(floor_s, scaled), floor_s, starts, work_s, startup)


def run(args: Sequence[str], allowed: Limit, **options) -> subprocess.CompletedProcess:
    """``subprocess.run(args)`` with text output captured; a test failure once ``allowed`` runs out."""
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=allowed.seconds, **options)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"{_shown(args)} still running after {allowed}; output so far:\n{_text(expired.output)[-4000:]}")


def finish(process: subprocess.Popen, allowed: Limit) -> str:
    """Wait for ``process`` (reading its output, so a full pipe cannot stall it) and return that output;
    kill it and fail the test once ``allowed`` runs out."""
    try:
        output, _ = process.communicate(timeout=allowed.seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{_shown(process.args)} still running after {allowed}; its output:\n{_text(output)[-4000:]}")
    return _text(output)


class Deadline:
    """A polling loop's end: ``check`` fails the test once ``allowed`` has passed since it was made."""

    def __init__(self, what: str, allowed: Limit):
        self.what, self.allowed = what, allowed
        self.end = time.monotonic() + allowed.seconds

    def check(self, process: subprocess.Popen | None = None) -> None:
        """Fail if ``process`` has exited (with its output) or the time is up (killing ``process``)."""
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"{_shown(process.args)} exited with {process.returncode} before {self.what}:\n"
                        f"{_text(output)[-4000:]}")
        if time.monotonic() > self.end:
            if process is not None:
                process.kill()
            pytest.fail(f"no {self.what} after {self.allowed}")


def _shown(args) -> str:
    return " ".join(str(arg) for arg in args) if isinstance(args, (list, tuple)) else str(args)


def _text(output) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output
