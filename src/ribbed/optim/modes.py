"""Optimisers with separate weights for evaluation (schedule-free): switching to them and back.

A schedule-free optimiser (Defazio et al. 2024) trains at one point ``y`` and is evaluated
at another, the average ``x``; ``optimizer.eval()`` moves the parameters to ``x`` and
``optimizer.train()`` back. Every evaluation in ribbed goes through :func:`evaluation_weights`,
which does that for such optimisers and nothing for the others. This module imports nothing
from ribbed, so the training loop can use it without an import cycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

if TYPE_CHECKING:

    class EvaluationModeOptimizer(torch.optim.Optimizer):
        """What :func:`has_evaluation_mode` tells the type checker: an optimiser with these two methods."""

        def eval(self) -> Any: ...

        def train(self) -> Any: ...

__all__ = ["evaluation_weights", "has_evaluation_mode"]


def has_evaluation_mode(optimizer: torch.optim.Optimizer) -> TypeGuard[EvaluationModeOptimizer]:
    """Whether ``optimizer`` keeps separate weights for evaluation (``eval()``/``train()``, as
    the schedule-free optimisers do)."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside the block the model holds the weights ``optimizer`` wants evaluated: a schedule-free
    optimiser's average ``x`` (``optimizer.eval()``, undone by ``optimizer.train()`` on exit);
    any other optimiser's weights as they are. An optimiser already in eval mode stays so."""
    switched = (optimizer if has_evaluation_mode(optimizer)
                and not all(group.get("train_mode") is False for group in optimizer.param_groups) else None)
    if switched is not None:
        switched.eval()
    try:
        yield
    finally:
        if switched is not None:
            switched.train()
