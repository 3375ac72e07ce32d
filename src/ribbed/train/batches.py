"""Deterministic mini-batches addressed by step number.

The sample order is a fresh permutation each epoch, drawn from a generator seeded by
``(seed, epoch)``; the batch of optimiser step ``s`` is a fixed slice of it. Because a batch
is a pure function of ``(seed, step)``, resuming from a checkpoint needs no loader state and
sees exactly the batches an uninterrupted run would, and gradient accumulation splits the
same batch into micro-batches (so ``grad_accum`` never changes which samples a step sees).
Incomplete final batches of an epoch are dropped so every step has the same size.
"""

from __future__ import annotations

import torch

from ribbed.data import Split

__all__ = ["BatchStream"]


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
