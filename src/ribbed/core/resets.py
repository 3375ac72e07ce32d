"""Utility-driven neuron resets: re-initialise neurons that stay dead or useless.

No step-size rule can revive a unit with no gradient (a ReLU unit that is negative on every
input gets none), and such units pile up when the data keep changing: the main cause of lost
plasticity in continual learning (Dohare et al., Nature 2024, "Loss of plasticity in deep
continual learning"). On the default preset 11 of the 1D CNN's 85 neurons had no gradient at
the end of training. This piece gives each neuron a utility and replaces the worst at a
controlled rate; it serves RIBBED (``reset_rate`` / ``reset_threshold``) and, on its own over
any base optimiser, the two published methods it generalises (:class:`Resetting`):

* **continual backprop** (Dohare et al. 2024): the *contribution utility*
  ``u_i = EMA(mean |a_i| * sum_k |W_out[k, i]|)``, the neuron's mean absolute output times the
  size of its outgoing weights, a running average with ``utility_decay``; every step a fraction
  ``reset_rate`` of each layer's *mature* neurons (``age >= maturity`` steps since their last
  reset) is replaced, lowest utility first (fractions accumulate across steps);
* **ReDo** (Sokar et al., ICML 2023, "The dormant neuron phenomenon in deep reinforcement
  learning"): every ``reset_every`` steps, every neuron whose score ``u_i / mean_layer(u)`` is at
  most ``reset_threshold`` (tau-dormant) is replaced (ReDo's score is the activity alone:
  ``utility="activity"``).

Both together (a rate and a threshold) replace, at the rate, only neurons that are also below
the threshold. A replaced neuron gets fresh incoming weights from PyTorch's default
initialisation of its layer (uniform in ``+-1/sqrt(fan_in)``), a zero bias, and zero outgoing
weights, so the network's function does not change at the moment of the reset. The base
optimiser's state is reset for the changed entries: first-moment buffers (Adam's ``exp_avg``,
SGD's ``momentum_buffer``) to zero; second-moment buffers (``exp_avg_sq``, ``square_avg``,
``sum``) to the mean of the same tensor's other entries. Zeroing those (as Dohare et al.'s Adam
does with a per-entry step count) would, with ``torch.optim.AdamW``'s one step count per tensor,
make the first update of a reset entry ``(1 - beta1) / sqrt(1 - beta2)``, about 3.2 times a
normal Adam step.

Where the outgoing weights are: the *consumer* of a layer is the next ``Linear``/``Conv`` layer
in module order, when its input has the layer's neurons as channels (a ``Linear`` after a
``Linear``, a ``Conv`` after a ``Conv`` with ``groups=1``, a ``Linear`` after a flattened
``Conv``: ``in_features`` a multiple of the channels, channel-major). A forward pre-hook on the
consumer reads the neuron's activity ``mean |a_i|`` from the consumer's input itself, after the
activation function, whatever it is. A layer without a consumer (the output layer, or layers not
in a chain, such as a transformer's residual stream) is never reset; those other than the last
are named in a warning when the piece is built, so nothing is skipped silently.

Written here because no maintained PyTorch package implements these resets over an arbitrary
``torch.optim`` optimiser (the papers' code is tied to their own networks and optimisers).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ribbed.checks import check_integer, check_number
from ribbed.core.chain import NeuronChain
from ribbed.core.layers import IndexedHook, NeuronLayer

__all__ = ["SECOND_MOMENTS", "UTILITIES", "NeuronResets", "Resetting", "check_reset_options"]

UTILITIES = ("contribution", "activity")
SECOND_MOMENTS = ("exp_avg_sq", "square_avg", "sum", "max_exp_avg_sq")


def check_reset_options(*, reset_rate: float, reset_threshold: float | None, reset_maturity: int,
                        reset_every: int, utility_decay: float, utility: str) -> None:
    """Refuse reset settings that cannot work, naming the field, the value and what is allowed."""
    check_number("reset_rate", reset_rate, "a number in [0, 1) (0: no rate limit)", lambda v: 0 <= v < 1)
    if reset_threshold is not None:
        check_number("reset_threshold", reset_threshold, "a number >= 0 or None", lambda v: v >= 0)
    check_integer("reset_maturity", reset_maturity, 0)
    check_integer("reset_every", reset_every)
    check_number("utility_decay", utility_decay, "a number in [0, 1)", lambda v: 0 <= v < 1)
    if utility not in UTILITIES:
        raise ValueError(f"utility: got {utility!r}; allowed: one of {', '.join(UTILITIES)}")


def _consumer_view(producer: NeuronLayer, consumer: NeuronLayer) -> int | None:
    """Positions per channel of ``consumer``'s input that belong to one of ``producer``'s
    neurons, or None when its input is not ``producer``'s channels."""
    module, c = consumer.module, producer.n
    if isinstance(module, nn.Linear):
        return module.in_features // c if module.in_features % c == 0 else None
    if getattr(module, "groups", 1) == 1 and module.in_channels == c:
        return 1
    return None


