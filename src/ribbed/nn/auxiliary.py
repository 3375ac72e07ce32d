"""Auxiliary losses that layers add during their forward pass.

Some layers carry a loss of their own beside the task loss: a Mixture-of-Experts router's
load-balancing and z-losses (Fedus et al. 2022), a concrete-dropout regulariser, ... A layer
stores it with :func:`add_aux_loss` during ``forward``; the gradient method collects the sum
with :func:`pop_aux_loss` after the forward pass and adds it to the task loss. Popping
clears the stored values, so a loss is never counted twice (recomputation under activation
checkpointing overwrites, it does not add).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["add_aux_loss", "pop_aux_loss"]

_ATTR = "_ribbed_aux_loss"


def add_aux_loss(module: nn.Module, loss: torch.Tensor) -> None:
    """Record ``loss`` (a scalar) as ``module``'s auxiliary loss for the current forward pass."""
    setattr(module, _ATTR, loss)


def pop_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum and clear every auxiliary loss recorded in ``model``'s modules; ``None`` if none."""
    total = None
    for module in model.modules():
        loss = module.__dict__.pop(_ATTR, None)
        if loss is not None:
            total = loss if total is None else total + loss
    return total
