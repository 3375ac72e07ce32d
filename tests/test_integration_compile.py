"""torch.compile, for every optimiser of the integration table.

``torch.compile(optimizer.step)`` takes the same steps as the eager step (float64, within
float round-off: the compiled AdamW reference differs by ~1e-6 too), and RIBBED's controllers
still learn under it; hooks added after the model's first compiled call never run, and RIBBED
and K-FAC then say so instead of silently training without their statistics. Backends
``eager`` and ``aot_eager`` (what Dynamo captures, without Inductor's C++ build).

CI sets ``TORCH_COMPILE_DISABLE=1``, which turns ``torch.compile`` into a no-op and every
check here into a vacuous one: there the tests skip and one test reruns this module in a
subprocess with compilation on.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests import processes
from tests.integration_table import CASES
from tests.ribbed_helpers import mlp, random_batches

COMPILE_DISABLED = bool(torch._dynamo.config.disable)
compiled = pytest.mark.skipif(COMPILE_DISABLED, reason="TORCH_COMPILE_DISABLE is set: the compile checks run in a "
                              "subprocess with compilation on (test_the_checks_run_with_compilation_on)")
pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-5


@pytest.mark.skipif(not COMPILE_DISABLED, reason="compilation is on: the checks below run in this process")
@pytest.mark.slow
def test_the_checks_run_with_compilation_on():
    env = {key: value for key, value in os.environ.items() if key != "TORCH_COMPILE_DISABLE"}
    root = Path(__file__).resolve().parent.parent
    done = processes.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                         processes.limit(600, starts=1, work_s=30), cwd=root, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.splitlines()[-1]
    assert "1 skipped" in summary and "failed" not in summary, summary  # only this test skips there


def _train(case, backend: str | None, steps: int = 12):
    model = mlp(0).double()
    optimizer = case.build(model)
    step = optimizer.step if backend is None else torch.compile(optimizer.step, backend=backend)
    for x, y in random_batches(steps):
        F.cross_entropy(model(x.double()), y).backward()
        step()
        optimizer.zero_grad()
    return model, optimizer


HOOKED = [case for case in CASES if case.id in ("ribbed", "kfac")]
"""The optimisers with hooks on the model (RIBBED's with its default base)."""


@compiled
@pytest.mark.parametrize("case, backend", [*((case, "eager") for case in CASES), (CASES[0], "aot_eager")],
                         ids=lambda value: str(value))
def test_the_compiled_step_equals_the_eager_step(case, backend):
    torch._dynamo.reset()
    eager_model, eager = _train(case, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no hook or refresh may be silently skipped
        warnings.filterwarnings("ignore", message=".*(Profiler|record_function|Graph break|graph break).*")
        compiled_model, optimizer = _train(case, backend)
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=TOLERANCE, msg=name)
    if case.name == "ribbed":  # the controllers learned under compile exactly as in eager mode
        assert optimizer.telemetry()["ribbed_controller_loss"] != 0.0
        assert not torch.equal(optimizer.controllers.multiplier, torch.ones_like(optimizer.controllers.multiplier))
        torch.testing.assert_close(optimizer.controllers.multiplier, eager.controllers.multiplier, rtol=1e-4, atol=0)


@compiled
@pytest.mark.parametrize("case", HOOKED, ids=str)
def test_hooks_added_after_the_first_compiled_call_are_reported(case):
    """Dynamo skips the guards on module hooks (``skip_nnmodule_hook_guards``), so the hooks of
    an optimiser built after the model's first compiled call never run."""
    torch._dynamo.reset()
    model = mlp(0)
    forward = torch.compile(model, backend="eager")
    forward(random_batches(1)[0][0])
    optimizer = case.build(model)
    with pytest.warns(UserWarning, match="torch.compile call"):
        for x, y in random_batches(6):
            F.cross_entropy(forward(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()


@compiled
@pytest.mark.parametrize("case", HOOKED, ids=str)
def test_hooks_added_before_compiling_the_model_record(case):
    """The supported order: build the optimiser, then compile the model; nothing is reported."""
    torch._dynamo.reset()
    model = mlp(0)
    optimizer = case.build(model)
    forward = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch.compile call.*")
        for x, y in random_batches(6):
            F.cross_entropy(forward(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