class NeuronResets:
    """Utilities, ages and the reset action for the neurons of ``layers`` (see the module docstring).

    Args:
        layers: the neuron layers in module order (``ribbed.core.layers.find_neuron_layers``).
        optimizer: the optimiser whose per-entry state is reset with the weights.
        reset_rate: fraction of each layer's neurons replaced per step (0: no rate limit, every
            eligible neuron is replaced at each check, which needs a threshold).
        reset_threshold: replace only neurons whose ``u / mean_layer(u)`` is at most this (None:
            any mature neuron, lowest utility first, at the rate).
        reset_maturity: steps a neuron must live (since the start or its last reset) before it
            can be replaced.
        reset_every: check every this many steps (the rate accumulates in between).
        utility_decay: EMA factor of the utility per training forward pass.
        utility: ``contribution`` (activity times outgoing weight size) or ``activity``.
    """

    def __init__(self, layers: list[NeuronLayer], optimizer: torch.optim.Optimizer, *,
                 reset_rate: float = 1e-4, reset_threshold: float | None = None, reset_maturity: int = 100,
                 reset_every: int = 1, utility_decay: float = 0.99, utility: str = "contribution"):
        check_reset_options(reset_rate=reset_rate, reset_threshold=reset_threshold,
                            reset_maturity=reset_maturity, reset_every=reset_every,
                            utility_decay=utility_decay, utility=utility)
        if reset_rate == 0 and reset_threshold is None:
            raise ValueError("reset_rate and reset_threshold: got 0 and None; allowed: a rate > 0, a "
                             "threshold, or both (with neither, nothing would ever be reset)")
        self.optimizer = optimizer
        self.rate, self.threshold, self.maturity = reset_rate, reset_threshold, reset_maturity
        self.every, self.decay, self.utility_kind = reset_every, utility_decay, utility
        self.pairs: list[tuple[NeuronLayer, NeuronLayer, int]] = []
        unreset = []
        for producer, consumer in zip(layers, layers[1:], strict=False):
            per_channel = _consumer_view(producer, consumer)
            if per_channel is None:
                unreset.append(producer.name)
            else:
                self.pairs.append((producer, consumer, per_channel))
        if not self.pairs:
            warnings.warn("neuron resets: no layer of the model feeds another Linear/Conv layer that reads "
                          "its neurons (a single layer, or no chain), so no neuron can ever be reset and "
                          "the resets do nothing", stacklevel=3)
        elif unreset:
            warnings.warn(f"neuron resets: layers {unreset} feed no layer whose input is their neurons "
                          "(not a chain of Linear/Conv layers); their neurons are never reset",
                          stacklevel=3)
        device = layers[0].weight.device if layers else "cpu"
        self.activity = [torch.zeros(p.n, device=device) for p, _, _ in self.pairs]
        self.utility = [torch.zeros(p.n, device=device) for p, _, _ in self.pairs]
        self.born = [torch.zeros(p.n, dtype=torch.long, device=device) for p, _, _ in self.pairs]  # step of last reset
        self.budget = [0.0] * len(self.pairs)
        self.recorded = [0] * len(self.pairs)  # training forward passes seen since the last check
        self._warned_unrecorded = False
        self.total = 0
        self.replaced: list[tuple[NeuronLayer, torch.Tensor]] = []
        self.last: dict[str, float] = {}
        self.handles = [consumer.module.register_forward_pre_hook(IndexedHook(self, "_record", index))
                        for index, (_, consumer, _) in enumerate(self.pairs)]

    def _record(self, index: int, module: nn.Module, inputs: tuple) -> None:
        """Forward pre-hook of pair ``index``'s consumer: fold its input's mean |x| per channel
        (the producer's neurons, after their activation function) into the activity."""
        if not module.training or not torch.is_grad_enabled():
            return
        producer, _, per_channel = self.pairs[index]
        x = inputs[0].detach()
        if isinstance(module, nn.Linear):  # [..., C * per_channel], channel-major
            mean_abs = x.reshape(-1, producer.n, per_channel).abs().mean((0, 2))
        else:  # [B, C, ...]
            mean_abs = x.transpose(0, 1).reshape(producer.n, -1).abs().mean(1)
        self.activity[index].lerp_(mean_abs.float(), 1 - self.decay)
        self.recorded[index] += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _utility(self, index: int) -> torch.Tensor:
        producer, consumer, _ = self.pairs[index]
        if self.utility_kind == "activity":
            return self.activity[index]
        outgoing = consumer.weight.detach().reshape(consumer.weight.shape[0], producer.n, -1).abs().sum((0, 2))
        return self.activity[index] * outgoing.float()

    @torch.no_grad()
    def step(self, step_count: int, generator: torch.Generator) -> dict[torch.Tensor, torch.Tensor]:
        """On check steps (``step_count``: steps taken, this one included), replace the chosen
        neurons. Returns ``{parameter: bool mask of the entries that changed}`` (empty when none
        did), and the replaced neurons' indices in each producer layer in :attr:`replaced`."""
        changed: dict[torch.Tensor, torch.Tensor] = {}
        self.replaced = []
        count = 0
        for index, (producer, consumer, _) in enumerate(self.pairs):
            self.budget[index] += self.rate * producer.n
            if step_count % self.every or (self.rate and self.budget[index] < 1):
                continue  # not a check step, or the rate allows no replacement yet: skip the utility pass
            if not self.recorded[index]:
                self._warn_unrecorded(consumer.name)
                continue  # no activity seen: every utility would read 0 and any neuron could go
            self.recorded[index] = 0
            utility = self.utility[index] = self._utility(index)
            eligible = step_count - self.born[index] >= self.maturity
            if self.threshold is not None:
                score = utility / utility.mean().clamp_min(1e-12)
                eligible &= score <= self.threshold
            candidates = eligible.nonzero().squeeze(1)
            if self.rate:
                budget = min(int(self.budget[index]), candidates.numel())
                self.budget[index] -= budget
                candidates = candidates[torch.argsort(utility[candidates], stable=True)[:budget]]
            else:
                self.budget[index] = 0.0
            if candidates.numel():
                self._replace(producer, consumer, candidates, generator, changed)
                self.born[index][candidates] = step_count
                self.activity[index][candidates] = 0.0
                self.replaced.append((producer, candidates))
                count += candidates.numel()
        self.total += count
        self.last = {"reset_count": float(count), "reset_total": float(self.total)}
        return changed

    def _warn_unrecorded(self, consumer: str) -> None:
        if not self._warned_unrecorded:
            warnings.warn(f"neuron resets: the activity hook on {consumer!r} recorded no training forward pass "
                          "since the last check (the model in eval mode, or the forward under no_grad or "
                          "compiled before the hook was added), so no neuron is reset until it does",
                          stacklevel=4)
            self._warned_unrecorded = True

    def _replace(self, producer: NeuronLayer, consumer: NeuronLayer, neurons: torch.Tensor,
                 generator: torch.Generator, changed: dict[torch.Tensor, torch.Tensor]) -> None:
        bound = 1.0 / math.sqrt(producer.fan_in - (1 if producer.bias is not None else 0))
        rows = torch.zeros(producer.n, dtype=torch.bool, device=producer.weight.device)
        rows[neurons] = True
        fresh = torch.rand((neurons.numel(), *producer.weight.shape[1:]), generator=generator)
        producer.weight[neurons] = ((fresh * 2 - 1) * bound).to(producer.weight)
        changed[producer.weight] = rows.view(-1, *([1] * (producer.weight.dim() - 1))).expand_as(producer.weight)
        if producer.bias is not None:
            producer.bias[neurons] = 0.0
            changed[producer.bias] = rows
        out = consumer.weight.view(consumer.weight.shape[0], producer.n, -1)
        out[:, neurons] = 0.0
        columns = rows.view(1, -1, 1).expand_as(out).reshape(consumer.weight.shape)
        changed[consumer.weight] = columns if consumer.weight not in changed else changed[consumer.weight] | columns
        for param in (producer.weight, producer.bias, consumer.weight):
            if param is not None:
                self._reset_state(param, changed[param])

    def _reset_state(self, param: nn.Parameter, mask: torch.Tensor) -> None:
        for key, value in self.optimizer.state.get(param, {}).items():
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                continue
            if key in SECOND_MOMENTS:
                kept = value[~mask]
                value[mask] = kept.mean() if kept.numel() else 0.0
            else:
                value[mask] = 0.0

    def telemetry(self) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"activity": [t.clone() for t in self.activity], "born": [t.clone() for t in self.born],
                "budget": list(self.budget), "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mine, saved in zip(self.activity + self.born, state["activity"] + state["born"], strict=True):
            mine.copy_(saved)
        self.budget, self.total = list(state["budget"]), state["total"]


