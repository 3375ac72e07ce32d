"""RigL: dynamic sparse training at a fixed parameter count (Evci et al., 2020, "Rigging the
Lottery: Making All Tickets Winners", arXiv:1911.11134).

Training starts from a random sparse mask (per-layer densities uniform or Erdős–Rényi-Kernel)
and every ``update_every`` steps, until ``stop_fraction`` of training, each layer drops the
``f(t)`` fraction of its live connections with the smallest weight magnitude and grows as
many, among the dead ones, with the largest *dense* gradient magnitude. The fraction decays
as ``f(t) = drop_fraction / 2 * (1 + cos(pi t / T_end))``. Grown connections start at zero
weight and zero optimiser state. The count of live connections per layer never changes.

The per-layer drop and grow (two ``topk`` per layer) run only on update steps; every other
step costs two ``_foreach_mul_`` (masks on gradients and weights).

Why our own code: PyTorch has no RigL, and the ``rigl-torch`` package is unmaintained since
2020 and wraps the optimiser instead of working with any optimiser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ribbed.sparse.plugin import MaskedWeightsPlugin, check_fraction
from ribbed.train import StepBatch, register_plugin

__all__ = ["RigL", "erk_densities", "random_masks"]

DISTRIBUTIONS = ("uniform", "erk")


def erk_densities(shapes: Sequence[torch.Size], density: float) -> list[float]:
    """Per-layer densities of the Erdős–Rényi-Kernel rule with overall ``density``.

    A layer's density is proportional to ``sum(shape) / prod(shape)`` (Mocanu et al., 2018;
    Evci et al., 2020, appendix); layers whose density would exceed 1 are kept dense and the
    scale is recomputed for the others, so the total number of live weights is exact.
    """
    sizes = torch.tensor([math.prod(s) for s in shapes], dtype=torch.float64)
    raw = torch.tensor([sum(s) for s in shapes], dtype=torch.float64) / sizes
    dense = torch.zeros(len(shapes), dtype=torch.bool)
    while True:
        budget = density * sizes.sum() - sizes[dense].sum()
        scale = budget / (raw[~dense] * sizes[~dense]).sum()
        densities = torch.where(dense, 1.0, raw * scale)
        if (densities <= 1.0).all():
            return densities.tolist()
        dense |= densities > 1.0


def random_masks(params: Sequence[torch.Tensor], densities: Sequence[float],
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """For each parameter a random 0/1 mask with exactly ``round(density * numel)`` ones."""
    masks = []
    for param, density in zip(params, densities, strict=True):
        keep = max(1, round(density * param.numel()))
        scores = torch.rand(param.numel(), generator=generator).to(param.device)
        mask = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
        masks.append(mask.index_fill_(0, scores.topk(keep).indices, 1.0).view_as(param))
    return masks


def drop_and_grow(weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """A new mask: ``count`` live connections with the smallest ``|weight|`` dropped, ``count``
    dead ones (just-dropped ones included) with the largest ``|grad|`` grown."""
    live = mask.reshape(-1) > 0
    drop_scores = torch.where(live, weight.reshape(-1).abs(), torch.inf)
    new = live.clone()
    new[drop_scores.topk(count, largest=False).indices] = False
    grow_scores = torch.where(new, -torch.inf, grad.reshape(-1).abs())
    new[grow_scores.topk(count).indices] = True
    return new.view_as(mask).to(mask.dtype)


@register_plugin("rigl", "RigL dynamic sparse training: drop by magnitude, grow by gradient")
class RigL(MaskedWeightsPlugin):
    """Sparse training with connections rewired by gradient (RigL).

    Args:
        sparsity: fraction of prunable weights that are zero, in (0, 1).
        distribution: ``uniform`` (every layer at ``sparsity``) or ``erk``.
        update_every: steps between mask updates (``Delta T``).
        drop_fraction: fraction of live connections replaced at the first update (``alpha``).
        stop_fraction: fraction of training after which the mask is frozen (``T_end``).
        exclude: glob patterns of weight names kept dense.
    """

    name = "rigl"

    def __init__(self, sparsity: float = 0.9, distribution: str = "erk", update_every: int = 100,
                 drop_fraction: float = 0.3, stop_fraction: float = 0.75,
                 exclude: Sequence[str] = ()):
        super().__init__(exclude)
        self.sparsity = check_fraction("sparsity", sparsity, low_open=True)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution={distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
        if not (isinstance(update_every, int) and not isinstance(update_every, bool) and update_every > 0):
            raise ValueError(f"update_every={update_every!r}; allowed: a positive integer")
        self.distribution, self.update_every = distribution, update_every
        self.drop_fraction = check_fraction("drop_fraction", drop_fraction, low_open=True)
        self.stop_fraction = check_fraction("stop_fraction", stop_fraction, low_open=True,
                                            high_open=False)
        self.updates = 0

    def attach(self, parts) -> None:
        super().attach(parts)
        density = 1.0 - self.sparsity
        shapes = [p.shape for p in self.masks.params]
        densities = (erk_densities(shapes, density) if self.distribution == "erk"
                     else [density] * len(shapes))
        generator = torch.Generator().manual_seed(parts.config.seed)
        torch._foreach_copy_(self.masks.masks, random_masks(self.masks.params, densities, generator))
        self.masks.apply_to_weights()
        self.stop_step = int(self.stop_fraction * parts.config.train.steps)

    def update_fraction(self, step: int) -> float:
        """``f(t)``: the fraction of live connections replaced at step ``t``."""
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.stop_step))

    def before_step(self, step: int, batch: StepBatch) -> None:
        if 0 < step < self.stop_step and step % self.update_every == 0:
            self._rewire(step)
        super().before_step(step, batch)

    @torch.no_grad()
    def _rewire(self, step: int) -> None:
        fraction = self.update_fraction(step)
        counts = (self.masks.active_counts() * fraction).floor().long().tolist()
        new_masks = [
            drop_and_grow(param, param.grad, mask, count) if count and param.grad is not None else mask
            for param, mask, count in zip(self.masks.params, self.masks.masks, counts, strict=True)
        ]
        self.masks.update(new_masks, self.optimizer)
        self.updates += 1

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "rigl_updates": float(self.updates)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.updates = state["updates"]
