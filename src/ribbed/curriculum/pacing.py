"""Pacing functions: how much of the (difficulty-ordered) training set a step may draw from.

A curriculum sorts the training set and, at optimiser step ``t``, samples batches from the
first ``n(t)`` examples only. The pacing function gives that fraction,

    fraction(t) = start + (1 - start) · f(min(t / full_at, 1)),

where ``f`` is a monotone map of ``[0, 1]`` onto ``[0, 1]`` with ``f(0) = 0`` and
``f(1) = 1``: the run starts on the ``start`` fraction and sees the whole set from step
``full_at`` on. This is the parametrisation of Wu, Dyer & Neyshabur (2021, "When do curricula
work?", ICLR, arXiv:2012.03107, Table 1: ``b`` = ``start``, ``aT`` = ``full_at``), whose
families are registered here; ``geometric`` is the exponential pacing of Hacohen & Weinshall
(2019, "On the power of curriculum learning in training deep networks", ICML,
arXiv:1904.03626), made continuous: the fraction grows by a constant factor per step.

Example:
    >>> pacing = build_pacing("linear", start=0.2, full_at=100)
    >>> [round(pacing(t), 2) for t in (0, 50, 100, 1000)]
    [0.2, 0.6, 1.0, 1.0]
"""

from __future__ import annotations

import math

import torch

from ribbed.registry import Registry

__all__ = ["PACINGS", "Pacing", "build_pacing", "list_pacings", "register_pacing"]

# f(progress, start, **options) -> fraction, progress a float64 tensor in [0, 1].

PACINGS: Registry[torch.Tensor] = Registry(  # a pacing function returns the fractions
    "pacing function", "data.sampler.options.pacing", positional=("progress", "start")
)


def register_pacing(name: str, description: str):
    """Register ``fn(progress, start, **options) -> fraction`` (tensors in ``[0, 1]``).

    ``fn`` must be non-decreasing in ``progress`` with ``fn(0) = start`` and ``fn(1) = 1``.
    """
    return PACINGS.register(name, description)


def list_pacings() -> dict[str, str]:
    return PACINGS.describe()


def _affine(start: float, unit: torch.Tensor) -> torch.Tensor:
    """``start + (1 - start) · unit``: lift a map of [0, 1] onto [0, 1] to start at ``start``."""
    return start + (1.0 - start) * unit


@register_pacing("linear", "the fraction grows linearly (Wu et al. 2021)")
def linear(progress: torch.Tensor, start: float) -> torch.Tensor:
    return _affine(start, progress)


@register_pacing("quadratic", "slow, then fast: progress squared (Wu et al. 2021)")
def quadratic(progress: torch.Tensor, start: float) -> torch.Tensor:
    return _affine(start, progress.square())


@register_pacing("root", "fast, then slow: progress ** (1/degree), degree 2 by default (Wu et al. 2021)")
def root(progress: torch.Tensor, start: float, degree: float = 2.0) -> torch.Tensor:
    if not degree >= 1.0:
        raise ValueError(f"pacing 'root' option degree: got {degree!r}; allowed: a number >= 1")
    return _affine(start, progress.pow(1.0 / degree))


@register_pacing(
    "geometric",
    "the fraction grows by a constant factor per step, start ** (1 - progress) "
    "(Hacohen & Weinshall 2019's exponential pacing, made continuous)",
)
def geometric(progress: torch.Tensor, start: float) -> torch.Tensor:
    return torch.as_tensor(start, dtype=progress.dtype).pow(1.0 - progress)


@register_pacing("exponential", "(exp(rate · progress) - 1) / (exp(rate) - 1), rate 10 (Wu et al. 2021)")
def exponential(progress: torch.Tensor, start: float, rate: float = 10.0) -> torch.Tensor:
    if not rate > 0:
        raise ValueError(f"pacing 'exponential' option rate: got {rate!r}; allowed: a number > 0")
    return _affine(start, torch.expm1(rate * progress) / math.expm1(rate))


@register_pacing("logarithmic", "1 + log(progress + exp(-rate)) / rate, rate 10 (Wu et al. 2021)")
def logarithmic(progress: torch.Tensor, start: float, rate: float = 10.0) -> torch.Tensor:
    if not rate > 0:
        raise ValueError(f"pacing 'logarithmic' option rate: got {rate!r}; allowed: a number > 0")
    unit = 1.0 + torch.log(progress + math.exp(-rate)) / rate
    return _affine(start, unit.clamp(0.0, 1.0))


@register_pacing("step", "a staircase of `levels` equal steps, 4 by default (Wu et al. 2021)")
def step(progress: torch.Tensor, start: float, levels: int = 4) -> torch.Tensor:
    if not (isinstance(levels, int) and not isinstance(levels, bool) and levels >= 1):
        raise ValueError(f"pacing 'step' option levels: got {levels!r}; allowed: an integer >= 1")
    return _affine(start, torch.floor(progress * levels) / levels)


class Pacing:
    """The fraction of the training set available at each optimiser step.

    Args:
        name: a registered pacing function (see :func:`list_pacings`).
        start: fraction available at step 0, in ``(0, 1]``.
        full_at: the step from which the whole set is available (a positive integer).
        **options: options of the pacing function (``degree``, ``rate``, ``levels``).
    """

    def __init__(self, name: str, *, start: float, full_at: int, **options):
        if not (isinstance(start, (int, float)) and 0.0 < start <= 1.0):
            raise ValueError(f"data.sampler.options.start_fraction: got {start!r}; allowed: 0 < start_fraction <= 1")
        if not (isinstance(full_at, int) and not isinstance(full_at, bool) and full_at >= 1):
            raise ValueError(f"data.sampler.options.full_at: got {full_at!r}; allowed: an integer >= 1 (a step)")
        self._fn = PACINGS.entry(name).factory
        PACINGS.build(name, torch.zeros(1, dtype=torch.float64), float(start), **options)
        self.name, self.start, self.full_at, self.options = name, float(start), full_at, options

    def fractions(self, steps: torch.Tensor) -> torch.Tensor:
        """The available fraction at each of ``steps`` (any shape), as float64."""
        progress = (steps.to(torch.float64) / self.full_at).clamp(0.0, 1.0)
        return self._fn(progress, self.start, **self.options).clamp(self.start, 1.0)

    def __call__(self, step: int) -> float:
        return float(self.fractions(torch.tensor(step)))


def build_pacing(name: str, *, start: float, full_at: int, **options) -> Pacing:
    """The :class:`Pacing` ``name``; unknown names and options are errors naming the field."""
    return Pacing(name, start=start, full_at=full_at, **options)
