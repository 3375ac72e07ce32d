"""Controllers trained by unrolling: the meta-gradient of the loss a few base steps ahead.

The online mode trains RIBBED's controllers from the one-step hypergradient: with the applied
update ``d_i = m_i Δ_i`` of neuron ``i``, ``dL(w + d)/d log m_i = <g_next, d>_i``, one dot
product per neuron. This slower research mode looks ``T`` steps ahead instead. From the
current parameters ``θ_0`` and the base optimiser's current state, the base update rule is
written as a pure function (SGD with momentum / Nesterov / weight decay, and Adam / AdamW,
as ``torch.optim`` computes them) and unrolled with the neurons' multipliers held fixed (as
they are between refreshes):

    θ_{t+1} = θ_t + m ⊙ Δ_base(θ_t, state_t),      t = 0 .. T-1,

and ``∂L(θ_T)/∂ log m`` ``[N]`` is taken through the whole unroll, second-order terms
included, with ``torch.func.grad`` over ``torch.func.functional_call`` (the gradients inside
the unroll are themselves ``torch.func.grad`` calls, so the outer derivative differentiates
through them). Step ``t`` uses the step's recorded micro-batch ``t mod M`` and the final loss
micro-batch ``T mod M`` (``M`` micro-batches recorded by the ``keep-batch`` gradient method;
with one, every step and the final loss use the same batch).

Relation to the online signal: for ``T = 1`` and SGD, ``∂L(θ_1)/∂ log m_i = <∇L(θ_1)_i,
(θ_1 - θ_0)_i>`` exactly, the numerator of the hypergradient cosine the online mode reads
one step later (``ribbed.core.features``, ``hypergradient``); both have the sign of
``dL/dm`` (positive: the step is too long). The controllers descend
``mean_i(s_i log m_i)`` with ``s`` the meta-gradient divided by its root mean square over
neurons (one positive scale for all neurons, where the online cosine divides each neuron by
``|g||d|``), so the chain rule gives each controller output its own meta-gradient.

Cost: ``T`` forward-backward passes, differentiated once more (about ``3 T`` passes), on each
controller refresh. Dropout and batch-norm statistics are evaluated as the model is (buffers
are copied, so running statistics are not changed).

Why our own: ``torch.func`` gives the derivatives; what is written here is the base update
rules as pure functions (``torch.optim`` updates in place) and the unroll. Differentiable
optimisers such as ``higher`` and ``torchopt`` would do the unroll, but ``higher`` is
unmaintained and neither reproduces ``torch.optim``'s state layout, which the unroll must
start from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad

from ribbed.checks import check_integer
from ribbed.core.evolution import paused
from ribbed.core.layers import NeuronLayer
from ribbed.optim.batches import Batch, recorded_batches
from ribbed.optim.functional import FlatParameters

__all__ = ["CONTROLLER_TRAINING", "FunctionalBase", "check_unrolled_options", "UnrolledTrainer",
           "unrolled_meta_gradient"]

CONTROLLER_TRAINING = ("hypergradient", "unrolled")
Tensors = dict[str, torch.Tensor]


def check_unrolled_options(controller_training: str, unroll_steps: int, controllers: bool) -> None:
    """Validate RIBBED's ``controller_training`` and ``unroll_steps``; errors name field, value and rule."""
    if controller_training not in CONTROLLER_TRAINING:
        raise ValueError(f"controller_training: got {controller_training!r}; allowed: {', '.join(CONTROLLER_TRAINING)}")
    check_integer("unroll_steps", unroll_steps)
    if controller_training == "unrolled" and not controllers:
        raise ValueError("controller_training: got 'unrolled' with controllers=False; allowed: 'unrolled' only "
                         "with the controllers on")


def _unsupported(base: torch.optim.Optimizer, detail: str) -> ValueError:
    return ValueError(f"controller_training: got 'unrolled' with base {type(base).__name__}{detail}; allowed: "
                      "base sgd (momentum, dampening, nesterov, weight_decay), adam or adamw (no amsgrad, "
                      "no maximize), or controller_training='hypergradient'")


