"""RIBBED's research pieces as chain transforms (``ribbed.core.chain``), each with its constructor.

Each piece keeps its own module (the algorithm, usable on its own: continual backprop's
:class:`~ribbed.core.resets.Resetting` and the ``norm-projected`` baseline run the same
:class:`~ribbed.core.resets.NeuronResets` and :class:`~ribbed.core.projection.NeuronNormProjection`
without a chain); here each becomes a transform by saying *when* it acts in a step:

==========================  ==============  =====================================================
constructor                 acts            what
==========================  ==============  =====================================================
:func:`information_density`  before update   measure entropy / mutual information every ``every`` steps
:func:`controllers`          the update      per-neuron step multipliers (``ribbed.core.modulation``)
:func:`guided_es`            before update   blend a zeroth-order estimate into ``.grad``
:func:`chiral_term`          before update   ``G <- G + gamma J G``, optionally selecting its signs
:func:`neuron_resets`        after update    re-initialise low-utility neurons
:func:`norm_projection`      after update    rescale each neuron's incoming weights to their start norm
==========================  ==============  =====================================================

A chain runs them in the order given; ``ribbed.core.optimizer.RIBBED`` gives them in this order.
"""

from __future__ import annotations

from typing import Any

import torch

from ribbed.checks import check_integer, check_number
from ribbed.core.chain import NeuronChain, NeuronTransform, StepContext, TransformSpec
from ribbed.core.chiral import ChiralTerm, check_chiral_options
from ribbed.core.density import InformationDensity
from ribbed.core.evolution import TRIAL_EVALUATIONS, GuidedES, evolve_chirality
from ribbed.core.modulation import NeuronControllers, controllers
from ribbed.core.projection import NeuronNormProjection, check_projection_scope
from ribbed.core.resets import NeuronResets, check_reset_options

__all__ = ["chiral_term", "controllers", "guided_es", "information_density", "neuron_resets", "norm_projection"]



class DensityTransform(InformationDensity, NeuronTransform):
    """Information density measured on the forward pass of every ``every``-th step."""

    name = "density"

    def __init__(self, chain: NeuronChain, *, every: int, bins: int):
        super().__init__(chain.layers, bins=bins)
        self.every = every
        self.arm(True)

    def before_update(self, ctx: StepContext) -> None:
        self.measure()
        self.arm((ctx.step + 1) % self.every == 0)

    def recorders(self) -> list:
        return [self]


def information_density(every: int, *, bins: int = 16) -> TransformSpec:
    """Per-neuron entropy, mutual information with the labels given to ``observe_labels``, Hoyer
    sparsity and per-layer effective rank, every ``every`` steps (``ribbed.core.density``)."""
    check_integer("density_every", every, 1)
    return TransformSpec("density", lambda chain: DensityTransform(chain, every=every, bins=bins))


class GuidedESTransform(GuidedES, NeuronTransform):
    """Guided evolution strategies blended into the gradients every ``every`` steps."""

    name = "es"
    needs_batch = True

    def __init__(self, chain: NeuronChain, *, every: int, **options: Any):
        super().__init__(chain.layers, **options)
        self.generator, self.every = chain.generator, every

    def before_update(self, ctx: StepContext) -> None:
        if ctx.step % self.every == 0 and self.ready():
            with ctx.probe(self.params, TRIAL_EVALUATIONS) as probe:
                self.blend(probe, self.generator)

    def telemetry(self) -> dict[str, float]:
        return dict(self.last)


def guided_es(every: int, *, population: int = 4, sigma: float = 1e-2, alpha: float = 0.5, subspace: int = 4,
              weight: float = 0.5) -> TransformSpec:
    """Guided ES (Maheswaranathan et al., ICML 2019) every ``every`` steps (``ribbed.core.evolution``)."""
    check_integer("es_every", every, 1)
    check_integer("es_population", population)
    check_integer("es_subspace", subspace)
    check_number("es_sigma", sigma, "a number > 0", lambda v: v > 0)
    check_number("es_alpha", alpha, "a number in [0, 1]", lambda v: 0 <= v <= 1)
    check_number("es_weight", weight, "a number in [0, 1]", lambda v: 0 <= v <= 1)
    return TransformSpec("es", lambda chain: GuidedESTransform(chain, every=every, population=population, sigma=sigma,
                                                               alpha=alpha, subspace=subspace, weight=weight))


