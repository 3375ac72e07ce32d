"""Per-task measurements of plasticity: dead units, effective rank, and the headline mean.

Example:
    >>> import torch
    >>> dead_fraction(torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    0.5
    >>> last_fraction_mean([1.0, 2.0, 3.0, 4.0], fraction=0.5)
    3.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ribbed.core.density import effective_rank

__all__ = ["dead_fraction", "dead_units", "early_fraction_mean", "last_fraction_mean",
           "representation_rank"]


def dead_units(activations: torch.Tensor) -> torch.Tensor:
    """Which units are dead: a boolean ``[units]`` mask, true where the unit's output is zero
    on every example of ``activations [examples, units]`` (a ReLU unit that never fires)."""
    if activations.ndim != 2 or activations.shape[0] == 0:
        raise ValueError(f"activations: got shape {tuple(activations.shape)}; allowed: [examples >= 1, units]")
    return (activations != 0).sum(0) == 0


def dead_fraction(activations: torch.Tensor) -> float:
    """The fraction of units of ``activations [examples, units]`` that are dead (:func:`dead_units`)."""
    return dead_units(activations).float().mean().item()


def representation_rank(activations: torch.Tensor) -> float:
    """The effective rank (Roy & Vetterli 2007) of a layer's representation ``[examples, units]``:
    ``exp`` of the entropy of its normalised singular values (0 for an all-zero representation)."""
    return effective_rank(activations.double()).item()


def _count(total: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: got {fraction!r}; allowed: a number in (0, 1]")
    if total == 0:
        raise ValueError("values: got none; allowed: at least one value")
    return max(1, math.ceil(fraction * total - 1e-9))


def last_fraction_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    """The mean of the last ``ceil(fraction * n)`` values (at least one): the headline metric,
    e.g. online accuracy over the last 10% of tasks."""
    count = _count(len(values), fraction)
    return float(sum(values[-count:]) / count)


def early_fraction_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    """The mean over the second ``fraction`` of the values (the ``ceil(fraction * n)`` after the
    first ``ceil(fraction * n)``; the last one when there are too few): early performance once
    the learner has left its from-scratch start, the reference a lost-plasticity run ends below."""
    count = _count(len(values), fraction)
    window = list(values[count:2 * count]) or list(values[-1:])
    return float(sum(window) / len(window))
