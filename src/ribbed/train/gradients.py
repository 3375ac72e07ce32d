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

from ribbed.train.precision import Precision

__all__ = ["GradientMethod", "Backprop", "build_gradient_method", "register_gradient_method",
           "list_gradient_methods"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GradientMethod(Protocol):
    """Accumulates gradients of ``loss_scale * loss(model(x), y)`` into ``param.grad``."""

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
    """Reverse-mode automatic differentiation of the loss: ``loss.backward()``."""

    def attach(self, model: nn.Module) -> None:
        return None

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        with precision.autocast():
            loss = loss_fn(model(x), y)
        precision.backward(loss * loss_scale if loss_scale != 1.0 else loss)
        return loss.detach()


_REGISTRY: dict[str, tuple[Callable[[], GradientMethod], str]] = {
    "backprop": (Backprop, "reverse-mode autodiff of the loss (loss.backward())"),
}


def register_gradient_method(name: str, description: str):
    """Register a zero-argument factory of a :class:`GradientMethod` under ``name``."""

    def decorate(factory):
        if name in _REGISTRY:
            raise ValueError(f"gradient method {name!r} is already registered")
        _REGISTRY[name] = (factory, description)
        return factory

    return decorate


def list_gradient_methods() -> dict[str, str]:
    return {name: description for name, (_, description) in sorted(_REGISTRY.items())}


def build_gradient_method(name: str) -> GradientMethod:
    if name not in _REGISTRY:
        raise ValueError(
            f"train.gradient_method: got {name!r}; allowed: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name][0]()
