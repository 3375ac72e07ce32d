"""``RIBBED``: a base optimiser whose every neuron is coupled to a small learned controller.

Use it like any ``torch.optim`` optimiser::

    opt = RIBBED(model, lr=1e-3)            # AdamW underneath by default
    loss.backward(); opt.step(); opt.zero_grad()

Each step runs a fixed chain of small pieces, each switchable off:

1. **features** (``ribbed.core.features``): per-neuron learning-state vectors, refreshed every
   ``feature_every`` steps, from gradients, the last update, the base optimiser's momentum
   and forward-hook activation statistics; every ``density_every`` steps also the
   **information density** (``ribbed.core.density``): per-neuron entropy, mutual information
   with the labels given to :meth:`RIBBED.observe_labels`, Hoyer sparsity, per-layer effective
   rank; logged in :meth:`RIBBED.telemetry`, and a controller reward if ``density_reward > 0``;
2. **routing** (``ribbed.core.routing``): neurons grouped by trajectory features (online
   k-means), one controller per group, refreshed every ``routing_every`` steps; the coupling
   strategy (``routing``: ``dense``, ``tree``, ``lsh``, ``sampled``, ``topk-attention``,
   ``ribbed.core.coupling``) decides how neurons find their controllers; with hierarchical
   grouping (``ribbed.core.hierarchy``) each refresh then merges and splits clusters and
   re-clusters their centroids into ``hierarchy_depth - 1`` higher levels, logged in
   :meth:`RIBBED.topology_log`;
3. **controllers** (``ribbed.core.controllers``): a bank of tiny MLPs gives each neuron a step
   multiplier, by default a bounded residual ``exp(delta - mean_layer(delta))`` on the base rule
   (identity at the start and while frozen) trained on each neuron's long-horizon meta-gradient
   (``ribbed.core.signals``: an eligibility trace, MetaOptimize's Hessian-free form) with a
   quadratic penalty that keeps it interior; ``objective="linear"`` is the first design
   (explore/exploit heads mixed by a stability gate, a coupling strength, the one-step
   hypergradient cosine), kept as an ablation. The controllers also make self-supervised
   predictions of each neuron's next statistics whose error ("surprise") feeds back as a
   feature; higher-level controllers multiply the multipliers of whole clusters;
4. **coupling** (``linear`` only): the applied update is ``(1 - lambda) d_base + lambda s d_base``
   per neuron;
5. **chiral term** (``ribbed.core.chiral``): ``G <- G + gamma J G`` on the gradients;
6. **base update**: the wrapped optimiser's own ``step()``;
7. **resets** (``ribbed.core.resets``, off by default): neurons whose contribution utility stays
   low are re-initialised at a controlled rate (``reset_rate``, continual backprop) or when
   dormant (``reset_threshold``, ReDo), with fresh optimiser state for their entries;
8. **norm projection** (``ribbed.core.projection``, off by default): each neuron's incoming
   weights are rescaled to their starting norm, so a multiplier is the neuron's true
   effective step size however long training runs (``norm_projection``).

Optional research pieces join the chain (all off by default): **guided ES**
(``ribbed.core.evolution``, every ``es_every`` steps) blends a zeroth-order estimate of each
layer's gradient into ``.grad`` after the controllers and before the chiral term;
**selection** (``evolve_every``) scores mutants of the controller bank on the loss after the
trial step each gives, after the base update and before the coupling is applied (with
``evolve_chirality``, also per-layer chirality signs, each scored by an exact trial step from
the same base-optimiser state, before the chiral term);
``controller_training="unrolled"`` (``ribbed.core.unrolled``) trains the controllers from the
meta-gradient of the loss ``unroll_steps`` base steps ahead instead of the one-step
hypergradient. These evaluate the loss: call ``step(closure)`` or record the step's batch
(the ``keep-batch`` gradient method).

The modulation is applied without knowing the base optimiser's update rule: the parameters
before the step are kept (one buffer per neuron-layer parameter), the base steps, and
``torch._foreach_lerp_`` pulls each neuron back to ``before + m * (after - before)``. Over a plain
``torch.optim.AdamW`` that is AdamW with per-neuron learning rates ``m * lr``, which
``ribbed.core.scaled_adamw`` computes directly: no copy and no lerp, the weights are kept only
on the step before a feature refresh (whose features need the last update). With every
component off, ``step()`` is exactly the base optimiser's ``step()`` (bit for bit).

The learning rate and every other hyperparameter live in the base optimiser's
``param_groups``, which this optimiser shares, so LR schedulers work unchanged.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ribbed.checks import check_integer, check_number
from ribbed.core.chiral import ChiralTerm
from ribbed.core.controllers import OBJECTIVES, PREDICTED, ControllerBank, ControllerOutputs
from ribbed.core.coupling import build_router
from ribbed.core.density import InformationDensity
from ribbed.core.evolution import (
    GuidedES,
    LossProbe,
    check_evolution_options,
    evolve_bank,
    evolve_chirality,
    step_loss,
)
from ribbed.core.features import FEATURE_NAMES, FeatureNormalizer, neuron_features
from ribbed.core.hierarchy import ClusterHierarchy, check_hierarchy_settings
from ribbed.core.layers import NeuronLayer, coverage_report, find_neuron_layers
from ribbed.core.projection import NeuronNormProjection, check_projection_scope
from ribbed.core.resets import NeuronResets, check_reset_options
from ribbed.core.routing import OnlineKMeans
from ribbed.core.scaled_adamw import scaled_adamw_step, supports_scaled_step
from ribbed.core.signals import SIGNALS, StepSizeSignal
from ribbed.core.unrolled import UnrolledTrainer, check_unrolled_options
from ribbed.optim.batches import expect_batches, forget_batches
from ribbed.optim.functional import closure_loss
from ribbed.optim.state import (
    attach_global,
    detach_global,
    hooked_load_state_dict,
    hooked_state_dict,
)
from ribbed.optim.wrapper import step_inner

__all__ = ["RIBBED"]


def _eagerly(method: Callable, *args: Any) -> Any:
    """``method(*args)``, run outside Dynamo's trace when the step is being compiled.

    ``torch.compiler.disable`` as a decorator would import ``torch._dynamo`` with this module,
    which takes longer than everything else ``import ribbed.core`` loads; here it is called
    only while compiling, when Dynamo is loaded anyway.
    """
    if torch.compiler.is_compiling():
        return torch.compiler.disable(method)(*args)
    return method(*args)

_PREDICTED_INDEX = [FEATURE_NAMES.index(name) for name in PREDICTED]
_SURPRISE_INDEX = FEATURE_NAMES.index("surprise")
BaseSpec = str | type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer]


def _build_base(base: BaseSpec, model: nn.Module, params: list | None, lr: float,
                options: dict) -> torch.optim.Optimizer:
    """The base optimiser: by registry name on the model (so curvature methods such as K-FAC
    can hook its layers), or on explicit ``params``; or a class / callable on the parameters."""
    if isinstance(base, torch.optim.Optimizer):
        raise ValueError("base: give an optimiser name or class, not an instance (RIBBED builds it "
                         "on the same parameters)")
    if isinstance(base, str):
        from ribbed.optim import build_optimizer

        owner = model if params is None else types.SimpleNamespace(parameters=lambda: params)
        return build_optimizer(base, owner, lr=lr, **options)
    return base(list(model.parameters()) if params is None else params, lr=lr, **options)


_ROW_BY_ROW = {  # option -> (whether a value turns the piece on, what is allowed with Conv1D layers)
    "chiral_gamma": (lambda v: v != 0, "0"),
    "controller_training": (lambda v: v != "hypergradient", "'hypergradient'"),
    "reset_rate": (lambda v: v > 0, "0"),
    "reset_threshold": (lambda v: v is not None, "None"),
    "norm_projection": (lambda v: v is not None, "None"),
}


def _check_transposed(layers: list[NeuronLayer], **settings: Any) -> None:
    """The research pieces that reshape weights row by row (the chiral term, unrolled
    controller training, neuron resets, the norm projection) do not handle transformers'
    ``Conv1D`` (a transposed ``Linear``): refuse them on such a model rather than mix up its
    neurons."""
    flipped = [layer.name for layer in layers if layer.transposed]
    for name, value in settings.items():
        on, allowed = _ROW_BY_ROW[name]
        if flipped and on(value):
            raise ValueError(f"{name}: got {value!r} on a model with transformers Conv1D layers "
                             f"({', '.join(flipped[:3])}{', ...' if len(flipped) > 3 else ''}); allowed: {allowed} "
                             "(this piece reads weights row by row and does not handle Conv1D's transposed weight)")


class RIBBED(torch.optim.Optimizer):
    """Neuron-coupled optimiser wrapping a base optimiser (see the module docstring).

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
        routing: coupling strategy routing neurons to controllers (``ribbed.core.coupling``):
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
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: got {type(model).__name__}; allowed: the torch.nn.Module whose layers are the "
                             "neurons (give parameter groups as params=; with transformers' Trainer pass "
                             "optimizers=(RIBBED(model, ...), None) instead of optimizer_cls_and_kwargs)")
        for name, value in (("n_controllers", n_controllers), ("controller_hidden", controller_hidden),
                            ("entropy_bins", entropy_bins), ("feature_every", feature_every),
                            ("routing_every", routing_every), ("graph_every", graph_every)):
            check_integer(name, value)
        check_number("lr", lr, "a number > 0", lambda v: v > 0)
        check_number("controller_lr", controller_lr, "a number >= 0 (0: frozen)", lambda v: v >= 0)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: got {objective!r}; allowed: one of {', '.join(OBJECTIVES)}")
        if signal not in SIGNALS:
            raise ValueError(f"signal: got {signal!r}; allowed: one of {', '.join(SIGNALS)}")
        check_number("trace_discount", trace_discount, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        check_number("signal_smoothing", signal_smoothing, "a number in [0, 1)", lambda v: 0 <= v < 1)
        check_number("multiplier_penalty", multiplier_penalty, "a number > 0", lambda v: v > 0)
        contextual_heads = objective == "linear" if contextual_heads is None else contextual_heads
        coupling = objective == "linear" if coupling is None else coupling
        check_reset_options(reset_rate=reset_rate, reset_threshold=reset_threshold, reset_maturity=reset_maturity,
                            reset_every=reset_every, utility_decay=utility_decay, utility=reset_utility)
        resets = reset_rate > 0 or reset_threshold is not None
        if norm_projection is not None:
            check_projection_scope(norm_projection)
        check_evolution_options(es_every=es_every, es_population=es_population, es_sigma=es_sigma,
                                es_alpha=es_alpha, es_subspace=es_subspace, es_weight=es_weight,
                                evolve_every=evolve_every, evolve_population=evolve_population,
                                evolve_sigma=evolve_sigma, controllers=controllers,
                                evolve_chirality=evolve_chirality, chiral_gamma=chiral_gamma)
        check_unrolled_options(controller_training, unroll_steps, controllers)
        check_integer("density_every", density_every, 0, " (0: off)")
        check_number("density_reward", density_reward, "a number >= 0 (0: off)", lambda v: v >= 0)
        if density_reward and not (controllers and density_every):
            raise ValueError(f"density_reward: got {density_reward!r} with controllers={controllers!r} and "
                             f"density_every={density_every!r}; allowed: 0 unless both are on")
        check_number("max_multiplier", max_multiplier, "a number > 1", lambda v: v > 1)
        router = build_router(routing, routing_options)
        router.check(n_controllers)
        check_hierarchy_settings(depth=hierarchy_depth, branching=hierarchy_branching, bound=hierarchy_bound,
                                 merge_distance=merge_distance, split_spread=split_spread,
                                 max_controllers=max_controllers, n_controllers=n_controllers)
        grouping = controllers and (hierarchy_depth > 1 or merge_distance > 0 or split_spread is not None)
        if grouping and routing == "topk-attention":
            raise ValueError("routing: got 'topk-attention' with hierarchical grouping (hierarchy_depth > 1, "
                             "merge_distance or split_spread); allowed: a strategy giving one controller per "
                             "neuron (dense, tree, lsh, sampled)")
        given = None if params is None else list(params)
        self.base = _build_base(base, model, given, lr, dict(base_options or {}))
        param_list = [p for group in self.base.param_groups for p in group["params"]]
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups = self.base.param_groups
        self.state = self.base.state  # tools that reset or measure optimiser state see the base's
        self.model = model
        self.controllers_on = controllers
        self.feature_every, self.routing_every, self.graph_every = feature_every, routing_every, graph_every
        self.self_supervision_weight = self_supervision_weight
        self.generator = torch.Generator().manual_seed(seed)
        self.chiral = ChiralTerm(chiral_gamma, chiral_graph, chiral_neighbours) if chiral_gamma else None
        optimised = {p for group in self.param_groups for p in group["params"]}
        hooks = controllers and activation_features
        self.layers: list[NeuronLayer] = (
            find_neuron_layers(model, optimised, bins=entropy_bins, hooks=hooks, transposed=True)
            if controllers or self.chiral or density_every or es_every or resets or norm_projection else []
        )
        _check_transposed(self.layers, chiral_gamma=chiral_gamma, controller_training=controller_training,
                          reset_rate=reset_rate, reset_threshold=reset_threshold, norm_projection=norm_projection)
        self.n_neurons = sum(layer.n for layer in self.layers)
        self.neuron_report = (coverage_report("RIBBED", [p for layer in self.layers for p in layer.params],
                                              param_list, "in neuron layers") if self.layers else "")
        self._step_count = 0
        self._telemetry: dict[str, float] = {}
        self.density_every, self.density_reward = density_every, density_reward
        self.density = InformationDensity(self.layers, bins=entropy_bins) if density_every else None
        if self.density is not None:
            self.density.arm(True)
        self.hierarchy: ClusterHierarchy | None = None
        if controllers:
            device = param_list[0].device if param_list else torch.device("cpu")
            self.bank = ControllerBank(
                max_controllers or n_controllers, hidden=controller_hidden, max_multiplier=max_multiplier,
                contextual_heads=contextual_heads, coupling=coupling, self_supervision=self_supervision,
                objective=objective, generator=self.generator,
            ).to(device)
            self.bank.set_layers(torch.cat([torch.full((layer.n,), index, device=device)
                                            for index, layer in enumerate(self.layers)]))
            if grouping:
                self.hierarchy = ClusterHierarchy(
                    len(FEATURE_NAMES), max_controllers or n_controllers, depth=hierarchy_depth,
                    branching=hierarchy_branching, hidden=controller_hidden, bound=hierarchy_bound,
                    merge_distance=merge_distance, split_spread=split_spread, seed=seed,
                ).to(device)
            trained = [*self.bank.parameters(), *(self.hierarchy.parameters() if grouping else ())]
            self.controller_optimizer = torch.optim.Adam(trained, lr=controller_lr, foreach=True)
            self.routing = OnlineKMeans(n_controllers, router=router)
            self.normalizer = FeatureNormalizer()
            self.neuron_params = [p for layer in self.layers for p in layer.params]
            self.prev = [p.detach().clone() for p in self.neuron_params]
            self.multiplier_penalty = multiplier_penalty
            self.signal = (StepSizeSignal(self.layers, kind=signal, discount=trace_discount,
                                          smoothing=signal_smoothing) if objective == "residual" else None)
            self.surprise = torch.zeros(self.n_neurons)
            self._set_multiplier(torch.ones(self.n_neurons))
            self._lerp_weights: list[torch.Tensor] | None = None
            self._scales: tuple[torch.Tensor, dict[nn.Parameter, torch.Tensor]] | None = None
            self._pending: tuple[torch.Tensor, ...] | None = None
            self._routed_at = 0
            self._warned_unrecorded = False
            self._set_recording(True)
        self.es_every, self.evolve_every = es_every, evolve_every
        self.evolve_population, self.evolve_sigma = evolve_population, evolve_sigma
        self.evolve_chirality = evolve_chirality
        self.es = GuidedES(self.layers, population=es_population, sigma=es_sigma, alpha=es_alpha,
                           subspace=es_subspace, weight=es_weight) if es_every else None
        self.unrolled = (UnrolledTrainer(model, self.base, self.layers, unroll_steps, self._recorders())
                         if controller_training == "unrolled" else None)
        self._selection_telemetry: dict[str, float] = {}
        self.resets = (NeuronResets(self.layers, self.base, reset_rate=reset_rate, reset_threshold=reset_threshold,
                                    reset_maturity=reset_maturity, reset_every=reset_every,
                                    utility_decay=utility_decay, utility=reset_utility) if resets else None)
        self.projection = NeuronNormProjection(self.layers, scope=norm_projection) if norm_projection else None
        self.needs_batch = bool(es_every or evolve_every or self.unrolled)  # the loop then requires keep-batch
        if self.needs_batch:
            expect_batches(model)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One step: features -> routing -> controllers -> coupling -> chiral -> base update.

        Under ``torch.compile`` only the update itself (the base step and the per-neuron
        scaling) is traced. What runs before and after it (:meth:`_before_update`,
        :meth:`_after_update`, selection) runs eagerly (``torch.compiler.disable``): it draws
        from RIBBED's generator, reads values with ``.item()``, trains the controllers with
        ``backward()``, and its Python state must advance exactly as in eager mode (traced,
        the controllers saw no hypergradient and never learned).
        """
        loss = closure_loss(closure)
        _eagerly(self._before_update, closure)
        evolving = (self.controllers_on and bool(self.evolve_every) and self._step_count % self.evolve_every == 0
                    and self._lerp_weights is not None)
        # while every multiplier is exactly 1 (the start, frozen controllers) the step is the base's own
        scaled = self.controllers_on and (not self._identity or evolving)
        direct = scaled and self._direct_update()
        if self.controllers_on and ((scaled and not direct) or (self._step_count + 1) % self.feature_every == 0):
            torch._foreach_copy_(self.prev, self.neuron_params)
        if direct:
            scaled_adamw_step(self.base, self._neuron_scales())
        else:
            step_inner(self.base)
        if scaled and not direct and self._lerp_weights is not None:
            if self.evolve_every and self._step_count % self.evolve_every == 0:
                _eagerly(self._evolve_controllers, closure)
            torch._foreach_lerp_(self.neuron_params, self.prev, self._lerp_weights)
        _eagerly(self._after_update)
        return loss

    def _before_update(self, closure: Callable[[], float] | None) -> None:
        """Information density, the controllers' refresh, guided ES and the chiral term."""
        if self.density is not None:
            self.density.measure()
            self.density.arm((self._step_count + 1) % self.density_every == 0)
        if self.controllers_on and self._step_count % self.feature_every == 0 and self._has_grads():
            self._update_controllers()
        if self.es is not None and self._step_count % self.es_every == 0 and self.es.ready():
            with self._probe(closure, self.es.params) as probe:
                self.es.blend(probe, self.generator)
        if self.chiral is not None:
            if self._step_count % self.graph_every == 0 or not self.chiral.structure:
                assignment = self.routing.assignment if self.controllers_on else None
                self.chiral.refresh(self.layers, self.generator, assignment)
            if self.evolve_chirality and self._step_count % self.evolve_every == 0:
                self._evolve_chirality(closure)
            self.chiral.apply(self.layers)

    def _after_update(self) -> None:
        """Count the step, run the resets and the norm projection, and record activations on the
        steps before a refresh."""
        self._step_count += 1
        changed = self.resets.step(self._step_count, self.generator) if self.resets is not None else None
        if self.projection is not None:
            self.projection.project()
        if changed:
            self._forget(changed)
        if self.controllers_on:
            self._set_recording(self._step_count % self.feature_every == 0)

    def _forget(self, changed: dict[nn.Parameter, torch.Tensor]) -> None:
        """After a reset, RIBBED's own per-entry memory of the changed weights restarts at their
        new values (so the next features and signals see no jump that no update made)."""
        if not self.controllers_on:
            return
        for param, prev in zip(self.neuron_params, self.prev, strict=True):
            if param in changed:
                torch.where(changed[param], param.detach(), prev, out=prev)
        if self.signal is not None:
            neurons = torch.cat([layer.offset + index for layer, index in self.resets.replaced])
            self.signal.forget(changed, neurons)

    def _set_multiplier(self, multiplier: torch.Tensor) -> None:
        """The per-neuron multipliers; when every one is exactly 1 the step is the base's own."""
        self.multiplier = multiplier
        self._identity = bool((multiplier == 1).all())

    def _has_grads(self) -> bool:
        return any(p.grad is not None for p in self.neuron_params)

    def _set_recording(self, on: bool) -> None:
        for layer in self.layers:
            layer.stats.recording = on

    def _momentum(self) -> dict[nn.Parameter, torch.Tensor]:
        buffers = {}
        for p in self.neuron_params:
            state = self.base.state.get(p, {})
            buffer = state.get("exp_avg", state.get("momentum_buffer"))
            if isinstance(buffer, torch.Tensor):
                buffers[p] = buffer
        return buffers

    def _check_recorded(self) -> None:
        """Warn (once) when a refresh after the first finds that no activation hook recorded a
        training forward pass since the last refresh while gradients are non-zero: the features
        would silently lose their activation statistics. Hooks added after the model's first
        ``torch.compile`` call never run (Dynamo skips the guards on module hooks); so do
        hooks of a model trained in eval mode or under ``no_grad``. All-zero gradients are not
        a training step (``torch.distributed.checkpoint`` steps once on zeros to create state)."""
        hooked = [layer for layer in self.layers if layer.handle is not None]
        if (hooked and self._pending is not None and not self._warned_unrecorded
                and not any(layer.stats.passes for layer in hooked)
                and any(bool(p.grad.any()) for p in self.neuron_params if p.grad is not None)):
            warnings.warn("RIBBED: no activation hook recorded a training forward pass since the last controller "
                          "refresh, so the controllers see no activation statistics. Build the optimiser before "
                          "the model's first torch.compile call (hooks added later never run), train in train "
                          "mode with gradients on, or set activation_features=False", stacklevel=4)
            self._warned_unrecorded = True
        for layer in hooked:
            layer.stats.passes = 0

    def _update_controllers(self) -> None:
        self._check_recorded()
        prev = dict(zip(self.neuron_params, self.prev, strict=True))
        raw, hyper = neuron_features(self.layers, prev, self._momentum(), self.surprise)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Data parallel: gradients are already all-reduced, activation statistics are per
            # local batch; averaging them gives every rank the same features, so the
            # controllers, routing and multipliers stay identical on every rank.
            torch.distributed.all_reduce(raw)
            raw /= torch.distributed.get_world_size()
        controller_loss = prediction_loss = 0.0
        signal = self.signal.update(prev) if self.signal is not None else None
        if self._pending is not None:
            inputs, *routed = self._pending
            target = self.normalizer(raw[:, _PREDICTED_INDEX], _PREDICTED_INDEX)
            with torch.enable_grad():
                out = self.bank(inputs, *routed)
                self._modulate(out)
                if self.unrolled is not None:
                    loss = self.unrolled.controller_loss(out.multiplier)
                elif signal is not None:  # residual: first-order change plus the interior-optimum penalty
                    delta = out.log_multiplier
                    loss = (signal.to(delta) * delta).mean() + 0.5 * self.multiplier_penalty * delta.square().mean()
                else:
                    loss = (hyper.to(out.multiplier) * out.multiplier).mean()
                controller_loss = float(loss.detach())
                if self.bank.self_supervision:
                    error = out.predictions - target
                    prediction = error.pow(2).mean()
                    loss = loss + self.self_supervision_weight * prediction
                    prediction_loss = float(prediction.detach())
                    self.surprise = error.detach().abs().mean(1).cpu()
                if self.density_reward:
                    loss = loss + self.density_reward * self.density.reward_loss(out.multiplier)
                self.controller_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                step_inner(self.controller_optimizer)
            raw[:, _SURPRISE_INDEX] = self.surprise.to(raw.device)
        self.normalizer.update(raw)
        inputs = self.normalizer(raw)
        self.routing.observe(inputs)
        refreshed = self.routing.assignment is None or self._step_count - self._routed_at >= self.routing_every
        if refreshed:
            self.routing.refresh(self.generator)
            self._routed_at = self._step_count
            if self.hierarchy is not None:
                self.hierarchy.restructure(self.routing, self._step_count, self.bank, self.controller_optimizer)
        assignment = self.routing.assignment
        out = self.bank(inputs, *self.routing.controller_choice())
        if self.hierarchy is not None:
            self.hierarchy.summarise(inputs, self.routing)
        self._modulate(out)
        if refreshed and self.routing.coupled is not None:  # sampled coupling: the others keep theirs
            out.multiplier = torch.where(self.routing.coupled, out.multiplier, self.multiplier.to(out.multiplier))
        self._set_multiplier(out.multiplier)
        self._neurons = {"multiplier": out.multiplier, "step": out.step, "coupling": out.coupling,
                         "gate": out.gate, "surprise": self.surprise.clone(), "hypergradient": hyper,
                         "controller": assignment}
        self._lerp_weights = self._lerp_from(out.multiplier)
        self._pending = (inputs, *self.routing.controller_choice())
        log_m = out.multiplier.detach().log().abs()
        self._telemetry = {
            "ribbed_multiplier_mean": float(out.multiplier.mean()),
            # share of neurons within 10% of a multiplier bound [1/M, M] (or past it)
            "ribbed_near_bound": float((log_m >= self.bank.log_max - math.log(1.1)).float().mean()),
            "ribbed_multiplier_std": float(out.multiplier.std()) if self.n_neurons > 1 else 0.0,
            "ribbed_coupling_mean": float(out.coupling.mean()),
            "ribbed_gate_mean": float(out.gate.mean()),
            "ribbed_surprise_mean": float(self.surprise.mean()),
            "ribbed_hypergradient_mean": float(hyper.mean()),
            "ribbed_controller_loss": controller_loss,
            "ribbed_prediction_loss": prediction_loss,
            "ribbed_membership_changes": float(self.routing.changes),
        }
        if self.hierarchy is not None:
            self._telemetry.update(self.hierarchy.telemetry(self.routing))

    def _modulate(self, out: ControllerOutputs) -> None:
        """Multiply the bank's step multipliers by the higher-level controllers' factors (a
        no-op at ``hierarchy_depth=1``), in the graph when called with gradients on."""
        if self.hierarchy is not None and self.hierarchy.modulators:
            factor = self.hierarchy.modulation().to(out.multiplier)
            out.multiplier = out.multiplier * factor
            out.log_multiplier = out.log_multiplier + torch.log(factor)

    def _probe(self, closure: Callable[[], float] | None, params: list[torch.Tensor]) -> LossProbe:
        """Trial evaluations of the step's loss at values of ``params`` that leave no trace."""
        loss = step_loss(self.model, closure, "RIBBED's guided ES / selection (es_every, evolve_every)")
        owners = [p for group in self.param_groups for p in group["params"]]
        return LossProbe(self.model, params, loss, self._recorders(), grad_owners=owners)

    def _recorders(self) -> list:
        """What the forward hooks record into (paused during trial evaluations)."""
        return [layer.stats for layer in self.layers] + ([self.density] if self.density is not None else [])

    def _evolve_controllers(self, closure: Callable[[], float] | None) -> None:
        """Selection over the controller bank, each candidate scored on the loss after its trial
        step ``before + m (after - before)``; a mutant replaces the bank only if strictly better."""
        inputs, *routed = self._pending

        def multiplier_of() -> torch.Tensor:
            out = self.bank(inputs, *routed)
            self._modulate(out)
            return out.multiplier

        with self._probe(closure, self.neuron_params) as probe:
            result = evolve_bank(
                self.bank, multiplier_of, population=self.evolve_population, sigma=self.evolve_sigma,
                loss_of_multiplier=lambda m: probe.at(torch._foreach_lerp(probe.saved, self.prev, self._lerp_from(m))),
                generator=self.generator,
            )
        if result.winner:
            self._set_multiplier(multiplier_of())
            self._lerp_weights = self._lerp_from(self.multiplier)
        self._selection_telemetry = {"evolve_gain": result.losses[0] - result.losses[result.winner],
                                     "evolve_accepted": float(result.winner > 0)}

    def _evolve_chirality(self, closure: Callable[[], float] | None) -> None:
        """Selection over the chiral signs (``ribbed.core.evolution.evolve_chirality``), before
        the chiral term is applied; each candidate's trial step is this step's update with the
        current multipliers (the controller bank's own selection, if on, follows it)."""
        owners = [p for group in self.param_groups for p in group["params"]]
        with self._probe(closure, owners) as probe:
            before = dict(zip(owners, probe.saved, strict=True))

            def update() -> None:
                if self.controllers_on and self._direct_update():
                    scaled_adamw_step(self.base, self._neuron_scales())
                    return
                step_inner(self.base)
                if self.controllers_on and self._lerp_weights is not None:
                    torch._foreach_lerp_(self.neuron_params, [before[p] for p in self.neuron_params],
                                         self._lerp_weights)

            evolve_chirality(self.chiral, self.layers, probe, self.base, update,
                             population=self.evolve_population, generator=self.generator)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.needs_batch:
            forget_batches(self.model)

    def _lerp_from(self, multiplier: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter lerp weights ``1 - m`` broadcast along each neuron's row, taken in the
        parameter's dtype (in float32 ``1 - m`` rounds once ``m < 1/2``)."""
        return [1 - rows for rows in self._rows_of(multiplier)]

    def _rows_of(self, values: torch.Tensor) -> list[torch.Tensor]:
        """A per-neuron ``[N]`` tensor as one view per neuron parameter (``neuron_params``
        order), broadcast along each neuron's row, in the parameter's dtype."""
        views = []
        for layer in self.layers:
            part = values[layer.offset:layer.offset + layer.n].to(layer.weight)
            views.append(layer.broadcast(part))
            if layer.bias is not None:
                views.append(part)
        return views

    def _direct_update(self) -> bool:
        """Whether this step computes the coupled update directly (``ribbed.core.scaled_adamw``):
        over a plain AdamW, except on selection steps, which score trial steps from the base
        update and the weights before it."""
        evolving = self.evolve_every and self._step_count % self.evolve_every == 0 and self._lerp_weights is not None
        return not evolving and supports_scaled_step(self.base)

    def _neuron_scales(self) -> dict[nn.Parameter, torch.Tensor]:
        """The multipliers as per-neuron learning-rate scales by parameter, rebuilt only when
        the multipliers change (a refresh, a selection, a resume)."""
        if self._scales is None or self._scales[0] is not self.multiplier:
            self._scales = (self.multiplier, dict(zip(self.neuron_params, self._rows_of(self.multiplier), strict=True)))
        return self._scales[1]

    # ------------------------------------------------------------------ inspection

    def telemetry(self) -> dict[str, float]:
        """Summary of the last controller refresh (multiplier, coupling, gate, surprise...) and
        of the last information-density measurement (``density_*`` keys)."""
        research = {key: value for part in (self.es, self.unrolled, self.chiral, self.resets) if part is not None for key, value in part.last.items()}
        return {**self._telemetry, **(self.density.telemetry() if self.density is not None else {}),
                **research, **self._selection_telemetry}

    def topology_log(self) -> list[dict[str, Any]]:
        """Topology evolution of the hierarchical grouping: events ``{step, level, kind:
        "merge" | "split" | "move", clusters, neurons}`` (empty without grouping)."""
        return [] if self.hierarchy is None else self.hierarchy.topology_log()

    def observe_labels(self, labels: torch.Tensor) -> None:
        """Labels of the batch of the coming ``step()``, for the mutual information of the
        information density (a no-op with ``density_every=0``); call it before ``step()``."""
        if self.density is not None:
            self.density.observe_labels(labels)

    def neuron_state(self) -> dict[str, torch.Tensor]:
        """Per-neuron values ``[N]`` of the last refresh (layers in model order), for plots."""
        return {name: value.detach().cpu().clone() for name, value in getattr(self, "_neurons", {}).items()}

    # ------------------------------------------------------------------ persistence

    def __getstate__(self) -> dict[str, Any]:
        """Everything, for ``copy.deepcopy`` and ``pickle`` (``torch.optim.Optimizer`` keeps only
        ``defaults``, ``state`` and ``param_groups``, which left a copy without its controllers,
        hooks or base optimiser). Copy the model together with the optimiser
        (``copy.deepcopy((model, opt))``) so the copy's hooks and parameters are the copied model's."""
        return dict(self.__dict__)

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state dict in torch's layout (``state``, ``param_groups``), with
        RIBBED's own state (step count, controllers, routing, ...) in the entry of the first
        trainable parameter under ``"ribbed"`` (``ribbed.optim.state``: where
        ``torch.distributed.checkpoint`` keeps it, as ``torch.optim.LBFGS`` keeps its own). The
        four ``torch.optim.Optimizer`` state-dict hooks are honoured."""
        params = [p for group in self.param_groups for p in group["params"]]
        return hooked_state_dict(self, lambda: attach_global(self.base.state_dict(), "ribbed", self._own_state(), params))

    def _own_state(self) -> dict[str, Any]:
        """What RIBBED keeps beside its base optimiser's state."""
        state = {"step": self._step_count, "generator": self.generator.get_state()}
        if self.controllers_on:
            state.update(
                bank=self.bank.state_dict(),
                controller_optimizer=self.controller_optimizer.state_dict(),
                routing=self.routing.state_dict(),
                normalizer=self.normalizer.state_dict(),
                prev=[t.clone() for t in self.prev],
                surprise=self.surprise.clone(),
                multiplier=self.multiplier.detach().clone(),
                pending=None if self._pending is None else list(self._pending),
                activations=[layer.stats.state_dict() for layer in self.layers],
                telemetry=dict(self._telemetry),
                routed_at=self._routed_at,
            )
        if self.hierarchy is not None:
            state["hierarchy"] = self.hierarchy.state_dict()
        if self.chiral is not None:
            state["chiral"] = list(self.chiral.structure)
            state["chiral_signs"] = None if self.chiral.signs is None else self.chiral.signs.clone()
        if self.es is not None:
            state["es"] = self.es.state_dict()
        if self.density is not None:
            state["density"] = self.density.state_dict()
        if self.controllers_on and self.signal is not None:
            state["signal"] = self.signal.state_dict()
        if self.resets is not None:
            state["resets"] = self.resets.state_dict()
        if self.projection is not None:
            state["projection"] = self.projection.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict` (also one renamed by
        ``torch.distributed.checkpoint``, and the ``{"base", "step", ...}`` layout of earlier
        versions); the load hooks are honoured."""
        hooked_load_state_dict(self, state_dict, self._load)

    def _load(self, state_dict: dict[str, Any]) -> None:
        base_state, state = detach_global(state_dict, "ribbed", "RIBBED")
        self.base.load_state_dict(base_state)
        self.param_groups, self.state = self.base.param_groups, self.base.state
        self._step_count = state["step"]
        self.generator.set_state(state["generator"])
        if self.controllers_on:
            self.bank.load_state_dict(state["bank"])
            self.controller_optimizer.load_state_dict(state["controller_optimizer"])
            self.routing.load_state_dict(state["routing"])
            self.normalizer.load_state_dict(state["normalizer"])
            torch._foreach_copy_(self.prev, state["prev"])
            self.surprise = state["surprise"].clone()
            self._set_multiplier(state["multiplier"].clone())
            self._pending = None if state["pending"] is None else tuple(state["pending"])
            self._lerp_weights = self._lerp_from(self.multiplier) if self._pending is not None else None
            for layer, stats in zip(self.layers, state["activations"], strict=True):
                layer.stats.load_state_dict(stats)
            self._telemetry = dict(state["telemetry"])
            self._routed_at = state["routed_at"]
            self._set_recording(self._step_count % self.feature_every == 0)
        if self.chiral is not None:
            self.chiral.structure = list(state["chiral"])
            self.chiral.signs = state.get("chiral_signs")  # absent in checkpoints from before per-layer signs
        if self.es is not None:
            self.es.load_state_dict(state["es"])
        if self.hierarchy is not None:
            self.hierarchy.load_state_dict(state["hierarchy"], self.routing)
        if self.density is not None:
            self.density.load_state_dict(state["density"])
        if self.controllers_on and self.signal is not None:
            self.signal.load_state_dict(state["signal"])
        if self.resets is not None:
            self.resets.optimizer = self.base
            self.resets.load_state_dict(state["resets"])
        if self.projection is not None:
            self.projection.load_state_dict(state["projection"])

    def remove_hooks(self) -> None:
        """Detach the activation hooks from the model."""
        for layer in self.layers:
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
        if self.density is not None:
            self.density.remove()
        if self.resets is not None:
            self.resets.remove()
