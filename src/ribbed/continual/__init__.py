"""Continual learning: the loss-of-plasticity benchmark.

The streams live in :mod:`ribbed.data.continual` (slowly-changing regression, online permuted
MNIST), the baselines in :mod:`ribbed.optim.plasticity` (Shrink & Perturb, UPGD, Schedule-Free
AdamW, AdamW + L2 Init); this package holds the online protocol (:func:`run_online`), the
per-task measurements (dead units, effective rank, the last-10% headline) and the
``plasticity`` study behind the ``plasticity-regression`` and ``plasticity-permuted`` presets::

    ribbed run plasticity-regression
    ribbed run plasticity-permuted --set options.seeds=5
"""

from ribbed.continual.metrics import (
    dead_fraction,
    dead_units,
    early_fraction_mean,
    last_fraction_mean,
    representation_rank,
)
from ribbed.continual.runner import Method, OnlineRun, build_learner, run_online, tune_lr

__all__ = [
    "Method",
    "OnlineRun",
    "build_learner",
    "dead_fraction",
    "dead_units",
    "early_fraction_mean",
    "last_fraction_mean",
    "representation_rank",
    "run_online",
    "tune_lr",
]
