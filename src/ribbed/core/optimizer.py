"""``RIBBED``: a base optimiser whose every neuron is coupled to a small learned controller.

Use it like any ``torch.optim`` optimiser::

    opt = RIBBED(model, lr=1e-3)            # AdamW underneath by default
    loss.backward(); opt.step(); opt.zero_grad()

Each step runs a fixed chain of small pieces, each switchable off:

1. **features** (``ribbed.core.features``): per-neuron learning-state vectors, refreshed every
   ``feature_every`` steps, from gradients, the last update, the base optimiser's momentum
   and forward-hook activation statistics;
2. **routing** (``ribbed.core.routing``): neurons grouped by trajectory features (online
   k-means), one controller per group, refreshed every ``routing_every`` steps;
3. **controllers** (``ribbed.core.controllers``): a bank of tiny MLPs gives each neuron a step
   multiplier (explore/exploit heads mixed by a stability gate) and a coupling strength,
   trained online from each neuron's one-step hypergradient, plus self-supervised predictions
   of its next statistics whose error ("surprise") feeds back as a feature;
4. **coupling**: the applied update is ``(1 - lambda) d_base + lambda s d_base`` per neuron;
5. **chiral term** (``ribbed.core.chiral``): ``G <- G + gamma J G`` on the gradients;
6. **base update**: the wrapped optimiser's own ``step()``.

The modulation is applied without knowing the base optimiser's update rule: the parameters
before the step are kept (one buffer per neuron-layer parameter), the base steps, and
``torch._foreach_lerp_`` pulls each neuron back to ``before + m * (after - before)``. With every
component off, ``step()`` is exactly the base optimiser's ``step()`` (bit for bit).

The learning rate and every other hyperparameter live in the base optimiser's
``param_groups``, which this optimiser shares, so LR schedulers work unchanged.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ribbed.core.chiral import ChiralTerm
from ribbed.core.controllers import PREDICTED, ControllerBank
from ribbed.core.features import FEATURE_NAMES, FeatureNormalizer, neuron_features
from ribbed.core.layers import NeuronLayer, find_neuron_layers
from ribbed.core.routing import OnlineKMeans
from ribbed.optim.functional import closure_loss

__all__ = ["RIBBED"]

_PREDICTED_INDEX = [FEATURE_NAMES.index(name) for name in PREDICTED]
_SURPRISE_INDEX = FEATURE_NAMES.index("surprise")
BaseSpec = str | type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer]


def _positive(name: str, value: float, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        allowed = "an integer >= 1" if integer else "a number > 0"
        raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")


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


class RIBBED(torch.optim.Optimizer):
    """Neuron-coupled optimiser wrapping a base optimiser (see the module docstring).

    Args:
        model: the network; its ``Linear``/``Conv`` layers are the neurons (forward hooks
            record activation statistics when ``activation_features`` is on).
        lr: learning rate of the base optimiser.
        base: registry name or import path (``"adamw"``, ``"torch.optim.SGD"``), or an optimiser
            class / callable ``(params, lr=, **base_options)``.
        base_options: keyword arguments of the base optimiser (``weight_decay``, ``momentum``...).
        params: parameters or param groups (default ``model.parameters()``).
        controllers: learn per-neuron step multipliers (off: every multiplier is 1).
        n_controllers: controllers in the bank (neuron groups).
        controller_hidden: hidden width of each controller MLP.
        controller_lr: Adam learning rate of the controllers.
        max_multiplier: bound ``M`` of a step head: multipliers lie in ``[1/M, M]``.
        contextual_heads: explore/exploit heads mixed by a stability gate (off: one head).
        coupling: learn the Meta-BP coupling strength lambda (off: lambda = 1).
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
        seed: seed of RIBBED's own randomness (controller init, clustering, graphs).

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
        contextual_heads: bool = True,
        coupling: bool = True,
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
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: got {type(model).__name__}; allowed: a torch.nn.Module")
        for name, value in (("n_controllers", n_controllers), ("controller_hidden", controller_hidden),
                            ("entropy_bins", entropy_bins), ("feature_every", feature_every),
                            ("routing_every", routing_every), ("graph_every", graph_every)):
            _positive(name, value, integer=True)
        _positive("lr", lr)
        _positive("controller_lr", controller_lr)
        if not isinstance(max_multiplier, (int, float)) or max_multiplier <= 1:
            raise ValueError(f"max_multiplier: got {max_multiplier!r}; allowed: a number > 1")
        given = None if params is None else list(params)
        self.base = _build_base(base, model, given, lr, dict(base_options or {}))
        param_list = [p for group in self.base.param_groups for p in group["params"]]
        super().__init__(self.base.param_groups, self.base.defaults)
        self.param_groups = self.base.param_groups
        self.model = model
        self.controllers_on = controllers
        self.feature_every, self.routing_every, self.graph_every = feature_every, routing_every, graph_every
        self.self_supervision_weight = self_supervision_weight
        self.generator = torch.Generator().manual_seed(seed)
        self.chiral = ChiralTerm(chiral_gamma, chiral_graph, chiral_neighbours) if chiral_gamma else None
        optimised = {p for group in self.param_groups for p in group["params"]}
        hooks = controllers and activation_features
        self.layers: list[NeuronLayer] = (
            find_neuron_layers(model, optimised, bins=entropy_bins, hooks=hooks)
            if controllers or self.chiral else []
        )
        self.n_neurons = sum(layer.n for layer in self.layers)
        self._step_count = 0
        self._telemetry: dict[str, float] = {}
        if controllers:
            self.bank = ControllerBank(
                n_controllers, hidden=controller_hidden, max_multiplier=max_multiplier,
                contextual_heads=contextual_heads, coupling=coupling,
                self_supervision=self_supervision, generator=self.generator,
            ).to(param_list[0].device if param_list else "cpu")
            self.controller_optimizer = torch.optim.Adam(self.bank.parameters(), lr=controller_lr)
            self.routing = OnlineKMeans(n_controllers)
            self.normalizer = FeatureNormalizer()
            self.neuron_params = [p for layer in self.layers for p in layer.params]
            self.prev = [p.detach().clone() for p in self.neuron_params]
            self.surprise = torch.zeros(self.n_neurons)
            self.multiplier = torch.ones(self.n_neurons)
            self._lerp_weights: list[torch.Tensor] | None = None
            self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
            self._routed_at = 0
            self._set_recording(True)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One step: features -> routing -> controllers -> coupling -> chiral -> base update."""
        loss = closure_loss(closure)
        if self.controllers_on and self._step_count % self.feature_every == 0 and self._has_grads():
            self._update_controllers()
        if self.chiral is not None:
            if self._step_count % self.graph_every == 0 or not self.chiral.structure:
                assignment = self.routing.assignment if self.controllers_on else None
                self.chiral.refresh(self.layers, self.generator, assignment)
            self.chiral.apply(self.layers)
        if self.controllers_on:
            torch._foreach_copy_(self.prev, self.neuron_params)
        self.base.step()
        if self.controllers_on and self._lerp_weights is not None:
            torch._foreach_lerp_(self.neuron_params, self.prev, self._lerp_weights)
        self._step_count += 1
        if self.controllers_on:
            self._set_recording(self._step_count % self.feature_every == 0)
        return loss

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

    def _update_controllers(self) -> None:
        prev = dict(zip(self.neuron_params, self.prev, strict=True))
        raw, hyper = neuron_features(self.layers, prev, self._momentum(), self.surprise)
        controller_loss = prediction_loss = 0.0
        if self._pending is not None:
            inputs, assignment = self._pending
            target = self.normalizer(raw[:, _PREDICTED_INDEX], _PREDICTED_INDEX)
            with torch.enable_grad():
                out = self.bank(inputs, assignment)
                loss = (hyper.to(out.multiplier) * out.multiplier).mean()
                controller_loss = float(loss.detach())
                if self.bank.self_supervision:
                    error = out.predictions - target
                    prediction = error.pow(2).mean()
                    loss = loss + self.self_supervision_weight * prediction
                    prediction_loss = float(prediction.detach())
                    self.surprise = error.detach().abs().mean(1).cpu()
                self.controller_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.controller_optimizer.step()
            raw[:, _SURPRISE_INDEX] = self.surprise.to(raw.device)
        self.normalizer.update(raw)
        inputs = self.normalizer(raw)
        self.routing.observe(inputs)
        if self.routing.assignment is None or self._step_count - self._routed_at >= self.routing_every:
            self.routing.refresh(self.generator)
            self._routed_at = self._step_count
        assignment = self.routing.assignment
        out = self.bank(inputs, assignment)
        self.multiplier = out.multiplier
        self._neurons = {"multiplier": out.multiplier, "step": out.step, "coupling": out.coupling,
                         "gate": out.gate, "surprise": self.surprise.clone(), "hypergradient": hyper,
                         "controller": assignment}
        self._lerp_weights = self._lerp_from(out.multiplier)
        self._pending = (inputs, assignment)
        self._telemetry = {
            "ribbed_multiplier_mean": float(out.multiplier.mean()),
            "ribbed_multiplier_std": float(out.multiplier.std()) if self.n_neurons > 1 else 0.0,
            "ribbed_coupling_mean": float(out.coupling.mean()),
            "ribbed_gate_mean": float(out.gate.mean()),
            "ribbed_surprise_mean": float(self.surprise.mean()),
            "ribbed_hypergradient_mean": float(hyper.mean()),
            "ribbed_controller_loss": controller_loss,
            "ribbed_prediction_loss": prediction_loss,
            "ribbed_membership_changes": float(self.routing.changes),
        }

    def _lerp_from(self, multiplier: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter lerp weights ``1 - m`` broadcast along each neuron's row."""
        weights = []
        for layer in self.layers:
            m = (1 - multiplier[layer.offset:layer.offset + layer.n]).to(layer.weight)
            weights.append(m.view(-1, *([1] * (layer.weight.dim() - 1))))
            if layer.bias is not None:
                weights.append(m)
        return weights

    # ------------------------------------------------------------------ inspection

    def telemetry(self) -> dict[str, float]:
        """Summary of the last controller refresh (multiplier, coupling, gate, surprise...)."""
        return dict(self._telemetry)

    def neuron_state(self) -> dict[str, torch.Tensor]:
        """Per-neuron values ``[N]`` of the last refresh (layers in model order), for plots."""
        return {name: value.detach().cpu().clone() for name, value in getattr(self, "_neurons", {}).items()}

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        state = {"base": self.base.state_dict(), "step": self._step_count,
                 "generator": self.generator.get_state()}
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
        if self.chiral is not None:
            state["chiral"] = list(self.chiral.structure)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.param_groups = self.base.param_groups
        self._step_count = state["step"]
        self.generator.set_state(state["generator"])
        if self.controllers_on:
            self.bank.load_state_dict(state["bank"])
            self.controller_optimizer.load_state_dict(state["controller_optimizer"])
            self.routing.load_state_dict(state["routing"])
            self.normalizer.load_state_dict(state["normalizer"])
            torch._foreach_copy_(self.prev, state["prev"])
            self.surprise = state["surprise"].clone()
            self.multiplier = state["multiplier"].clone()
            self._pending = None if state["pending"] is None else tuple(state["pending"])
            self._lerp_weights = self._lerp_from(self.multiplier) if self._pending is not None else None
            for layer, stats in zip(self.layers, state["activations"], strict=True):
                layer.stats.load_state_dict(stats)
            self._telemetry = dict(state["telemetry"])
            self._routed_at = state["routed_at"]
            self._set_recording(self._step_count % self.feature_every == 0)
        if self.chiral is not None:
            self.chiral.structure = list(state["chiral"])

    def remove_hooks(self) -> None:
        """Detach the activation hooks from the model."""
        for layer in self.layers:
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
