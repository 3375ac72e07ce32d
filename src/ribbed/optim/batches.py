"""The step's batch, kept for optimisers that evaluate the loss themselves.

Hessian-free and the natural-gradient optimiser need more than ``param.grad``: curvature-vector
products and loss evaluations on the step's inputs and targets. The training loop calls
``optimizer.step()`` without a closure, so the batch travels through a gradient method
instead: ``keep-batch`` (``ribbed.train.gradients.KeepBatch``) is backprop that also calls
:func:`record_batch` for every micro-batch. Such an optimiser calls :func:`expect_batches` on its model when built (only
then are batches kept, so no other run holds on to them), drops the previous step's
batches in ``zero_grad`` and reads this step's with :func:`recorded_batches`.

Outside the loop::

    loss = loss_fn(model(x), y); loss.backward()
    record_batch(model, x, y, loss_fn)
    optimizer.step()
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Batch", "expect_batches", "forget_batches", "record_batch", "recorded_batches"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_KEPT: weakref.WeakKeyDictionary[nn.Module, list[Batch]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Batch:
    """One micro-batch: inputs, targets and the (mean-reduced) loss function."""

    x: torch.Tensor
    y: torch.Tensor
    loss_fn: LossFn


def expect_batches(model: nn.Module) -> None:
    """Start keeping batches recorded for ``model`` (called by the optimiser that reads them)."""
    _KEPT.setdefault(model, [])


def record_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> None:
    """Keep ``(x, y, loss_fn)`` for ``model``'s optimiser, if one expects batches."""
    kept = _KEPT.get(model)
    if kept is not None:
        kept.append(Batch(x.detach(), y.detach(), loss_fn))


def forget_batches(model: nn.Module) -> None:
    """Drop the batches kept so far (the optimiser calls this in ``zero_grad``)."""
    if model in _KEPT:
        _KEPT[model] = []


def recorded_batches(model: nn.Module, who: str) -> list[Batch]:
    """This step's batches for ``model``; a clear error naming ``who`` needs them if none."""
    kept = _KEPT.get(model)
    if not kept:
        raise RuntimeError(
            f"{who} needs the step's batch to evaluate its loss, but none was recorded for this model: "
            "set train.gradient_method: keep-batch, or call ribbed.optim.record_batch(model, x, y, loss_fn) "
            "after the backward pass"
        )
    return list(kept)
