"""``RIBBED``: a base optimiser whose every neuron is coupled to a small learned controller.

Use it like any ``torch.optim`` optimiser::

    opt = RIBBED(model, lr=1e-3)            # AdamW underneath by default
    loss.backward(); opt.step(); opt.zero_grad()

RIBBED is a chain of neuron transforms (``ribbed.core.chain.NeuronChain``) around a base
optimiser; this class builds the chain from flat keyword options, the form configs and the
``ribbed`` registry name use. Each piece is a transform (``ribbed.core.transforms``), run in
this order, and each is left out of the chain when off:

1. **information density** (``ribbed.core.density``, ``density_every``): per-neuron entropy,
   mutual information with the labels given to :meth:`RIBBED.observe_labels`, Hoyer sparsity,
   per-layer effective rank, logged in :meth:`RIBBED.telemetry` and a controller reward if
   ``density_reward > 0``;
2. **controllers** (``ribbed.core.modulation``, on by default): every ``feature_every`` steps,
   per-neuron features (``ribbed.core.features``), routing of neurons to a bank of tiny MLPs
   (online k-means with the coupling strategies of ``ribbed.core.routers`` and, optionally,
   the recursive grouping of ``ribbed.core.hierarchy``, logged in :meth:`RIBBED.topology_log`),
   and a step multiplier per neuron: by default a bounded residual ``exp(delta -
   mean_layer(delta))`` on the base rule (identity at the start and while frozen) trained on
   each neuron's long-horizon meta-gradient (``ribbed.core.signals``) with a quadratic penalty
   that keeps it interior; ``objective="linear"`` is the first Meta-BP design (explore/exploit
   heads, a coupling strength ``lambda``, the one-step hypergradient cosine), kept as an
   ablation; ``controller_training="unrolled"`` learns from the loss ``unroll_steps`` base steps
   ahead; ``evolve_every`` adds selection over mutants of the bank. The controllers perform the
   base update, each neuron's step scaled by its multiplier;
3. **guided ES** (``ribbed.core.evolution``, ``es_every``): a zeroth-order estimate of each
   layer's gradient blended into ``.grad``;
4. **chiral term** (``ribbed.core.chiral``, ``chiral_gamma``): ``G <- G + gamma J G`` on the
   gradients; ``evolve_chirality`` selects its per-layer signs;
5. **resets** (``ribbed.core.resets``, ``reset_rate`` / ``reset_threshold``): neurons whose
   contribution utility stays low are re-initialised (continual backprop, ReDo), with fresh
   optimiser state for their entries;
6. **norm projection** (``ribbed.core.projection``, ``norm_projection``): each neuron's incoming
   weights are rescaled to their starting norm, so a multiplier is the neuron's true effective
   step size however long training runs.

ES, selection and unrolled training evaluate the loss: call ``step(closure)`` or record the
step's batch (the ``keep-batch`` gradient method). With every piece off, ``step()`` is exactly
the base optimiser's ``step()`` (bit for bit). The learning rate and every other hyperparameter
live in the base optimiser's ``param_groups``, which this optimiser shares, so LR schedulers
work unchanged.

Named constructors return the published configurations: :func:`meta_bp` (the first Meta-BP
design) and :func:`continual` (the norm-projected RIBBED of the continual-learning benchmark).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ribbed.checks import check_integer, check_number
from ribbed.core.chain import BaseSpec, NeuronChain, TransformSpec
from ribbed.core.chiral import check_chiral_options
from ribbed.core.evolution import check_evolution_options
from ribbed.core.resets import check_reset_options
from ribbed.core.transforms import (
    chiral_term,
    guided_es,
    information_density,
    neuron_resets,
)
from ribbed.core.transforms import (
    controllers as controller_transform,
)
from ribbed.core.transforms import (
    norm_projection as projection_transform,
)
from ribbed.core.unrolled import check_unrolled_options

__all__ = ["RIBBED", "continual", "meta_bp"]

_CONTROLLER_STATE = ("bank", "controller_optimizer", "routing", "normalizer", "prev", "surprise", "multiplier",
                     "pending", "activations", "telemetry", "routed_at", "hierarchy", "signal")


class RIBBED(NeuronChain):
    """Neuron-coupled optimiser wrapping a base optimiser: the chain of transforms that flat
    keyword options describe (see the module docstring). This is the one place the flat
    options live; YAML configs and the ``ribbed`` registry name use them.

    Args:
        model: the network; its ``Linear``/``Conv`` layers and transformers' ``Conv1D`` (a
            transposed ``Linear``) are the neurons (forward hooks record activation statistics
            when ``activation_features`` is on: build RIBBED before the model's first
            ``torch.compile`` call). Embeddings, norms and a head tied to an embedding step as
            the plain base; :attr:`neuron_report` says which share of the parameters are neurons
            (a warning below half). A parameter list is refused: give it as ``params``.
        lr: learning rate of the base optimiser.
        base: registry name or import path (``"adamw"``, ``"torch.optim.SGD"``), or an optimiser
            class / callable ``(params, lr=, **base_options)``.
        base_options: keyword arguments of the base optimiser (``weight_decay``, ``momentum``...).
        params: parameters or param groups (default ``model.parameters()``).
        controllers: learn per-neuron step multipliers (off: every multiplier is 1).
        n_controllers: controllers in the bank (neuron groups).
        controller_hidden: hidden width of each controller MLP.
        controller_lr: Adam learning rate of the controllers (0: frozen; with the ``residual``
            objective every multiplier then stays 1 and RIBBED is its base bit for bit).
        max_multiplier: bound ``M`` of a step head: multipliers lie in ``[1/M, M]`` (``residual``:
            the bound of the log-multiplier before centring per layer is ``log M``).
        objective: ``residual`` (a bounded, layer-centred residual trained on ``signal`` with
            a quadratic penalty) or ``linear`` (the first design: heads, coupling, and the loss
            ``mean(cos * m)``, which drives multipliers to a bound); ``ribbed.core.controllers``.
        signal: what ``residual`` controllers learn from (``ribbed.core.signals``): ``trace``
            (a discounted eligibility trace of past updates, long horizon) or ``one-step``
            (the last update's hypergradient).
        trace_discount: discount of the trace per refresh, in ``[0, 1]``.
        signal_smoothing: per-neuron EMA factor of the normalised signal, in ``[0, 1)``.
        multiplier_penalty: weight of the quadratic penalty on the centred log-multiplier
            (``residual``); the optimum is ``delta = -signal / multiplier_penalty``.
        contextual_heads: explore/exploit heads mixed by a stability gate (off: one head;
            default on for ``linear``, unavailable for ``residual``).
        coupling: learn the Meta-BP coupling strength lambda (off: lambda = 1; default on for
            ``linear``, unavailable for ``residual``).
        self_supervision: predict next-step statistics; their error is the surprise feature.
        self_supervision_weight: weight of the prediction loss in the controller loss.
        activation_features: record activation mean/variance/entropy with forward hooks.
        entropy_bins: bins of the activation entropy.
        chiral_gamma: strength of the chiral term (0: off); its sign is the handedness.
        chiral_graph: ``ring``, ``knn`` or ``random`` (the topology-free control).
        chiral_neighbours: ``k`` of the ``knn`` graph.
        feature_every: refresh features and train controllers every this many steps (the
            multipliers stay fixed in between; refreshing is most of RIBBED's cost).
        routing_every: re-cluster neurons every this many steps (at the next refresh).
        graph_every: rebuild the chiral graphs every this many steps.
        density_every: measure information density every this many steps (0: off); the
            outputs of that step's forward pass are binned into ``entropy_bins`` bins.
        density_reward: weight of the density reward in the controller loss (0: off;
            ``ribbed.core.density.InformationDensity.reward_loss``: larger step multipliers
            for neurons with more mutual information with the label). Needs ``controllers``
            and ``density_every``.
        routing: coupling strategy routing neurons to controllers (``ribbed.core.routers``):
            ``dense`` (exact nearest centroid, the default), ``tree``, ``lsh``, ``sampled``
            (unsampled neurons keep controller and multiplier at a re-clustering) or
            ``topk-attention`` (each neuron mixes its k nearest controllers).
        routing_options: options of the strategy (``{"k": 2}``, ``{"fraction": 0.1}``...).
        hierarchy_depth: levels of recursive grouping (``ribbed.core.hierarchy``); 1 is flat
            routing exactly; level ``L + 1`` clusters level ``L``'s centroids and its controllers
            multiply the step multipliers of the clusters below by a factor in
            ``[1/hierarchy_bound, hierarchy_bound]``.
        hierarchy_branching: level ``L + 1`` has ``ceil(K_L / hierarchy_branching)`` clusters.
        hierarchy_bound: bound of each higher-level factor (a number > 1).
        merge_distance: merge two level-1 clusters whose centroids are closer than this, in
            standardised feature units (0: never).
        split_spread: split a level-1 cluster whose RMS spread exceeds this along its principal
            direction (None: never).
        max_controllers: level-1 controller slots that splits may fill (default ``n_controllers``).
        es_every: guided ES every this many steps (0: off; ``ribbed.core.evolution``).
        es_population: antithetic pairs per ES estimate (``2 * es_population`` loss evaluations).
        es_sigma: ES perturbation scale per layer (``E|eps|^2 = es_sigma^2``).
        es_alpha: isotropic share of the ES covariance (1: plain ES; 0: only the gradient subspace).
        es_subspace: recent gradients per layer spanning the guiding subspace.
        es_weight: share of the (norm-matched) ES direction blended into each layer's gradient.
        evolve_every: selection over the controller bank every this many steps (0: off).
        evolve_population: candidates per selection (the incumbent and its mutants).
        evolve_sigma: standard deviation of the mutations of the bank's parameters.
        controller_training: ``hypergradient`` (online, one step) or ``unrolled`` (meta-gradient
            through ``unroll_steps`` functional base steps; SGD, Adam or AdamW bases).
        unroll_steps: ``T`` of the unrolled mode.
        evolve_chirality: selection over the chiral term's per-layer handedness signs every
            ``evolve_every`` steps (needs ``chiral_gamma != 0``; ``evolve_population`` candidates,
            each scored on the loss after its trial base step; ``ribbed.core.evolution``).
        reset_rate: fraction of each layer's neurons re-initialised per step, lowest
            contribution utility first (``ribbed.core.resets``; 0: no rate limit).
        reset_threshold: re-initialise only neurons whose utility over the layer mean is at most
            this (ReDo's dormancy; None: any mature neuron, at the rate). Resets are on when
            ``reset_rate > 0`` or a threshold is given.
        reset_maturity: steps a neuron lives before it can be reset.
        reset_every: check for resets every this many steps.
        reset_utility: ``contribution`` (mean |activation| times outgoing weight size, continual
            backprop) or ``activity`` (mean |activation|, ReDo).
        utility_decay: EMA factor of the utility per training forward pass.
        norm_projection: ``"hidden"`` (every neuron layer but the last) or ``"all"``: after
            each step, rescale each neuron's incoming weights to their norm at construction
            (``ribbed.core.projection``; None: off).
        seed: seed of RIBBED's own randomness (controller init, clustering, graphs, resets).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = RIBBED(model, lr=1e-2)
        >>> model(torch.randn(16, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        *,
        base: BaseSpec = "adamw",
        base_options: dict[str, Any] | None = None,
        params: Iterable | None = None,
        controllers: bool = True,
        n_controllers: int = 4,
        controller_hidden: int = 16,
        controller_lr: float = 1e-2,
        max_multiplier: float = 4.0,
        objective: str = "residual",
        signal: str = "trace",
        trace_discount: float = 0.9,
        signal_smoothing: float = 0.9,
        multiplier_penalty: float = 1.0,
        contextual_heads: bool | None = None,
        coupling: bool | None = None,
        self_supervision: bool = True,
        self_supervision_weight: float = 0.1,
        activation_features: bool = True,
        entropy_bins: int = 16,
        chiral_gamma: float = 0.0,
        chiral_graph: str = "ring",
        chiral_neighbours: int = 4,
        feature_every: int = 10,
        routing_every: int = 50,
        graph_every: int = 100,
        density_every: int = 0,
        density_reward: float = 0.0,
        routing: str = "dense",
        routing_options: dict[str, Any] | None = None,
        hierarchy_depth: int = 1,
        hierarchy_branching: int = 4,
        hierarchy_bound: float = 2.0,
        merge_distance: float = 0.0,
        split_spread: float | None = None,
        max_controllers: int | None = None,
        es_every: int = 0,
        es_population: int = 4,
        es_sigma: float = 1e-2,
        es_alpha: float = 0.5,
        es_subspace: int = 4,
        es_weight: float = 0.5,
        evolve_every: int = 0,
        evolve_population: int = 6,
        evolve_sigma: float = 0.05,
        controller_training: str = "hypergradient",
        unroll_steps: int = 3,
        evolve_chirality: bool = False,
        reset_rate: float = 0.0,
        reset_threshold: float | None = None,
        reset_maturity: int = 100,
        reset_every: int = 1,
        reset_utility: str = "contribution",
        utility_decay: float = 0.99,
        norm_projection: str | None = None,
        seed: int = 0,
    ):
        check_number("lr", lr, "a number > 0", lambda v: v > 0)
        for name, value in (("n_controllers", n_controllers), ("controller_hidden", controller_hidden),
                            ("entropy_bins", entropy_bins), ("feature_every", feature_every),
                            ("routing_every", routing_every), ("graph_every", graph_every)):
            check_integer(name, value)
        check_integer("density_every", density_every, 0, " (0: off)")
        check_number("density_reward", density_reward, "a number >= 0 (0: off)", lambda v: v >= 0)
        if density_reward and not (controllers and density_every):
            raise ValueError(f"density_reward: got {density_reward!r} with controllers={controllers!r} and "
                             f"density_every={density_every!r}; allowed: 0 unless both are on")
        check_evolution_options(es_every=es_every, es_population=es_population, es_sigma=es_sigma,
                                es_alpha=es_alpha, es_subspace=es_subspace, es_weight=es_weight,
                                evolve_every=evolve_every, evolve_population=evolve_population,
                                evolve_sigma=evolve_sigma, controllers=controllers,
                                evolve_chirality=evolve_chirality, chiral_gamma=chiral_gamma)
        check_unrolled_options(controller_training, unroll_steps, controllers)
        check_chiral_options(chiral_graph, chiral_neighbours)  # every flat option is checked, on or off
        check_reset_options(reset_rate=reset_rate, reset_threshold=reset_threshold, reset_maturity=reset_maturity,
                            reset_every=reset_every, utility_decay=utility_decay, utility=reset_utility)
        check_number("max_multiplier", max_multiplier, "a number > 1", lambda v: v > 1)
        chain: list[TransformSpec] = []
        if density_every:
            chain.append(information_density(density_every, bins=entropy_bins))
        if controllers:
            chain.append(controller_transform(
                n_controllers=n_controllers, controller_hidden=controller_hidden, controller_lr=controller_lr,
                max_multiplier=max_multiplier, objective=objective, signal=signal, trace_discount=trace_discount,
                signal_smoothing=signal_smoothing, multiplier_penalty=multiplier_penalty,
                contextual_heads=contextual_heads, coupling=coupling, self_supervision=self_supervision,
                self_supervision_weight=self_supervision_weight, activation_features=activation_features,
                feature_every=feature_every, routing_every=routing_every, routing=routing,
                routing_options=routing_options, hierarchy_depth=hierarchy_depth,
                hierarchy_branching=hierarchy_branching, hierarchy_bound=hierarchy_bound,
                merge_distance=merge_distance, split_spread=split_spread, max_controllers=max_controllers,
                controller_training=controller_training, unroll_steps=unroll_steps, selection_every=evolve_every,
                selection_population=evolve_population, selection_sigma=evolve_sigma,
                density_reward=density_reward, seed=seed))
        if es_every:
            chain.append(guided_es(es_every, population=es_population, sigma=es_sigma, alpha=es_alpha,
                                   subspace=es_subspace, weight=es_weight))
        if chiral_gamma:
            chain.append(chiral_term(chiral_gamma, graph=chiral_graph, neighbours=chiral_neighbours,
                                     graph_every=graph_every, selection_every=evolve_every if evolve_chirality else 0,
                                     population=evolve_population))
        if reset_rate or reset_threshold is not None:
            chain.append(neuron_resets(reset_rate=reset_rate, reset_threshold=reset_threshold,
                                       reset_maturity=reset_maturity, reset_every=reset_every,
                                       reset_utility=reset_utility, utility_decay=utility_decay))
        if norm_projection is not None:
            chain.append(projection_transform(norm_projection))
        super().__init__(model, lr, transforms=chain, base=base, base_options=base_options, params=params,
                         entropy_bins=entropy_bins, seed=seed)

    known_transforms = ("density", "controllers", "es", "chiral", "resets", "projection")

    # ------------------------------------------------------------------ inspection

    def topology_log(self) -> list[dict[str, Any]]:
        """Topology evolution of the hierarchical grouping: events ``{step, level, kind:
        "merge" | "split" | "move", clusters, neurons}`` (empty without grouping)."""
        hierarchy = self.controllers.hierarchy if self.controllers is not None else None
        return [] if hierarchy is None else hierarchy.topology_log()

    @property
    def measures_density(self) -> bool:  # ribbed.optim.capabilities
        """Whether information density is measured (``density_every``): the labels given to
        :meth:`observe_labels` are then used, and the values join :meth:`telemetry`."""
        return self.density is not None

    def observe_labels(self, labels: torch.Tensor) -> None:
        """Labels of the batch of the coming ``step()``, for the mutual information of the
        information density (a no-op with ``density_every=0``); call it before ``step()``."""
        if self.density is not None:
            self.density.observe_labels(labels)

    def neuron_state(self) -> dict[str, torch.Tensor]:
        """Per-neuron values ``[N]`` of the last refresh (layers in model order), for plots."""
        return {} if self.controllers is None else self.controllers.neuron_state()

    # ------------------------------------------------------------------ persistence

    def upgrade_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Checkpoints from before the chain kept every piece's state flat (``bank``,
        ``chiral``, ``chiral_signs``, ``resets``...): sort it into the transforms' entries."""
        if "transforms" in state:
            return state
        transforms: dict[str, Any] = {name: state[name] for name in ("density", "es", "resets", "projection")
                                      if name in state}
        if "bank" in state:
            saved = {key: state[key] for key in _CONTROLLER_STATE if key in state}
            feature_every = self.controllers.feature_every if self.controllers is not None else 1
            transforms["controllers"] = {**saved, "recording": state["step"] % feature_every == 0}
        if "chiral" in state:
            transforms["chiral"] = {"structure": state["chiral"], "signs": state.get("chiral_signs")}
        return {"step": state["step"], "generator": state["generator"], "transforms": transforms}


def meta_bp(model: nn.Module, lr: float = 1e-3, **options: Any) -> RIBBED:
    """The first Meta-BP design (the seed's): explore/exploit step heads mixed by a stability
    gate, a learned coupling strength ``lambda`` and the one-step hypergradient cosine as the
    controllers' loss (``objective="linear"``), with self-supervised surprise. Kept as the
    ablation it now is: its loss is linear in the multiplier and drives multipliers to a bound."""
    return RIBBED(model, lr, **{"objective": "linear", **options})


def continual(model: nn.Module, lr: float = 1e-3, **options: Any) -> RIBBED:
    """RIBBED for continual learning: the default controllers with every hidden neuron's
    incoming-weight norm held at its start (``norm_projection="hidden"``) and no weight decay,
    the configuration of the ``plasticity-permuted`` benchmark."""
    base_options = {"weight_decay": 0.0, **options.pop("base_options", {})}
    return RIBBED(model, lr, **{"norm_projection": "hidden", "base_options": base_options, **options})