class FunctionalBase:
    """A ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` update rule as a pure function of named tensors.

    Args:
        base: the optimiser whose hyperparameters (per param group) and state are read.
        flat: the optimised parameters by name.
    """

    def __init__(self, base: torch.optim.Optimizer, flat: FlatParameters):
        if isinstance(base, torch.optim.Adam):
            self.kind = "adam"
        elif isinstance(base, torch.optim.SGD):
            self.kind = "sgd"
        else:
            raise _unsupported(base, "")
        self.base, self.flat = base, flat
        name_of = {id(p): name for name, p in flat.named.items()}
        self.groups = []
        for group in base.param_groups:
            if group.get("maximize") or group.get("amsgrad"):
                raise _unsupported(base, " (with maximize or amsgrad)")
            self.groups.append((group, [name_of[id(p)] for p in group["params"]]))

    def initial_state(self) -> dict[str, Tensors]:
        """Copies of the base optimiser's current state, by parameter name (zeros where unset)."""
        state = {}
        for _, names in self.groups:
            for name in names:
                p = self.flat.named[name]
                kept = self.base.state.get(p, {})
                if self.kind == "adam":
                    state[name] = {
                        "step": torch.as_tensor(float(kept.get("step", 0)), dtype=p.dtype),
                        "exp_avg": kept.get("exp_avg", torch.zeros_like(p)).detach().clone(),
                        "exp_avg_sq": kept.get("exp_avg_sq", torch.zeros_like(p)).detach().clone(),
                    }
                else:
                    buffer = kept.get("momentum_buffer")
                    state[name] = {} if buffer is None else {"momentum_buffer": buffer.detach().clone()}
        return state

    def deltas(self, params: Tensors, grads: Tensors, state: dict[str, Tensors]) -> tuple[Tensors, dict[str, Tensors]]:
        """``(Δ, new state)``: the base step ``θ_new - θ`` of every parameter, without modulation."""
        rule = self._adam if self.kind == "adam" else self._sgd
        deltas: Tensors = {}
        new_state: dict[str, Tensors] = {}
        for group, names in self.groups:
            for name in names:
                deltas[name], new_state[name] = rule(group, params[name], grads[name], state[name])
        return deltas, new_state

    @staticmethod
    def _sgd(group: dict, p: torch.Tensor, g: torch.Tensor, state: Tensors) -> tuple[torch.Tensor, Tensors]:
        lr, momentum, dampening = float(group["lr"]), group["momentum"], group["dampening"]
        if group["weight_decay"]:
            g = g + group["weight_decay"] * p
        if not momentum:
            return -lr * g, state
        buffer = g if "momentum_buffer" not in state else momentum * state["momentum_buffer"] + (1 - dampening) * g
        direction = g + momentum * buffer if group["nesterov"] else buffer
        return -lr * direction, {"momentum_buffer": buffer}

    @staticmethod
    def _adam(group: dict, p: torch.Tensor, g: torch.Tensor, state: Tensors) -> tuple[torch.Tensor, Tensors]:
        lr, (beta1, beta2), eps, decay = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        decoupled = group.get("decoupled_weight_decay", False)
        if decay and not decoupled:
            g = g + decay * p
        step = state["step"] + 1
        exp_avg = state["exp_avg"] + (1 - beta1) * (g - state["exp_avg"])
        exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        delta = -(lr / bias1) * exp_avg / (_sqrt(exp_avg_sq) / bias2.sqrt() + eps)
        if decay and decoupled:
            delta = delta - lr * decay * p
        return delta, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` for ``v >= 0`` whose derivative at 0 is 0, not infinite: an Adam second moment
    is 0 only where every gradient so far was 0 (a dead unit, an unused input), where its
    derivative is multiplied by 0; ``inf * 0`` would otherwise poison the meta-gradient with NaN."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, 1).sqrt(), 0)


def neuron_scales(layers: list[NeuronLayer], flat: FlatParameters) -> Callable[[torch.Tensor], Tensors]:
    """``m [N] -> {name: m broadcast along each neuron's row}`` for the neuron layers' parameters."""
    name_of = {id(p): name for name, p in flat.named.items()}

    def expand(multiplier: torch.Tensor) -> Tensors:
        scales = {}
        for layer in layers:
            m = multiplier[layer.offset:layer.offset + layer.n]
            scales[name_of[id(layer.weight)]] = m.view(-1, *([1] * (layer.weight.dim() - 1)))
            if layer.bias is not None:
                scales[name_of[id(layer.bias)]] = m
        return scales

    return expand


def unrolled_meta_gradient(
    model: nn.Module, rule: FunctionalBase, batches: list[Batch], log_multiplier: torch.Tensor,
    expand: Callable[[torch.Tensor], Tensors], steps: int,
) -> tuple[torch.Tensor, float]:
    """``(∂L(θ_T)/∂ log m [N], L(θ_T))`` for ``T = steps`` unrolled base steps (module docstring)."""
    flat = rule.flat
    buffers = dict(model.named_buffers())

    def loss_at(params: Tensors, t: int) -> torch.Tensor:
        batch = batches[t % len(batches)]
        state = {**params, **{name: b.clone() for name, b in buffers.items()}}
        return batch.loss_fn(functional_call(model, state, (batch.x,)), batch.y)

    def final_loss(log_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scales = expand(log_m.exp())
        params, state = flat.values(), rule.initial_state()
        for t in range(steps):
            deltas, state = rule.deltas(params, grad(loss_at)(params, t), state)
            params = {name: p + (scales[name] * deltas[name] if name in scales else deltas[name])
                      for name, p in params.items()}
        loss = loss_at(params, steps)
        return loss, loss.detach()

    with torch.enable_grad():
        meta, loss = grad(final_loss, has_aux=True)(log_multiplier)
    return meta, float(loss)


class UnrolledTrainer:
    """The unrolled controller signal for a RIBBED optimiser's model, base and neuron layers."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, layers: list[NeuronLayer], steps: int,
                 recorders: Sequence[Any] = ()):
        self.model, self.layers, self.steps, self.recorders = model, layers, steps, list(recorders)
        self.rule = FunctionalBase(base, FlatParameters(model, base.param_groups))
        self.expand = neuron_scales(layers, self.rule.flat)
        self.last: dict[str, float] = {}

    def signal(self, multiplier: torch.Tensor) -> torch.Tensor:
        """``∂L(θ_T)/∂ log m`` divided by its root mean square over neurons, on the step's batches."""
        batches = recorded_batches(self.model, "RIBBED's unrolled controller training (controller_training='unrolled')")
        log_m = multiplier.detach().to(self.layers[0].weight.dtype).log()
        with paused(self.recorders):  # forward hooks must not keep the unroll's (transformed) outputs
            meta, loss = unrolled_meta_gradient(self.model, self.rule, batches, log_m, self.expand, self.steps)
        rms = meta.pow(2).mean().sqrt()
        self.last = {"unrolled_loss": loss, "unrolled_meta_gradient_rms": float(rms)}
        return meta / rms.clamp_min(torch.finfo(meta.dtype).tiny)

    def controller_loss(self, multiplier: torch.Tensor) -> torch.Tensor:
        """``mean_i(s_i log m_i)``: its gradient through the controllers is the chain rule of the signal."""
        return (self.signal(multiplier).to(multiplier) * multiplier.log()).mean()
