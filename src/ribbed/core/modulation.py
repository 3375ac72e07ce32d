"""The controllers as a chain transform: each neuron's step multiplier, learned by a bank of tiny
MLPs and applied to the base optimiser's update.

Every ``feature_every`` steps :class:`NeuronControllers` refreshes each neuron's features
(``ribbed.core.features``: gradients, the last update, momentum, activation statistics), trains
the controller bank on the signal of the multipliers it gave at the last refresh, groups the
neurons (``ribbed.core.clustering``, with the coupling strategies of ``ribbed.core.routers`` and the
recursive grouping of ``ribbed.core.hierarchy``) and sets new multipliers. What the controllers
learn from is the ``objective`` (``ribbed.core.controllers``):

* ``residual`` (the default): a bounded, layer-centred residual on the base rule, identity at
  the start and while frozen, trained on a long-horizon step-size signal
  (``ribbed.core.signals``) with a quadratic penalty that keeps it interior;
* ``linear``: the first Meta-BP design (explore/exploit heads, a coupling strength, the one-step
  hypergradient cosine), kept as an ablation; it drives multipliers to a bound;
* ``controller_training="unrolled"`` (``ribbed.core.unrolled``): the meta-gradient of the loss a
  few functional base steps ahead.

It is the chain's one *modulating* transform: it performs the base update as
``before + m * (after - before)`` per neuron (``torch._foreach_lerp_``), or directly as AdamW
with per-neuron learning rates over a plain AdamW (``ribbed.core.scaled_adamw``: no copy, no
lerp). While every multiplier is exactly 1 the update is the base's own step, bit for bit.
With ``selection_every`` it also selects among mutants of the bank, each scored on the loss after
the trial step it gives (``ribbed.core.evolution``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ribbed.checks import check_integer, check_number
from ribbed.core.chain import NeuronChain, NeuronTransform, StepContext, TransformSpec, eagerly
from ribbed.core.clustering import OnlineKMeans
from ribbed.core.controllers import OBJECTIVES, PREDICTED, ControllerBank, ControllerOutputs
from ribbed.core.density import InformationDensity
from ribbed.core.evolution import TRIAL_EVALUATIONS, evolve_bank
from ribbed.core.features import FEATURE_NAMES, FeatureNormalizer, neuron_features
from ribbed.core.hierarchy import ClusterHierarchy, check_hierarchy_settings
from ribbed.core.routers import build_router
from ribbed.core.scaled_adamw import scaled_adamw_step, supports_scaled_step
from ribbed.core.signals import SIGNALS, StepSizeSignal
from ribbed.core.unrolled import UnrolledTrainer, check_unrolled_options
from ribbed.optim.wrapper import step_inner

__all__ = ["NeuronControllers", "controllers"]

_PREDICTED_INDEX = [FEATURE_NAMES.index(name) for name in PREDICTED]
_SURPRISE_INDEX = FEATURE_NAMES.index("surprise")


@dataclass
class _Derived:
    """What :class:`NeuronControllers` derives from one multiplier tensor: the per-parameter scales
    of the direct AdamW update and the factors that update derives from them, and the lerp
    weights of the copy-and-lerp update."""

    multiplier: torch.Tensor
    scales: dict[torch.Tensor, torch.Tensor] | None = None
    adamw_factors: dict[Any, Any] = field(default_factory=dict)
    lerp: list[torch.Tensor] | None = None


def controllers(*, n_controllers: int = 4, controller_hidden: int = 16, controller_lr: float = 1e-2,
                max_multiplier: float = 4.0, objective: str = "residual", signal: str = "trace",
                trace_discount: float = 0.9, signal_smoothing: float = 0.9, multiplier_penalty: float = 1.0,
                contextual_heads: bool | None = None, coupling: bool | None = None, self_supervision: bool = True,
                self_supervision_weight: float = 0.1, activation_features: bool = True, feature_every: int = 10,
                routing_every: int = 50, routing: str = "dense", routing_options: dict[str, Any] | None = None,
                hierarchy_depth: int = 1, hierarchy_branching: int = 4, hierarchy_bound: float = 2.0,
                merge_distance: float = 0.0, split_spread: float | None = None, max_controllers: int | None = None,
                controller_training: str = "hypergradient", unroll_steps: int = 3, selection_every: int = 0,
                selection_population: int = 6, selection_sigma: float = 0.05, density_reward: float = 0.0,
                seed: int = 0) -> TransformSpec:
    """The controllers' transform, options checked (``ribbed.core.optimizer.RIBBED`` documents
    each; ``selection_*`` are its ``evolve_*``). ``density_reward`` needs an ``information
    density`` transform before this one; ``seed`` seeds the hierarchy's own clustering."""
    for name, value in (("n_controllers", n_controllers), ("controller_hidden", controller_hidden),
                        ("feature_every", feature_every), ("routing_every", routing_every)):
        check_integer(name, value)
    check_number("controller_lr", controller_lr, "a number >= 0 (0: frozen)", lambda v: v >= 0)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: got {objective!r}; allowed: one of {', '.join(OBJECTIVES)}")
    if signal not in SIGNALS:
        raise ValueError(f"signal: got {signal!r}; allowed: one of {', '.join(SIGNALS)}")
    check_number("trace_discount", trace_discount, "a number in [0, 1]", lambda v: 0 <= v <= 1)
    check_number("signal_smoothing", signal_smoothing, "a number in [0, 1)", lambda v: 0 <= v < 1)
    check_number("multiplier_penalty", multiplier_penalty, "a number > 0", lambda v: v > 0)
    check_number("max_multiplier", max_multiplier, "a number > 1", lambda v: v > 1)
    check_unrolled_options(controller_training, unroll_steps, True)
    router = build_router(routing, routing_options)
    router.check(n_controllers)
    check_hierarchy_settings(depth=hierarchy_depth, branching=hierarchy_branching, bound=hierarchy_bound,
                             merge_distance=merge_distance, split_spread=split_spread,
                             max_controllers=max_controllers, n_controllers=n_controllers)
    grouping = hierarchy_depth > 1 or merge_distance > 0 or split_spread is not None
    if grouping and routing == "topk-attention":
        raise ValueError("routing: got 'topk-attention' with hierarchical grouping (hierarchy_depth > 1, "
                         "merge_distance or split_spread); allowed: a strategy giving one controller per "
                         "neuron (dense, tree, lsh, sampled)")
    options: dict[str, Any] = dict(
        n_controllers=n_controllers, hidden=controller_hidden, lr=controller_lr, max_multiplier=max_multiplier,
        objective=objective, signal=signal, trace_discount=trace_discount, signal_smoothing=signal_smoothing,
        multiplier_penalty=multiplier_penalty,
        contextual_heads=objective == "linear" if contextual_heads is None else contextual_heads,
        coupling=objective == "linear" if coupling is None else coupling,
        self_supervision=self_supervision, self_supervision_weight=self_supervision_weight,
        feature_every=feature_every, routing_every=routing_every, router=router,
        hierarchy=dict(depth=hierarchy_depth, branching=hierarchy_branching, bound=hierarchy_bound,
                       merge_distance=merge_distance, split_spread=split_spread, seed=seed) if grouping else None,
        max_controllers=max_controllers, unroll_steps=unroll_steps if controller_training == "unrolled" else None,
        selection_every=selection_every, selection_population=selection_population,
        selection_sigma=selection_sigma, density_reward=density_reward,
    )
    row_by_row = (("controller_training", controller_training, "'hypergradient'")
                  if controller_training != "hypergradient" else None)
    return TransformSpec("controllers", lambda chain: NeuronControllers(chain, **options),
                         activations=activation_features, row_by_row=row_by_row)


