"""Curriculum and data-order samplers for the training loop (``data.sampler`` in a config).

Paced samplers (Hacohen & Weinshall 2019; Wu et al. 2021) order the training set once, then
draw the batch of step ``t`` uniformly without replacement from the first ``n(t)`` examples
of that order, with ``n(t) = max(batch_size, ceil(N · pacing(t)))``:

* ``curriculum``: easiest first (ascending difficulty);
* ``anti-curriculum``: hardest first;
* ``random-curriculum``: a random fixed order with the *same* pacing, the control without
  which a curriculum result means nothing (it separates "a growing subset" from "easy first").

Data-order samplers walk through the set in a fixed sequence of batches each epoch, to set
beside ``shuffle`` (a fresh permutation each epoch, the default):

* ``fixed-order``: one random permutation drawn once from the seed, repeated every epoch;
* ``difficulty-order``: sorted by difficulty, easiest first (or ``hardest_first``).

Every batch is a pure function of ``(seed, step)``: the order is computed at construction
and each step's draw uses a generator seeded by the seed and the step, so a resumed run sees
exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from ribbed.curriculum.difficulty import difficulty_scores
from ribbed.curriculum.pacing import build_pacing
from ribbed.data import Split
from ribbed.train import register_sampler
from ribbed.train.batches import BatchStream

__all__ = ["DifficultyOrder", "FixedOrder", "PacedSampler", "difficulty_order"]

ORDERS = ("easy-first", "hard-first", "random")


def _step_generator(seed: int, step: int) -> torch.Generator:
    """A generator for step ``step`` of seed ``seed``, independent of every other step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 2 + 1)


def _options(field: str, value: dict[str, Any] | None) -> dict[str, Any]:
    """``value`` as an options mapping (``None`` is none); anything else is an error naming ``field``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"data.sampler.options.{field}: got {value!r}; allowed: a mapping of option names to values")
    return value


def difficulty_order(
    split: Split, difficulty: str, difficulty_options: dict[str, Any] | None = None, *,
    hardest_first: bool = False, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Indices of ``split`` sorted by difficulty score (stable, so ties keep data order)."""
    if not isinstance(hardest_first, bool):
        raise ValueError(f"data.sampler.options.hardest_first: got {hardest_first!r}; allowed: true or false")
    options = _options("difficulty_options", difficulty_options)
    scores = difficulty_scores(split, difficulty, device=device, **options)
    return torch.sort(scores, descending=hardest_first, stable=True).indices


class PacedSampler:
    """Batches drawn from a growing prefix of an ordering of the training set.

    Args:
        split: the training split.
        batch_size, seed, device: from the run config.
        order: ``easy-first`` (curriculum), ``hard-first`` (anti-curriculum) or ``random``
            (a random fixed order from ``seed``: the control).
        difficulty: a difficulty score (see ``ribbed.curriculum.list_difficulty_scores``).
        difficulty_options: that score's options.
        pacing: a pacing function (see ``ribbed.curriculum.list_pacings``).
        pacing_options: its options (``degree``, ``rate``, ``levels``).
        start_fraction: fraction of the set available at step 0.
        full_at: the step from which the whole set is available.
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        order: str = "easy-first",
        difficulty: str = "reference",
        difficulty_options: dict[str, Any] | None = None,
        pacing: str = "root",
        pacing_options: dict[str, Any] | None = None,
        start_fraction: float = 0.1,
        full_at: int = 1000,
    ):
        if order not in ORDERS:
            raise ValueError(f"data.sampler.options.order: got {order!r}; allowed: {', '.join(ORDERS)}")
        if batch_size > len(split):
            raise ValueError(
                f"data.batch_size: got {batch_size}; allowed: at most the training set size ({len(split)})"
            )
        self.pacing = build_pacing(
            pacing, start=start_fraction, full_at=full_at, **_options("pacing_options", pacing_options)
        )
        if order == "random":
            generator = torch.Generator().manual_seed(seed)
            self.order = torch.randperm(len(split), generator=generator).to(device)
        else:
            self.order = difficulty_order(
                split, difficulty, difficulty_options, hardest_first=order == "hard-first", device=device
            )
        self._x = split.x.to(device)
        self._y = split.y.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(split) // batch_size

    def available(self, step: int) -> int:
        """How many examples (a prefix of ``self.order``) step ``step`` draws from."""
        count = math.ceil(len(self.order) * self.pacing(step) - 1e-9)
        return min(len(self.order), max(self.batch_size, count))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of optimiser step ``step``."""
        pool = self.available(step)
        draw = torch.randperm(pool, generator=_step_generator(self.seed, step))[: self.batch_size]
        rows = self.order[draw.to(self.order.device)]
        return self._x[rows], self._y[rows]


def _register_paced(name: str, order: str, description: str, hidden: tuple[str, ...] = ()) -> None:
    """Register :class:`PacedSampler` with a fixed ``order`` under ``name``; ``hidden``
    options are not offered (the random control has no difficulty score to set)."""

    def factory(split: Split, **options) -> PacedSampler:
        return PacedSampler(split, order=order, **options)

    signature = inspect.signature(PacedSampler.__init__)
    factory.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]  # read by inspect.signature
        p for key, p in signature.parameters.items() if key not in ("self", "order", *hidden)
    ])
    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = f"PacedSampler with order={order!r}: {description}"
    register_sampler(name, description)(factory)


_register_paced("curriculum", "easy-first", "curriculum: batches from a growing easiest-first prefix")
_register_paced("anti-curriculum", "hard-first", "anti-curriculum: batches from a growing hardest-first prefix")
_register_paced(
    "random-curriculum", "random",
    "the control: a growing prefix of a random fixed order, same pacing as a curriculum",
    hidden=("difficulty", "difficulty_options"),
)


class _FixedEpochOrder(BatchStream):
    """:class:`BatchStream` whose every epoch walks the same order, ``self.order``."""

    order: torch.Tensor

    def _permutation(self, epoch: int) -> torch.Tensor:
        return self.order


@register_sampler("fixed-order", "one random permutation drawn from the seed, repeated every epoch")
class FixedOrder(_FixedEpochOrder):
    """The permutation of ``seed`` every epoch: the order is random but never reshuffled.

    It is ``shuffle``'s first-epoch permutation, so the two samplers differ only from the
    second epoch on: the comparison isolates reshuffling.
    """

    def __init__(self, split: Split, *, batch_size: int, seed: int, device: torch.device):
        super().__init__(split, batch_size=batch_size, seed=seed, device=device)
        self.order = BatchStream._permutation(self, 0)


@register_sampler(
    "difficulty-order", "the set sorted by difficulty (easiest first unless hardest_first), every epoch"
)
class DifficultyOrder(_FixedEpochOrder):
    """Every epoch walks the set sorted by ``difficulty``: consecutive batches of similar difficulty."""

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        seed: int,
        device: torch.device,
        difficulty: str = "reference",
        difficulty_options: dict[str, Any] | None = None,
        hardest_first: bool = False,
    ):
        super().__init__(split, batch_size=batch_size, seed=seed, device=device)
        self.order = difficulty_order(
            split, difficulty, difficulty_options, hardest_first=hardest_first, device=device
        )
