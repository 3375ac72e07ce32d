"""The online continual-learning protocol: predict, then learn, one stream, one method, one seed.

This is a loop of its own rather than a plug-in of ``ribbed.train``: that loop trains on a
fixed dataset and evaluates on held-out splits, while here every example is scored once,
before the learner has seen it, and the learner never revisits it. What it shares with the
main loop is everything else: optimisers come from the registry (``build_optimizer``), the
model is ribbed's :class:`~ribbed.nn.mlp.MLP`, and optimisers with separate evaluation weights
(schedule-free) are evaluated through :func:`ribbed.optim.evaluation_weights`.

Per task the run records: the online metric (accuracy, or squared error for regression) over
all of the task's examples, each predicted before the update on its batch; and, from a probe
at the end of the task (the task's last ``probe`` examples through the network as it then is,
in evaluation mode), the fraction of dead hidden units (zero on every probe example) and the
effective rank of the last hidden layer's representation. A run whose loss stops being
finite is marked diverged at that task and stops.

Example:
    >>> from ribbed.data.continual import SlowlyChangingRegression
    >>> stream = SlowlyChangingRegression(seed=0, period=50)
    >>> result = run_online(stream, Method("adamw", "adamw", 0.01), seed=0, tasks=2, hidden=(5,))
    >>> len(result.online), result.status
    (2, 'completed')
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ribbed.continual.metrics import dead_units, last_fraction_mean, representation_rank
from ribbed.data.continual import Stream
from ribbed.nn.mlp import MLP
from ribbed.optim import build_optimizer, evaluation_weights
from ribbed.optim.modes import has_evaluation_mode

__all__ = ["Method", "OnlineRun", "build_learner", "hidden_activations", "run_online", "tune_lr"]


@dataclass(frozen=True)
class Method:
    """A method of the benchmark: a label, a registered optimiser, its learning rate and options."""

    name: str
    optimizer: str
    lr: float
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class OnlineRun:
    """One run's per-task curves. ``online`` is accuracy or squared error per task; ``dead``
    the fraction of all hidden units that are dead, ``dead_per_layer`` the same per hidden
    layer; ``rank`` the effective rank of the last hidden layer."""

    method: str
    seed: int
    lr: float
    status: str = "completed"
    diverged_at: int | None = None
    online: list[float] = field(default_factory=list)
    dead: list[float] = field(default_factory=list)
    dead_per_layer: list[list[float]] = field(default_factory=list)
    rank: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def headline(self, fraction: float = 0.1) -> float | None:
        """Mean online metric over the last ``fraction`` of tasks (``None`` if diverged)."""
        return last_fraction_mean(self.online, fraction) if self.status == "completed" else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_learner(stream: Stream, hidden: Sequence[int]) -> MLP:
    """The learner: an MLP with ReLU hidden layers ``hidden`` and one output per target."""
    return MLP(stream.input_shape, stream.num_outputs, hidden=tuple(hidden), activation="relu")


@torch.no_grad()
def hidden_activations(model: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """The output ``[examples, units]`` of every hidden layer of ``model`` on ``x``, in
    evaluation mode (so no training hook records this pass)."""
    was_training = model.training
    model.eval()
    outputs, h = [], x.flatten(1)
    for block in model.blocks:
        h = block(h)
        outputs.append(h)
    model.train(was_training)
    return outputs


def run_online(
    stream: Stream,
    method: Method,
    *,
    seed: int,
    tasks: int,
    hidden: Sequence[int],
    batch_size: int = 1,
    probe: int = 500,
    on_task: Callable[[int, float], None] | None = None,
) -> OnlineRun:
    """Run ``method`` on the first ``tasks`` tasks of ``stream`` with model seed ``seed``.

    Args:
        stream: the task sequence (its own seed fixes the data).
        method: the optimiser, learning rate and options.
        seed: seeds the model's initialisation (and, through the global RNG, any noise seed).
        tasks: how many tasks.
        hidden: hidden layer widths of the MLP.
        batch_size: examples per update (the online metric still scores each example once).
        probe: examples at the end of each task used for dead units and effective rank.
        on_task: called with ``(task index, online metric)`` after each task.
    """
    torch.manual_seed(seed)
    model = build_learner(stream, hidden)
    optimizer = build_optimizer(method.optimizer, model, lr=method.lr, **dict(method.options))
    regression = stream.kind == "regression"
    loss_fn = F.mse_loss if regression else F.cross_entropy
    separate_prediction = has_evaluation_mode(optimizer)
    run = OnlineRun(method.name, seed, method.lr)
    started = time.perf_counter()
    model.train()
    for task in stream.tasks(tasks):
        score = torch.zeros((), dtype=torch.float64)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for start in range(0, len(task), batch_size):
            x, y = task.x[start:start + batch_size], task.y[start:start + batch_size]
            if separate_prediction:
                with evaluation_weights(optimizer), torch.no_grad():
                    model.eval()
                    prediction = model(x)
                    model.train()
            optimizer.zero_grad(set_to_none=True)
            output = model(x)
            loss = loss_fn(output, y)
            loss.backward()
            optimizer.step()
            if not separate_prediction:
                prediction = output.detach()
            loss_sum += loss.detach()
            if regression:
                score += (prediction - y).square().sum()
            else:
                score += (prediction.argmax(1) == y).sum()
        if not math.isfinite(loss_sum.item()):
            run.status, run.diverged_at = "diverged", task.index
            break
        run.online.append(score.item() / len(task))
        with evaluation_weights(optimizer):
            layers = hidden_activations(model, task.x[-probe:])
        masks = [dead_units(a) for a in layers]
        run.dead.append(torch.cat(masks).float().mean().item() if masks else 0.0)
        run.dead_per_layer.append([m.float().mean().item() for m in masks])
        run.rank.append(representation_rank(layers[-1]) if layers else 0.0)
        if on_task is not None:
            on_task(task.index, run.online[-1])
    run.seconds = time.perf_counter() - started
    return run


def tune_lr(
    run: Callable[[float], OnlineRun],
    grid: Sequence[float],
    *,
    mode: str,
    fraction: float = 0.1,
) -> dict[str, Any]:
    """Score every learning rate of ``grid`` with ``run(lr)`` (the headline metric) and pick the best.

    Returns ``{"grid", "scores" (None where the run diverged), "best_lr", "best_score",
    "interior"}``; ``interior`` is false when the best lr is the smallest or largest of the grid
    (the optimum may lie outside: widen the grid before trusting the comparison).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode: got {mode!r}; allowed: max, min")
    grid = sorted(float(lr) for lr in grid)
    if len(grid) < 3:
        raise ValueError(f"lr_grid: got {grid}; allowed: at least 3 learning rates (to tell an interior optimum)")
    scores = [run(lr).headline(fraction) for lr in grid]
    finite = [(s, i) for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
    if not finite:
        raise RuntimeError(f"tuning: every learning rate of {grid} diverged; lower the grid")
    best_score, best = max(finite) if mode == "max" else min(finite)
    return {"grid": grid, "scores": scores, "best_lr": grid[best], "best_score": best_score,
            "interior": 0 < best < len(grid) - 1}
