"""Memory and time of training steps, measured on the real training loop.

:func:`profile_training` builds a run from its config (so checkpointing policies, gradient
methods, precision and plug-ins such as gradient sparsification all take part exactly as in
a recorded run) and measures three things:

* **activation bytes**: storages saved for backward by one micro-batch of the gradient
  method (:func:`ribbed.memory.saved.track_saved_tensors`, parameters excluded);
  deterministic, so one pass suffices;
* **peak memory** of ``train()`` over the timed steps (:mod:`ribbed.memory.peak`): the
  process's peak RSS above its start, and CUDA's peak allocation on a GPU. It includes
  gradients, optimiser state, recomputation buffers and the one evaluation that closes a run;
* **step time**: the median wall-clock interval between consecutive steps of ``train()``;
  the first step (allocation, lazy optimiser state) is left out.

Example:
    >>> from ribbed.config import RunConfig
    >>> config = RunConfig.model_validate({"data": {"name": "digits", "batch_size": 32},
    ...     "model": {"name": "mlp", "options": {"hidden": [16, 16]}}})
    >>> profile = profile_training(config, steps=3)
    >>> profile.activation_bytes > 0 and profile.step_seconds > 0
    True
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from ribbed.config import RunConfig
from ribbed.data import Dataset
from ribbed.memory.peak import track_peak_memory
from ribbed.memory.saved import track_saved_tensors
from ribbed.train import StepBatch, TrainingHook, build_run, task_loss, train

__all__ = ["StepProfile", "profile_training"]

MIN_STEPS = 3


@dataclass(frozen=True)
class StepProfile:
    """Activation bytes of one micro-batch, peak memory and median step time of a run."""

    activation_bytes: int
    saved_storages: int
    peak_process_bytes: int | None
    peak_cuda_bytes: int | None
    step_seconds: float
    steps: int

    def as_dict(self) -> dict:
        return asdict(self)


class _StepTimes(TrainingHook):
    """A training hook that records the interval between consecutive steps."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.intervals: list[float] = []

    def after_step(self, step: int, batch: StepBatch) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.intervals.append(now - self.last)
        self.last = now


def profile_training(config: RunConfig, dataset: Dataset | None = None, *, steps: int = 5) -> StepProfile:
    """Measure ``config``'s training steps; ``steps`` (at least 3) replaces ``train.steps``.

    Evaluation runs once, after the last timed step, so it never enters a step interval.

    Raises:
        ValueError: ``steps`` below 3 (two intervals are the least a median needs).
    """
    if not isinstance(steps, int) or steps < MIN_STEPS:
        raise ValueError(f"steps: got {steps!r}; allowed: an integer >= {MIN_STEPS}")
    config = config.model_copy(update={"train": config.train.model_copy(
        update={"steps": steps, "eval_every": steps, "checkpoint_every": None, "target": None})})
    parts = build_run(config, dataset)
    micro_batch = config.data.batch_size // config.train.grad_accum
    x, y = parts.batches.batch(0)
    with track_saved_tensors(exclude=parts.model.parameters()) as saved:
        parts.gradient_method.accumulate(
            parts.model, x[:micro_batch], y[:micro_batch], task_loss(parts.dataset.task),
            parts.precision, 1.0,
        )
    parts.optimizer.zero_grad(set_to_none=True)
    times = _StepTimes()
    with track_peak_memory(parts.device) as peak:
        train(parts, callbacks=[times], evaluate_test=False)
    return StepProfile(
        activation_bytes=saved.bytes,
        saved_storages=saved.count,
        peak_process_bytes=peak.process_bytes,
        peak_cuda_bytes=peak.cuda_bytes,
        step_seconds=statistics.median(times.intervals),
        steps=steps,
    )
