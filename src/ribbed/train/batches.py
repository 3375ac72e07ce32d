"""Deterministic mini-batches addressed by step number.

The sample order is a fresh permutation each epoch, drawn from a generator seeded by
``(seed, epoch)``; the batch of optimiser step ``s`` is a fixed slice of it. Because a batch
is a pure function of ``(seed, step)``, resuming from a checkpoint needs no loader state and
sees exactly the batches an uninterrupted run would, and gradient accumulation splits the
same batch into micro-batches (so ``grad_accum`` never changes which samples a step sees).
Incomplete final batches of an epoch are dropped so every step has the same size.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ribbed.data import Split
from ribbed.registry import Registry, check_options

__all__ = ["SAMPLERS", "BatchStream", "Sampler", "build_sampler", "list_samplers", "register_sampler"]


class Sampler(Protocol):
    """Gives the batch of every optimiser step; a pure function of the step for exact resume."""

    steps_per_epoch: int

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]: ...


SAMPLERS: Registry[Sampler] = Registry(
    "sampler", "data.sampler", positional=("split", "batch_size", "seed", "device")
)


def register_sampler(name: str, description: str):
    """Register ``factory(split, *, batch_size, seed, device, **options) -> Sampler``."""
    return SAMPLERS.register(name, description)


def list_samplers() -> dict[str, str]:
    return SAMPLERS.describe()


def build_sampler(
    name: str, split: Split, *, batch_size: int, seed: int, device: torch.device, **options
) -> Sampler:
    """The sampler ``name`` over ``split``; unknown names and options are errors."""
    entry = SAMPLERS.entry(name)
    check_options(SAMPLERS.field, name, entry.signature_of, options, SAMPLERS.positional)
    return entry.factory(split, batch_size=batch_size, seed=seed, device=device, **options)


@register_sampler("shuffle", "a fresh random permutation each epoch (the default)")
class BatchStream:
    """Batches of ``batch_size`` samples of ``split`` for each optimiser step."""

    def __init__(self, split: Split, *, batch_size: int, seed: int, device: torch.device):
        if batch_size > len(split):
            raise ValueError(
                f"data.batch_size: got {batch_size}; allowed: at most the training set size "
                f"({len(split)})"
            )
        self._x = split.x.to(device)
        self._y = split.y.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(split) // batch_size
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self._y), generator=generator).to(self._x.device)
            self._epoch = epoch
        return self._order

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of optimiser step ``step``."""
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.batch_size
        rows = self._permutation(epoch)[start : start + self.batch_size]
        return self._x[rows], self._y[rows]
