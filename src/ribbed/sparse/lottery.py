"""Lottery tickets: iterative magnitude pruning with weight rewinding.

Frankle & Carbin (2019, "The Lottery Ticket Hypothesis", arXiv:1803.03635) train, prune the
smallest-magnitude weights, reset the survivors to their initial values and train again;
Frankle et al. (2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
arXiv:1912.05671) rewind to the weights of an early step ``k`` instead of step 0, which
finds tickets in larger networks. Within one run of the training loop, the run's steps are
split into ``rounds`` equal rounds. The state at step ``rewind_step`` (every parameter, the
optimiser state and the learning-rate schedule) is kept; at the end of each round except the
last, ``prune_fraction`` of the remaining weights with the smallest magnitude over all
masked layers (global pruning) are removed and the state is rewound. The last round trains
the ticket at sparsity ``1 - (1 - prune_fraction)^(rounds - 1)``; the run's final metrics
are the ticket's.

Because every round replays the schedule from step ``rewind_step``, the run needs a constant
learning-rate schedule (warm-up allowed): a cosine decaying over the whole run would give
each round a different stretch of it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from ribbed.sparse.plugin import MaskedWeightsPlugin, check_fraction
from ribbed.train import StepBatch, register_plugin

__all__ = ["LotteryTicket", "global_magnitude_prune"]


def global_magnitude_prune(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                           fraction: float) -> list[torch.Tensor]:
    """New masks with ``fraction`` of the live weights, smallest ``|w|`` over all layers, removed."""
    live = torch.cat([mask.reshape(-1) for mask in masks]) > 0
    scores = torch.where(live, torch.cat([w.detach().reshape(-1).abs() for w in weights]), torch.inf)
    count = int(fraction * int(live.sum()))
    live[scores.topk(count, largest=False).indices] = False
    return [part.view_as(mask).to(mask.dtype) for part, mask in
            zip(live.split([m.numel() for m in masks]), masks, strict=True)]


@register_plugin("lottery-ticket", "iterative magnitude pruning with weight rewinding (lottery tickets)")
class LotteryTicket(MaskedWeightsPlugin):
    """Iterative magnitude pruning with rewinding to step ``rewind_step``.

    Args:
        rounds: train-prune-rewind rounds (the last one trains the final ticket).
        prune_fraction: fraction of the remaining weights pruned after each round, in (0, 1).
        rewind_step: the step whose weights, optimiser state and schedule every round
            restarts from (0: the initial weights, as in the original hypothesis).
        exclude: glob patterns of weight names never pruned.
    """

    name = "lottery-ticket"

    def __init__(self, rounds: int = 4, prune_fraction: float = 0.2, rewind_step: int = 0,
                 exclude: Sequence[str] = ()):
        super().__init__(exclude)
        if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds > 0):
            raise ValueError(f"rounds={rounds!r}; allowed: a positive integer")
        if not (isinstance(rewind_step, int) and not isinstance(rewind_step, bool) and rewind_step >= 0):
            raise ValueError(f"rewind_step={rewind_step!r}; allowed: an integer >= 0")
        self.rounds, self.rewind_step = rounds, rewind_step
        self.prune_fraction = check_fraction("prune_fraction", prune_fraction, low_open=True)
        self.round = 0
        self.snapshot: dict[str, Any] | None = None

    def attach(self, parts) -> None:
        steps, schedule = parts.config.train.steps, parts.config.schedule
        self.round_steps = steps // self.rounds
        if self.rewind_step >= self.round_steps:
            raise ValueError(
                f"rewind_step={self.rewind_step}; allowed: below the {self.round_steps} steps of a "
                f"round (train.steps={steps} split into rounds={self.rounds})")
        if self.rounds > 1 and schedule.kind != "constant":
            raise ValueError(
                f"schedule.kind={schedule.kind!r} decays over the whole run, but each of the "
                f"{self.rounds} rounds rewinds to step {self.rewind_step}; allowed: 'constant' "
                "(warm-up allowed)")
        super().attach(parts)
        self.params = list(parts.model.parameters())
        self.scheduler = parts.scheduler
        if self.rewind_step == 0:
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        self.snapshot = {
            "params": [p.detach().clone() for p in self.params],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
        }

    @torch.no_grad()
    def _prune_and_rewind(self) -> None:
        pruned = global_magnitude_prune(self.masks.params, self.masks.masks, self.prune_fraction)
        torch._foreach_copy_(self.masks.masks, pruned)
        snapshot = self.snapshot
        assert snapshot is not None  # taken at rewind_step, before the first round ends (checked in attach)
        torch._foreach_copy_(self.params, snapshot["params"])
        self.masks.apply_to_weights()
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        self.scheduler.load_state_dict(snapshot["scheduler"])

    def after_step(self, step: int, batch: StepBatch) -> None:
        super().after_step(step, batch)
        done = step + 1
        if done == self.rewind_step:
            self._take_snapshot()
        if done % self.round_steps == 0 and self.round < self.rounds - 1:
            self._prune_and_rewind()
            self.round += 1

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "ticket_round": float(self.round)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "round": self.round, "snapshot": self.snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.round, self.snapshot = state["round"], state["snapshot"]