class ChiralTransform(ChiralTerm, NeuronTransform):
    """The chiral term on the gradients, its graphs rebuilt every ``graph_every`` steps and its
    per-layer signs selected every ``selection_every`` steps (0: never)."""

    name = "chiral"

    def __init__(self, chain: NeuronChain, *, gamma: float, graph: str, neighbours: int, graph_every: int,
                 selection_every: int, population: int):
        super().__init__(gamma, graph, neighbours)
        self.layers, self.generator, self.base = chain.layers, chain.generator, chain.base
        controllers = chain.transforms.get("controllers")
        self.controllers = controllers if isinstance(controllers, NeuronControllers) else None
        self.chain_update = chain.trial_update
        self.graph_every, self.selection_every, self.population = graph_every, selection_every, population
        self.needs_batch = bool(selection_every)

    def before_update(self, ctx: StepContext) -> None:
        if ctx.step % self.graph_every == 0 or not self.structure:
            assignment = self.controllers.clusters.assignment if self.controllers is not None else None
            self.refresh(self.layers, self.generator, assignment)
        if self.selection_every and ctx.step % self.selection_every == 0:
            self._select(ctx)
        self.apply(self.layers)

    def _select(self, ctx: StepContext) -> None:
        """Selection over the signs (``ribbed.core.evolution.evolve_chirality``), before the term
        is applied; each candidate's trial step is this step's update with the current multipliers."""
        owners = [p for group in ctx.chain.param_groups for p in group["params"]]
        with ctx.probe(owners, TRIAL_EVALUATIONS) as probe:
            before = dict(zip(owners, probe.saved, strict=True))
            evolve_chirality(self, self.layers, probe, self.base, lambda: self.chain_update(before),
                             population=self.population, generator=self.generator)

    def telemetry(self) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"structure": list(self.structure), "signs": None if self.signs is None else self.signs.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.structure = list(state["structure"])
        self.signs = state.get("signs")  # absent in checkpoints from before per-layer signs


def chiral_term(gamma: float, *, graph: str = "ring", neighbours: int = 4, graph_every: int = 100,
                selection_every: int = 0, population: int = 6) -> TransformSpec:
    """The chiral term ``G <- G + s_l gamma J G`` (``ribbed.core.chiral``); with
    ``selection_every`` its per-layer signs are selected on the loss after trial steps."""
    check_chiral_options(graph, neighbours)
    check_integer("graph_every", graph_every)
    if not gamma:
        raise ValueError(f"chiral_gamma: got {gamma!r}; allowed: a number != 0 (leave the transform out for none)")
    return TransformSpec("chiral", lambda chain: ChiralTransform(
        chain, gamma=gamma, graph=graph, neighbours=neighbours, graph_every=graph_every,
        selection_every=selection_every, population=population), row_by_row=("chiral_gamma", gamma, "0"))


class ResetTransform(NeuronResets, NeuronTransform):
    """Neuron resets after the update; the neurons replaced are reported to the chain."""

    name = "resets"

    def __init__(self, chain: NeuronChain, **options: Any):
        super().__init__(chain.layers, chain.base, **options)
        self.generator = chain.generator

    def after_update(self, ctx: StepContext) -> None:
        changed = self.step(ctx.step + 1, self.generator)
        if changed:
            ctx.replace(changed, torch.cat([layer.offset + index for layer, index in self.replaced]))


def neuron_resets(*, reset_rate: float = 0.0, reset_threshold: float | None = None, reset_maturity: int = 100,
                  reset_every: int = 1, reset_utility: str = "contribution",
                  utility_decay: float = 0.99) -> TransformSpec:
    """Utility-driven neuron resets: continual backprop's rate (``reset_rate``) and/or ReDo's
    dormancy threshold (``reset_threshold``), ``ribbed.core.resets``."""
    check_reset_options(reset_rate=reset_rate, reset_threshold=reset_threshold, reset_maturity=reset_maturity,
                        reset_every=reset_every, utility_decay=utility_decay, utility=reset_utility)
    options = dict(reset_rate=reset_rate, reset_threshold=reset_threshold, reset_maturity=reset_maturity,
                   reset_every=reset_every, utility_decay=utility_decay, utility=reset_utility)
    field, value = ("reset_rate", reset_rate) if reset_rate > 0 else ("reset_threshold", reset_threshold)
    allowed = "0" if field == "reset_rate" else "None"
    return TransformSpec("resets", lambda chain: ResetTransform(chain, **options), row_by_row=(field, value, allowed))


class ProjectionTransform(NeuronNormProjection, NeuronTransform):
    """The norm projection after the update (and after resets, which it projects back)."""

    name = "projection"

    def __init__(self, chain: NeuronChain, *, scope: str):
        super().__init__(chain.layers, scope=scope)

    def after_update(self, ctx: StepContext) -> None:
        self.project()


def norm_projection(scope: str = "hidden") -> TransformSpec:
    """Each neuron's incoming weights rescaled to their norm at construction after every step
    (``ribbed.core.projection``; ``scope``: ``hidden`` or ``all``)."""
    scope = check_projection_scope(scope)
    return TransformSpec("projection", lambda chain: ProjectionTransform(chain, scope=scope),
                         row_by_row=("norm_projection", scope, "None"))
