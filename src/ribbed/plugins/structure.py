"""Structure adaptation: dense-to-sparse pruning and rewiring guided by information density
and gradients, with the model's learned activation mixtures logged.

The ``ribbed-structure`` training plug-in starts from the dense model. Its target sparsity
follows the gradual pruning schedule of Zhu & Gupta (2018, "To prune, or not to prune",
arXiv:1710.01878), ``s(t) = s_f (1 - (1 - (t - t_0)/(t_1 - t_0))^3)`` between ``t_0`` and ``t_1``
(``start_fraction`` and ``end_fraction`` of training). Every ``update_every`` steps in
``[t_0, t_1]`` (and at ``t_1``), for each ``Linear``/``Conv`` weight:

1. **prune**: the live connections with the smallest score ``|w_ij| (1 + beta r_i)`` are masked
   until the layer's density is ``1 - s(t)``; ``r_i`` in ``[0, 1]`` is neuron ``i``'s rank within
   its layer by information density (``ribbed.core.density``: mutual information with the
   label, or entropy when no labels match), so neurons that carry little information lose
   their inputs first; ``beta = density_weight`` (``guide="magnitude"``: plain magnitude
   pruning);
2. **rewire** (RigL, Evci et al. 2020, arXiv:1911.11134): ``regrow_fraction`` of the live
   connections with the smallest score are dropped and as many dead ones with the largest
   *dense* gradient grown (:func:`ribbed.sparse.rigl.drop_and_grow`); grown connections start
   at zero weight and zero optimiser state (:meth:`ribbed.sparse.masks.WeightMasks.update`).

Masks hold on gradients before and on weights after every optimiser step
(:class:`ribbed.sparse.plugin.MaskedWeightsPlugin`), so any optimiser, RIBBED included,
respects them. Each layer's update is an event in :attr:`StructureAdaptation.events`
(``step``, ``layer``, ``target_sparsity``, ``live``, ``pruned``, ``regrown``), kept in the
plug-in's checkpoint state; the metrics rows get cumulative counts, and for models with
learned activation mixtures (``activation: mixture``) the fraction of units whose heaviest
function is each of them (``structure_mixture_<name>``) and the mean entropy of the mixture
weights (``structure_mixture_entropy``).

Why our own code: ``torch.nn.utils.prune`` has no schedule, no regrowth and re-parametrises
weights (see ``ribbed.sparse.masks``); RigL's drop-and-grow is reused from ``ribbed.sparse``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from ribbed.core.density import InformationDensity, check_density_options
from ribbed.core.layers import find_neuron_layers
from ribbed.nn.activations import ActivationMixture
from ribbed.sparse.plugin import MaskedWeightsPlugin, check_fraction
from ribbed.sparse.rigl import drop_and_grow
from ribbed.train import StepBatch, register_plugin

__all__ = ["GUIDES", "StructureAdaptation", "adapt_layer", "cubic_sparsity", "mixture_summary", "neuron_rank"]

GUIDES = ("mutual-information", "entropy", "magnitude")


def cubic_sparsity(step: int, final: float, start: int, end: int) -> float:
    """Target sparsity at ``step``: 0 before ``start``, ``final`` from ``end`` on, cubic between."""
    if step <= start:
        return 0.0
    progress = min(1.0, (step - start) / max(1, end - start))
    return final * (1 - (1 - progress) ** 3)


def neuron_rank(density: torch.Tensor) -> torch.Tensor:
    """Each neuron's rank within its layer by ``density``, scaled to ``[0, 1]`` (NaN lowest)."""
    order = density.nan_to_num(-torch.inf).argsort().argsort()
    return order.to(torch.float32) / max(1, density.numel() - 1)