class NeuronControllers(NeuronTransform):
    """Per-neuron step multipliers from a controller bank (see the module docstring); built by
    :func:`controllers` on a chain."""

    name = "controllers"
    modulates = True
    needs_whole_neurons = True  # the features are averaged over data-parallel ranks

    def __init__(self, chain: NeuronChain, *, n_controllers: int, hidden: int, lr: float, max_multiplier: float,
                 objective: str, signal: str, trace_discount: float, signal_smoothing: float,
                 multiplier_penalty: float, contextual_heads: bool, coupling: bool, self_supervision: bool,
                 self_supervision_weight: float, feature_every: int, routing_every: int, router: Any,
                 hierarchy: dict[str, Any] | None, max_controllers: int | None, unroll_steps: int | None,
                 selection_every: int, selection_population: int, selection_sigma: float, density_reward: float):
        self.layers, self.base, self.generator = chain.layers, chain.base, chain.generator
        self.neuron_params, self.n_neurons = chain.neuron_params, chain.n_neurons
        density = chain.transforms.get("density")
        self.density = density if isinstance(density, InformationDensity) else None
        if density_reward and self.density is None:
            raise ValueError(f"density_reward: got {density_reward!r} without an information-density transform "
                             "before the controllers; allowed: 0 unless the density is measured (density_every)")
        self.feature_every, self.routing_every = feature_every, routing_every
        self.self_supervision_weight, self.multiplier_penalty = self_supervision_weight, multiplier_penalty
        self.density_reward = density_reward
        self.selection_every, self.selection_population, self.selection_sigma = (
            selection_every, selection_population, selection_sigma)
        param_list = [p for group in chain.param_groups for p in group["params"]]
        device = param_list[0].device if param_list else torch.device("cpu")
        slots = max_controllers or n_controllers
        self.bank = ControllerBank(
            slots, hidden=hidden, max_multiplier=max_multiplier, contextual_heads=contextual_heads,
            coupling=coupling, self_supervision=self_supervision, objective=objective, generator=self.generator,
        ).to(device)
        self.bank.set_layers(torch.cat([torch.full((layer.n,), index, device=device)
                                        for index, layer in enumerate(self.layers)]))
        self.hierarchy: ClusterHierarchy | None = None
        if hierarchy is not None:
            self.hierarchy = ClusterHierarchy(len(FEATURE_NAMES), slots, hidden=hidden, **hierarchy).to(device)
        trained = [*self.bank.parameters(), *(self.hierarchy.parameters() if self.hierarchy is not None else ())]
        self.controller_optimizer = torch.optim.Adam(trained, lr=lr, foreach=True)
        self.clusters = OnlineKMeans(n_controllers, router=router)  # which controller serves which neuron
        self.normalizer = FeatureNormalizer()
        self.prev = [p.detach().clone() for p in self.neuron_params]
        self.signal = (StepSizeSignal(self.layers, kind=signal, discount=trace_discount, smoothing=signal_smoothing)
                       if objective == "residual" else None)
        self.surprise = torch.zeros(self.n_neurons)
        self._set_multiplier(torch.ones(self.n_neurons))
        self._derived: _Derived | None = None
        self._pending: tuple[torch.Tensor, ...] | None = None
        self._routed_at = 0
        self._step = 0
        self._warned_unrecorded = False
        self._telemetry: dict[str, float] = {}
        self._telemetry_inputs: tuple[Any, ...] | None = None  # tensors of the last refresh, summarised on demand
        self._selection_telemetry: dict[str, float] = {}
        self._neurons: dict[str, torch.Tensor] = {}
        self._set_recording(True)
        self.unrolled = (UnrolledTrainer(chain.model, self.base, self.layers, unroll_steps, chain.recorders())
                         if unroll_steps is not None else None)
        self.needs_batch = bool(selection_every or self.unrolled)

    # ------------------------------------------------------------------ the chain's hooks

    def before_update(self, ctx: StepContext) -> None:
        """Refresh the features and multipliers every ``feature_every`` steps."""
        self._step = ctx.step
        if ctx.step % self.feature_every == 0 and self._has_grads():
            self._update_controllers(ctx.step)

    def _selecting(self, step: int) -> bool:
        return bool(self.selection_every) and step % self.selection_every == 0 and self._pending is not None

    def update(self, ctx: StepContext) -> None:
        """The base update with each neuron's step multiplied by its multiplier."""
        step = ctx.step
        selecting = self._selecting(step)
        # while every multiplier is exactly 1 (the start, frozen controllers) the step is the base's own
        scaled = not self._identity or selecting
        direct = scaled and self._direct_update(step)
        if (scaled and not direct) or (step + 1) % self.feature_every == 0:
            torch._foreach_copy_(self.prev, self.neuron_params)
        if direct:
            self._scaled_step()
        else:
            step_inner(self.base)
        if scaled and not direct and self._pending is not None:
            if self.selection_every and step % self.selection_every == 0:
                eagerly(self._select, ctx)
            torch._foreach_lerp_(self.neuron_params, self.prev, self._lerp_weights())

    def trial_update(self, before: dict[torch.Tensor, torch.Tensor]) -> None:
        if self._direct_update(self._step):
            self._scaled_step()
            return
        step_inner(self.base)
        if self._pending is not None:
            torch._foreach_lerp_(self.neuron_params, [before[p] for p in self.neuron_params], self._lerp_weights())

    def after_update(self, ctx: StepContext) -> None:
        """Record activations on the steps before a refresh."""
        self._set_recording((ctx.step + 1) % self.feature_every == 0)

    def on_replaced(self, changed: dict[torch.Tensor, torch.Tensor], neurons: torch.Tensor) -> None:
        """After a reset, the memory of the changed weights restarts at their new values (so the
        next features and signals see no jump that no update made)."""
        for param, prev in zip(self.neuron_params, self.prev, strict=True):
            if param in changed:
                torch.where(changed[param], param.detach(), prev, out=prev)
        if self.signal is not None:
            self.signal.forget(changed, neurons)

    # ------------------------------------------------------------------ the refresh

    def _set_multiplier(self, multiplier: torch.Tensor) -> None:
        """The per-neuron multipliers; when every one is exactly 1 the step is the base's own."""
        self.multiplier = multiplier
        self._identity = bool((multiplier == 1).all())

    def _has_grads(self) -> bool:
        return any(p.grad is not None for p in self.neuron_params)

    def _set_recording(self, on: bool) -> None:
        for layer in self.layers:
            layer.stats.recording = on

    def _momentum(self) -> dict[torch.Tensor, torch.Tensor]:
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
                          "mode with gradients on, or set activation_features=False", stacklevel=6)
            self._warned_unrecorded = True
        for layer in hooked:
            layer.stats.passes = 0

    def _update_controllers(self, step: int) -> None:
        self._check_recorded()
        prev = dict(zip(self.neuron_params, self.prev, strict=True))
        raw, hyper = neuron_features(self.layers, prev, self._momentum(), self.surprise)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Data parallel: gradients are already all-reduced, activation statistics are per
            # local batch; averaging them gives every rank the same features, so the
            # controllers, routing and multipliers stay identical on every rank.
            torch.distributed.all_reduce(raw)
            raw /= torch.distributed.get_world_size()
        controller_loss: torch.Tensor | float = 0.0
        prediction_loss: torch.Tensor | float = 0.0
        signal = self.signal.update(prev) if self.signal is not None else None
        if self._pending is not None:
            controller_loss, prediction_loss = self._train_bank(raw, hyper, signal)
            raw[:, _SURPRISE_INDEX] = self.surprise.to(raw.device)
        self.normalizer.update(raw)
        inputs = self.normalizer(raw)
        self.clusters.observe(inputs)
        refreshed = self.clusters.assignment is None or step - self._routed_at >= self.routing_every
        if refreshed:
            self.clusters.refresh(self.generator)
            self._routed_at = step
            if self.hierarchy is not None:
                self.hierarchy.restructure(self.clusters, step, self.bank, self.controller_optimizer)
        assignment = self.clusters.assignment
        assert assignment is not None, "routed above if never before"
        out = self.bank(inputs, *self.clusters.controller_choice())
        if self.hierarchy is not None:
            self.hierarchy.summarise(inputs, self.clusters)
        self._modulate(out)
        if refreshed and self.clusters.coupled is not None:  # sampled coupling: the others keep theirs
            out.multiplier = torch.where(self.clusters.coupled, out.multiplier, self.multiplier.to(out.multiplier))
        self._set_multiplier(out.multiplier)
        self._neurons = {"multiplier": out.multiplier, "step": out.step, "coupling": out.coupling,
                         "gate": out.gate, "surprise": self.surprise.clone(), "hypergradient": hyper,
                         "controller": assignment}
        self._pending = (inputs, *self.clusters.controller_choice())
        self._telemetry = self.hierarchy.telemetry(self.clusters) if self.hierarchy is not None else {}
        self._telemetry_inputs = (out, self.surprise, hyper, controller_loss, prediction_loss,
                                  float(self.clusters.changes))

    def _summary(self) -> dict[str, float]:
        """The last refresh's telemetry, summarised from its tensors on first request (a refresh
        that nobody reads costs no reductions and no ``.item()`` calls)."""
        if self._telemetry_inputs is not None:
            out, surprise, hyper, controller_loss, prediction_loss, changes = self._telemetry_inputs
            log_m = out.multiplier.detach().log().abs()
            self._telemetry = {
                "ribbed_multiplier_mean": float(out.multiplier.mean()),
                # share of neurons within 10% of a multiplier bound [1/M, M] (or past it)
                "ribbed_near_bound": float((log_m >= self.bank.log_max - math.log(1.1)).float().mean()),
                "ribbed_multiplier_std": float(out.multiplier.std()) if self.n_neurons > 1 else 0.0,
                "ribbed_coupling_mean": float(out.coupling.mean()),
                "ribbed_gate_mean": float(out.gate.mean()),
                "ribbed_surprise_mean": float(surprise.mean()),
                "ribbed_hypergradient_mean": float(hyper.mean()),
                "ribbed_controller_loss": float(controller_loss),
                "ribbed_prediction_loss": float(prediction_loss),
                "ribbed_membership_changes": changes,
                **self._telemetry,  # the hierarchy's, taken at the refresh
            }
            self._telemetry_inputs = None
        return self._telemetry

    def _train_bank(self, raw: torch.Tensor, hyper: torch.Tensor,
                    signal: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """One Adam step of the bank (and hierarchy) on the multipliers it gave at the last
        refresh; returns the controller and prediction losses and sets the surprise."""
        assert self._pending is not None, "trained only after a refresh set the multipliers"
        inputs, *routed = self._pending
        target = self.normalizer(raw[:, _PREDICTED_INDEX], _PREDICTED_INDEX)
        prediction_loss: torch.Tensor | float = 0.0
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
            controller_loss = loss.detach()
            if self.bank.self_supervision:
                error = out.predictions - target
                prediction = error.pow(2).mean()
                loss = loss + self.self_supervision_weight * prediction
                prediction_loss = prediction.detach()
                self.surprise = error.detach().abs().mean(1).cpu()
            if self.density_reward and self.density is not None:  # __init__ refused a reward without one
                loss = loss + self.density_reward * self.density.reward_loss(out.multiplier)
            self.controller_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step_inner(self.controller_optimizer)
        return controller_loss, prediction_loss

    def _modulate(self, out: ControllerOutputs) -> None:
        """Multiply the bank's step multipliers by the higher-level controllers' factors (a
        no-op without a hierarchy), in the graph when called with gradients on."""
        if self.hierarchy is not None and self.hierarchy.modulators:
            factor = self.hierarchy.modulation().to(out.multiplier)
            out.multiplier = out.multiplier * factor
            out.log_multiplier = out.log_multiplier + torch.log(factor)

    def _select(self, ctx: StepContext) -> None:
        """Selection over the controller bank, each candidate scored on the loss after its trial
        step ``before + m (after - before)``; a mutant replaces the bank only if strictly better."""
        assert self._pending is not None, "selection follows a refresh (_selecting)"
        inputs, *routed = self._pending

        def multiplier_of() -> torch.Tensor:
            out = self.bank(inputs, *routed)
            self._modulate(out)
            return out.multiplier

        with ctx.probe(self.neuron_params, TRIAL_EVALUATIONS) as probe:
            result = evolve_bank(
                self.bank, multiplier_of, population=self.selection_population, sigma=self.selection_sigma,
                loss_of_multiplier=lambda m: probe.at(torch._foreach_lerp(probe.saved, self.prev, self._lerp_from(m))),
                generator=self.generator,
            )
        if result.winner:
            self._set_multiplier(multiplier_of())
        self._selection_telemetry = {"evolve_gain": result.losses[0] - result.losses[result.winner],
                                     "evolve_accepted": float(result.winner > 0)}

    # ------------------------------------------------------------------ the update's pieces

    def _of_multiplier(self) -> _Derived:
        """What is derived from the current multipliers alone, kept until they change (a refresh,
        a selection, a resume); each part is made when first needed."""
        if self._derived is None or self._derived.multiplier is not self.multiplier:
            self._derived = _Derived(self.multiplier)
        return self._derived

    def _lerp_weights(self) -> list[torch.Tensor]:
        """:meth:`_lerp_from` the current multipliers (the direct update over AdamW never needs them)."""
        derived = self._of_multiplier()
        if derived.lerp is None:
            derived.lerp = self._lerp_from(self.multiplier)
        return derived.lerp

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

    def _direct_update(self, step: int) -> bool:
        """Whether this step computes the scaled update directly (``ribbed.core.scaled_adamw``):
        over a plain AdamW, except on selection steps, which score trial steps from the base
        update and the weights before it."""
        return not self._selecting(step) and supports_scaled_step(self.base)

    def _scaled_step(self) -> None:
        """The base AdamW step at the multipliers as per-neuron learning-rate scales (the scales
        by parameter, and the factors :func:`~ribbed.core.scaled_adamw.scaled_adamw_step` derives
        from them, kept with the multipliers)."""
        derived = self._of_multiplier()
        if derived.scales is None:
            derived.scales = dict(zip(self.neuron_params, self._rows_of(self.multiplier), strict=True))
        scaled_adamw_step(self.base, derived.scales, derived=derived.adamw_factors)

    # ------------------------------------------------------------------ inspection and state

    def telemetry(self) -> dict[str, float]:
        return {**self._summary(), **(self.unrolled.last if self.unrolled is not None else {}),
                **self._selection_telemetry}

    def neuron_state(self) -> dict[str, torch.Tensor]:
        """Per-neuron values ``[N]`` of the last refresh (layers in model order), for plots."""
        return {name: value.detach().cpu().clone() for name, value in self._neurons.items()}

    def state_dict(self) -> dict[str, Any]:
        state = {
            "bank": self.bank.state_dict(),
            "controller_optimizer": self.controller_optimizer.state_dict(),
            "routing": self.clusters.state_dict(),  # the key checkpoints have always used
            "normalizer": self.normalizer.state_dict(),
            "prev": [t.clone() for t in self.prev],
            "surprise": self.surprise.clone(),
            "multiplier": self.multiplier.detach().clone(),
            "pending": None if self._pending is None else list(self._pending),
            "activations": [layer.stats.state_dict() for layer in self.layers],
            "recording": bool(self.layers) and bool(self.layers[0].stats.recording),
            "telemetry": dict(self._summary()),
            "routed_at": self._routed_at,
        }
        if self.hierarchy is not None:
            state["hierarchy"] = self.hierarchy.state_dict()
        if self.signal is not None:
            state["signal"] = self.signal.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.controller_optimizer.load_state_dict(state["controller_optimizer"])
        self.clusters.load_state_dict(state["routing"])
        self.normalizer.load_state_dict(state["normalizer"])
        torch._foreach_copy_(self.prev, state["prev"])
        self.surprise = state["surprise"].clone()
        self._set_multiplier(state["multiplier"].clone())
        self._pending = None if state["pending"] is None else tuple(state["pending"])
        for layer, stats in zip(self.layers, state["activations"], strict=True):
            layer.stats.load_state_dict(stats)
        self._telemetry = dict(state["telemetry"])
        self._telemetry_inputs = None
        self._routed_at = state["routed_at"]
        self._set_recording(state["recording"])
        if self.hierarchy is not None:
            self.hierarchy.load_state_dict(state["hierarchy"], self.clusters)
        if self.signal is not None:
            self.signal.load_state_dict(state["signal"])
