"""Learning-rate schedules as ``torch.optim.lr_scheduler.LambdaLR`` factors.

Linear warm-up over ``warmup_steps`` then either a constant rate or a half-cosine decay to
``min_lr_ratio`` of the peak at ``total_steps`` (Loshchilov & Hutter 2017, without restarts).
Using ``LambdaLR`` keeps ``lr`` in the optimiser's ``param_groups`` and the schedule in a
``state_dict``, as every torch tool expects.
"""

from __future__ import annotations

import math

import torch

from ribbed.config import ScheduleConfig

__all__ = ["lr_factor", "build_scheduler"]


def lr_factor(step: int, *, total_steps: int, config: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate for optimiser step ``step`` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, config: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total_steps, config=config)
    )
