"""Shared pieces of the RIBBED test files: a small MLP, random batches, a plain training loop
and the resume-equals-uninterrupted check."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import torch
from torch import nn


def mlp(seed: int = 0, width: int = 16) -> nn.Module:
    """An 8-input, 3-class tanh MLP with two hidden layers, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))


def random_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 32 random inputs with random labels."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator))
            for _ in range(n)]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[float]:
    """The plain ``torch.optim`` loop over ``batches``; returns the losses."""
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def assert_resume_matches_uninterrupted(
    make_model: Callable[[int], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    run: Callable[[nn.Module, torch.optim.Optimizer, Sequence], object],
    batches: Sequence,
    split: int,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """Train on ``batches`` once without a break; then train ``batches[:split]``, save model,
    optimiser and the global random state through ``torch.save`` / ``torch.load(weights_only=True)``,
    load them into a model built from another seed and a fresh optimiser, and train the rest.
    Asserts the two runs end with bit-identical parameters; returns (uninterrupted, resumed)."""
    whole = make_model(0)
    uninterrupted = make_optimizer(whole)
    run(whole, uninterrupted, batches)

    first = make_model(0)
    optimizer = make_optimizer(first)
    run(first, optimizer, batches[:split])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
               buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_model(5)
    resumed_model.load_state_dict(saved["model"])
    resumed = make_optimizer(resumed_model)
    resumed.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    run(resumed_model, resumed, batches[split:])
    for a, b in zip(whole.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    return uninterrupted, resumed
