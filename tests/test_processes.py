"""The tests' subprocess time limits (``tests/processes.py``): never below their floor, longer on a
slow machine, and a limit that runs out says what it measured and allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import processes

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def startup(monkeypatch):
    """Pretend the start-up probe measured ``seconds``."""
    def measured(seconds: float) -> None:
        monkeypatch.setattr(processes, "startup_s", lambda: seconds)
    return measured


def test_a_quiet_machine_gets_the_floor_and_a_busy_one_more(startup):
    startup(processes.QUIET_STARTUP_S)
    assert processes.limit(300, starts=1, work_s=5).seconds == 300
    startup(10 * processes.QUIET_STARTUP_S)  # five times slower than quiet
    busy = processes.limit(300, starts=2, work_s=5)
    assert busy.seconds == processes.STARTUP_ALLOWANCE * 2 * 20 + processes.WORK_ALLOWANCE * 5 * 10 > 300
    assert processes.limit(600, starts=2, work_s=5).seconds == 600  # never below the floor


def test_a_limit_that_runs_out_names_the_start_up_and_the_limit(startup):
    startup(0.01)
    allowed = processes.limit(0.5)
    with pytest.raises(pytest.fail.Exception, match=r"still running after 0.5 s \(the larger of the 0.5-s floor and "
                                                    r"10 x 1 start-up\(s\) of 0\.0 s measured"):
        processes.run(SLEEPER, allowed)
    process = subprocess.Popen(SLEEPER, stdout=subprocess.PIPE, text=True)
    with pytest.raises(pytest.fail.Exception, match="still running after 0.5 s"):
        processes.finish(process, allowed)
    assert process.poll() is not None  # killed, not left behind
    process = subprocess.Popen(SLEEPER, stdout=subprocess.PIPE, text=True)
    deadline = processes.Deadline("checkpoint", allowed)
    deadline.end = 0  # already past
    with pytest.raises(pytest.fail.Exception, match=r"no checkpoint after 0.5 s \(the larger"):
        deadline.check(process)
    assert process.wait(timeout=10) is not None

