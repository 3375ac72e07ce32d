"""How far a gradient method's update points along the true gradient, tracked during training.

Plug-in ``gradient-cosine``: every ``every`` steps, once the gradient method has filled
``param.grad`` (at its true scale, before clipping), it computes the backprop gradient of
the task loss on the same batch and the cosine between the two, over all parameters
(``grad_cosine``) and over all parameters outside the model's ``head`` (``grad_cosine_hidden``;
methods that train the head by the true gradient are otherwise flattered by it). Each
evaluation row gets the mean over the steps measured since the previous row, so the report
plots the cosine over training. A parameter the method leaves without a gradient counts as
a zero update. A cosine above 0 means the update is a descent direction (alignment angle
below 90 degrees), as feedback alignment's theory predicts once the forward weights align.

The reference gradient runs in an isolated RNG state, so measuring does not change the
run; it does cost one forward and backward pass per measured step, counted in wall time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ribbed.alternatives.common import check_positive_int
from ribbed.nn.auxiliary import pop_aux_loss
from ribbed.train import StepBatch, TrainingPlugin, register_plugin, task_loss

__all__ = ["GradientCosine", "gradient_cosine"]


def gradient_cosine(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """Cosine between two gradients given as matching lists of tensors (None counts as zero)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None or y is not None]
    if not pairs:
        return 0.0
    flat_a = torch.cat([_or_zeros(x, y).flatten() for x, y in pairs])
    flat_b = torch.cat([_or_zeros(y, x).flatten() for x, y in pairs])
    cosine = F.cosine_similarity(flat_a.double(), flat_b.double(), dim=0, eps=1e-30)
    return cosine.clamp(-1.0, 1.0).item()  # rounding can leave |cosine| a hair above 1


def _or_zeros(tensor: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor:
    """``tensor``, or zeros like ``other`` in its place (one of the two is a tensor)."""
    if tensor is not None:
        return tensor
    assert other is not None
    return torch.zeros_like(other)


@register_plugin("gradient-cosine", "cosine between the method's gradient and the true backprop gradient")
class GradientCosine(TrainingPlugin):
    """Logs ``grad_cosine`` and ``grad_cosine_hidden`` (means since the last evaluation).

    Args:
        every: measure every ``every``-th optimiser step.
    """

    def __init__(self, every: int = 10):
        self.every = check_positive_int("every", every, "gradient-cosine")
        self.window: dict[str, list[float]] = {"grad_cosine": [], "grad_cosine_hidden": []}

    def attach(self, parts) -> None:
        self.parts = parts
        self.loss_fn = task_loss(parts.dataset.task)
        model = parts.model
        head = getattr(model, "head", None)
        in_head = {id(p) for p in head.parameters()} if head is not None else set()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.hidden = [i for i, p in enumerate(self.params) if id(p) not in in_head]

    def _true_gradient(self, step: int) -> list[torch.Tensor | None]:
        """Backprop's gradient on the step's global batch, not the hook's ``batch`` (this
        process's rows): under data parallelism the applied gradient is the mean over all rows."""
        x, y = self.parts.batches.batch(step)
        model = self.parts.model
        devices = [self.parts.device] if self.parts.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.parts.precision.autocast():
            loss = self.loss_fn(model(x), y)
            aux = pop_aux_loss(model)
        total = loss if aux is None else loss + aux
        return list(torch.autograd.grad(total.float(), self.params, allow_unused=True))

    def before_step(self, step: int, batch: StepBatch) -> None:
        if step % self.every:
            return
        true = self._true_gradient(step)
        applied = [p.grad for p in self.params]
        self.window["grad_cosine"].append(gradient_cosine(applied, true))
        self.window["grad_cosine_hidden"].append(
            gradient_cosine([applied[i] for i in self.hidden], [true[i] for i in self.hidden])
        )

    def metrics(self) -> dict[str, float]:
        row = {key: sum(values) / len(values) for key, values in self.window.items() if values}
        for values in self.window.values():
            values.clear()
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"window": {key: list(values) for key, values in self.window.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = {key: list(values) for key, values in state["window"].items()}