class Resetting(NeuronChain):
    """A base optimiser followed by neuron resets: continual backprop and ReDo over any base.

    ``Resetting(model, lr, base="adamw", reset_rate=1e-4)`` is continual backprop;
    ``Resetting(model, lr, reset_rate=0, reset_threshold=0.1, reset_every=1000,
    utility="activity")`` is ReDo. A chain of one transform (``ribbed.core.chain``): the base
    optimiser is built by registry name (or class) and shares its ``param_groups`` and ``state``,
    so LR schedulers and checkpoints work unchanged; the resets' state is in the first trainable
    parameter's entry under ``"resets"``.
    """

    state_key = "resets"

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, base: Any = "adamw",
                 base_options: dict[str, Any] | None = None, reset_rate: float = 1e-4,
                 reset_threshold: float | None = None, reset_maturity: int = 100, reset_every: int = 1,
                 utility_decay: float = 0.99, utility: str = "contribution", seed: int = 0):
        from ribbed.core.transforms import neuron_resets

        check_number("lr", lr, "a number > 0", lambda v: v > 0)
        resets = neuron_resets(reset_rate=reset_rate, reset_threshold=reset_threshold, reset_maturity=reset_maturity,
                               reset_every=reset_every, utility_decay=utility_decay, reset_utility=utility)
        super().__init__(model, lr, transforms=[resets], base=base, base_options=base_options, seed=seed)

    def upgrade_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Checkpoints from before the chain: ``{"resets", "step", "generator"}``."""
        if "transforms" in state:
            return state
        return {"step": state["step"], "generator": state["generator"], "transforms": {"resets": state["resets"]}}