def prune_smallest(scores: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``mask`` with its ``count`` live entries of smallest ``scores`` set to 0."""
    live = mask.reshape(-1) > 0
    candidates = torch.where(live, scores.reshape(-1), torch.inf)
    new = live.clone()
    new[candidates.topk(count, largest=False).indices] = False
    return new.view_as(mask).to(mask.dtype)


def adapt_layer(weight: torch.Tensor, grad: torch.Tensor | None, mask: torch.Tensor, rank: torch.Tensor,
                *, keep: int, regrow_fraction: float, density_weight: float) -> tuple[torch.Tensor, int, int]:
    """One layer's new mask with ``keep`` live connections: prune by density-weighted magnitude,
    then drop and regrow ``regrow_fraction`` of them by gradient. Returns ``(mask, pruned,
    regrown)``. ``rank [out_features]`` is the neurons' density rank (rows of ``weight``)."""
    rows = (1 + density_weight * rank.to(weight)).view(-1, *([1] * (weight.dim() - 1)))
    scores = weight.abs() * rows
    live = int(mask.sum())
    pruned = max(0, live - keep)
    new = prune_smallest(scores, mask, pruned) if pruned else mask
    regrown = int(regrow_fraction * min(live, keep)) if grad is not None else 0
    if regrown and grad is not None:  # no gradient: nothing regrows
        new = drop_and_grow(scores, grad, new, regrown)
    return new, pruned, regrown


def mixture_summary(model: nn.Module) -> dict[str, float]:
    """Fraction of mixture units preferring each function, and the mean weight entropy."""
    mixtures = [m for m in model.modules() if isinstance(m, ActivationMixture)]
    if not mixtures:
        return {}
    counts: dict[str, float] = {}
    entropies, units = [], 0
    for mixture in mixtures:
        weights = mixture.weights().detach()
        preferred = torch.bincount(weights.argmax(-1), minlength=len(mixture.functions)).tolist()
        for name, count in zip(mixture.functions, preferred, strict=True):
            counts[name] = counts.get(name, 0.0) + count
        entropies.append(-(weights * weights.clamp_min(1e-30).log()).sum(-1))
        units += weights.shape[0]
    row = {f"structure_mixture_{name}": count / units for name, count in counts.items()}
    row["structure_mixture_entropy"] = float(torch.cat(entropies).mean())
    return row


@register_plugin("ribbed-structure", "dense-to-sparse pruning and rewiring guided by information density and gradient")
class StructureAdaptation(MaskedWeightsPlugin):
    """Gradual pruning and RigL-style regrowth guided by information density (module docstring).

    Args:
        final_sparsity: fraction of prunable weights that are zero at the end, in [0, 1) (0: no
            pruning; the plug-in then only rewires, if ``regrow_fraction > 0``, and logs).
        start_fraction: fraction of training where pruning starts.
        end_fraction: fraction of training where the final sparsity is reached and the
            structure is frozen.
        update_every: steps between structure updates.
        regrow_fraction: fraction of live connections dropped and regrown by gradient at each
            update (0: pruning only).
        guide: ``mutual-information`` (entropy when no labels match), ``entropy``, or
            ``magnitude`` (no density, plain magnitude pruning).
        density_weight: ``beta``, how much a neuron's density rank protects its connections.
        bins: histogram bins of the density estimates.
        max_samples: output rows per layer used by the density estimates.
        exclude: glob patterns of weight names kept dense (e.g. ``["head.*"]``).
    """

    name = "ribbed-structure"

    def __init__(self, final_sparsity: float = 0.8, start_fraction: float = 0.1, end_fraction: float = 0.6,
                 update_every: int = 50, regrow_fraction: float = 0.1, guide: str = "mutual-information",
                 density_weight: float = 1.0, bins: int = 16, max_samples: int = 2048,
                 exclude: Sequence[str] = ()):
        super().__init__(exclude)
        self.final_sparsity = check_fraction("final_sparsity", final_sparsity)
        self.start_fraction = check_fraction("start_fraction", start_fraction)
        self.end_fraction = check_fraction("end_fraction", end_fraction, low_open=True, high_open=False)
        if self.end_fraction <= self.start_fraction:
            raise ValueError(f"end_fraction={end_fraction!r}; allowed: a number above start_fraction="
                             f"{start_fraction!r}")
        if not (isinstance(update_every, int) and not isinstance(update_every, bool) and update_every > 0):
            raise ValueError(f"update_every={update_every!r}; allowed: a positive integer")
        self.regrow_fraction = check_fraction("regrow_fraction", regrow_fraction)
        if guide not in GUIDES:
            raise ValueError(f"guide={guide!r}; allowed: {', '.join(GUIDES)}")
        if not isinstance(density_weight, int | float) or isinstance(density_weight, bool) or density_weight < 0:
            raise ValueError(f"density_weight={density_weight!r}; allowed: a number >= 0")
        self.update_every, self.guide, self.density_weight = update_every, guide, float(density_weight)
        check_density_options(bins, max_samples, "miller-madow")
        self.density_options: dict[str, Any] = {"bins": bins, "max_samples": max_samples}
        self.events: list[dict[str, Any]] = []
        self.pruned = self.regrown = 0

    def attach(self, parts) -> None:
        super().attach(parts)
        steps = parts.config.train.steps
        self.start, self.end = int(self.start_fraction * steps), max(1, int(self.end_fraction * steps))
        self.probe = None
        if self.guide != "magnitude":
            masked = cast(set[nn.Parameter], set(self.masks.params))  # the masked weights are parameters
            layers = find_neuron_layers(parts.model, masked, hooks=False)
            self.probe = InformationDensity(layers, **self.density_options)
            self.probe.arm(self.is_update(0))

    def is_update(self, step: int) -> bool:
        """Whether the structure changes at ``step``."""
        in_window = 0 < step and self.start <= step <= self.end
        return in_window and ((step - self.start) % self.update_every == 0 or step == self.end)

    def target_sparsity(self, step: int) -> float:
        return cubic_sparsity(step, self.final_sparsity, self.start, self.end)

    def before_step(self, step: int, batch: StepBatch) -> None:
        if self.is_update(step):
            self._adapt(step, batch.y)
        super().before_step(step, batch)

    def after_step(self, step: int, batch: StepBatch) -> None:
        super().after_step(step, batch)
        if self.probe is not None:
            self.probe.arm(self.is_update(step + 1))

    def _ranks(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each masked layer's neuron density ranks, from the outputs kept on the batch of
        ``labels`` (empty for magnitude pruning)."""
        if self.probe is None:
            return {}
        self.probe.observe_labels(labels)
        if not self.probe.measure():
            return {}
        values = self.probe.values
        density = values["entropy"] if self.guide == "entropy" else values.get("mutual_information",
                                                                              values["entropy"])
        return {name: neuron_rank(density[rows]) for name, rows in self.probe.layer_slices().items()}

    @torch.no_grad()
    def _adapt(self, step: int, labels: torch.Tensor) -> None:
        sparsity = self.target_sparsity(step)
        ranks = self._ranks(labels)
        regrow = self.regrow_fraction if step < self.end else 0.0
        new_masks = []
        for name, param, mask in zip(self.masks.module_names, self.masks.params, self.masks.masks, strict=True):
            rank = ranks.get(name, torch.zeros(param.shape[0]))
            keep = max(1, round((1 - sparsity) * param.numel()))
            new, pruned, regrown = adapt_layer(param, param.grad, mask, rank, keep=keep,
                                               regrow_fraction=regrow, density_weight=self.density_weight)
            new_masks.append(new)
            self.pruned, self.regrown = self.pruned + pruned, self.regrown + regrown
            self.events.append({"step": step, "layer": name, "target_sparsity": sparsity,
                                "live": int(new.sum()), "pruned": pruned, "regrown": regrown})
        self.masks.update(new_masks, self.optimizer)

    def metrics(self) -> dict[str, float]:
        last = self.events[-1]["step"] if self.events else 0
        return {**super().metrics(), "structure_target_sparsity": self.target_sparsity(last),
                "structure_pruned": float(self.pruned), "structure_regrown": float(self.regrown),
                "structure_events": float(len(self.events)), **mixture_summary(self.model)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "events": [dict(event) for event in self.events],
                "pruned": self.pruned, "regrown": self.regrown}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.events = [dict(event) for event in state["events"]]
        self.pruned, self.regrown = state["pruned"], state["regrown"]
