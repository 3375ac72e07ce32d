"""How gradients are obtained: the training loop's plug-in point.

A gradient method runs the forward pass of one micro-batch under the precision policy and
fills ``param.grad`` (adding to what is there, so gradient accumulation works). Backprop is
the default; alternatives to backprop (feedback alignment, forward gradients, ...) register
here under their own names and the loop stays the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ribbed.nn.auxiliary import pop_aux_loss
from ribbed.optim.batches import record_batch
from ribbed.registry import Registry
from ribbed.train.precision import Precision

__all__ = ["GRADIENT_METHODS", "Backprop", "GradientMethod", "KeepBatch", "build_gradient_method",
           "list_gradient_methods", "register_gradient_method"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GradientMethod(Protocol):
    """Accumulates gradients of ``loss_scale * loss(model(x), y)`` into ``param.grad``.

    A method that learns something of its own (synthetic-gradient predictors) also has
    ``state_dict()`` / ``load_state_dict(state)``; the loop keeps that state in checkpoints.
    """

    def attach(self, model: nn.Module) -> None:
        """Called once before training (e.g. to create feedback matrices or hooks)."""

    def accumulate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: LossFn,
        precision: Precision,
        loss_scale: float,
    ) -> torch.Tensor:
        """Fill gradients for one micro-batch; return its (unscaled, detached) mean loss."""


class Backprop:
    """Reverse-mode automatic differentiation of the loss: ``loss.backward()``.

    Auxiliary losses that layers recorded during the forward pass (``ribbed.nn.add_aux_loss``)
    are added to the task loss for the backward pass; the returned loss is the task loss.
    """

    def attach(self, model: nn.Module) -> None:
        return None

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        with precision.autocast():
            loss = loss_fn(model(x), y)
            aux = pop_aux_loss(model)
        total = loss if aux is None else loss + aux
        precision.backward(total * loss_scale if loss_scale != 1.0 else total)
        return loss.detach()


GRADIENT_METHODS: Registry[GradientMethod] = Registry("gradient method", "train.gradient_method")
GRADIENT_METHODS.register("backprop", "reverse-mode autodiff of the loss (loss.backward())")(Backprop)


@GRADIENT_METHODS.register("keep-batch", "backprop, and keep each micro-batch for optimisers that evaluate the "
                           "loss (hessian_free, natural_gradient)")
class KeepBatch(Backprop):
    """:class:`Backprop` that also records each micro-batch (``ribbed.optim.batches``) for the
    optimisers that evaluate the loss themselves."""

    keeps_batch = True

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        loss = super().accumulate(model, x, y, loss_fn, precision, loss_scale)
        record_batch(model, x, y, loss_fn)
        return loss


def register_gradient_method(name: str, description: str):
    """Register a :class:`GradientMethod` factory; its keyword arguments are its options."""
    return GRADIENT_METHODS.register(name, description)


def list_gradient_methods() -> dict[str, str]:
    return GRADIENT_METHODS.describe()


def build_gradient_method(name: str, **options) -> GradientMethod:
    """The gradient method ``name`` built with ``options`` (``train.gradient_options``)."""
    return GRADIENT_METHODS.build(name, **options)
