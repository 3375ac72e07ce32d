"""Function-preserving growth during training: Net2WiderNet and Net2DeeperNet.

Chen, Goodfellow & Shlens (2016, "Net2Net: accelerating learning via knowledge transfer",
ICLR, arXiv:1511.05641) grow a network without changing the function it computes:

* **widen** a hidden layer from ``n`` to ``m`` units: unit ``j`` of the wider layer copies
  unit ``g(j)`` (``g`` is the identity on the first ``n`` units and uniform at random after),
  its incoming weights and bias are copied, and its outgoing weights are those of ``g(j)``
  divided by how many copies ``g(j)`` has. To break the symmetry between copies, noise that
  sums to zero over each unit's copies is added to the outgoing weights (``noise``, relative
  to their standard deviation), so the function is still preserved exactly;
* **deepen** by inserting, after a hidden block, a Linear layer initialised to the identity
  followed by the block's activation; this preserves the function when the activation is
  idempotent on its own outputs (``relu(relu(x)) = relu(x)``), so only ReLU is accepted.

Models whose ``blocks`` are ``nn.Sequential(nn.Linear, activation[, nn.Dropout])`` and whose
``head`` is an ``nn.Linear`` (the ``mlp`` model) can grow. Parameters keep their identity
(``param.data`` is replaced), so the optimiser, LR scheduler and gradient hooks still hold them.

**Optimiser state.** The gradient of the widened network at the mapped weights is a linear
map of the old gradient: copied incoming rows receive ``grad[g(j)] / c(g(j))`` and copied
outgoing columns ``grad[:, g(j)]`` (``c`` = number of copies). Every per-element state that
is a running average of gradients to the power ``k`` (momentum and Adam's first moment:
``k = 1``; second moments: ``k = 2``; RMSprop's momentum of normalised steps: ``k = 0``) is
mapped with the same index and the factor to the power ``k``. With ``noise = 0`` this is
exactly the state the optimiser would hold had the wider network been trained along the
mapped trajectory. Step counters are kept. For an optimiser we do not know, the state of
each resized parameter is dropped and rebuilt from zero on its next step. Parameters of an
inserted layer join the parameter group of the block they follow, with empty state.

The ``net2net`` training plug-in grows the model at listed steps or when a loss probed on a
fixed validation subset has stopped improving (a plateau). Its ``state_dict`` records every
growth (with the unit mapping) so that ``load_state_dict`` can replay them on a freshly built
model; resuming a grown run also needs the loop to load plug-in states before the model's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ribbed.data import Split
from ribbed.nn.mlp import ACTIVATIONS
from ribbed.train import Precision, StepBatch, TrainingPlugin, evaluate, register_plugin

__all__ = ["Growth", "Net2NetGrowth", "deepen", "linear_chain", "widen"]

OPERATIONS = ("widen", "deepen")
# Modules that act on each unit alone, so copying a unit copies its output.
_ELEMENTWISE = (*ACTIVATIONS.values(), nn.Dropout)

# Power k of the gradient each per-element optimiser state averages (see module docstring).
_STATE_POWERS: tuple[tuple[type[torch.optim.Optimizer], dict[str, int]], ...] = (
    (torch.optim.SGD, {"momentum_buffer": 1}),
    (torch.optim.Adam, {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}),
    (torch.optim.AdamW, {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}),
    (torch.optim.RMSprop, {"square_avg": 2, "grad_avg": 1, "momentum_buffer": 0}),
    (torch.optim.Adagrad, {"sum": 2}),
)


@dataclass
class Growth:
    """One growth event, enough to replay it on a freshly built model."""

    step: int
    operation: str
    block: int
    mapping: list[int] = field(default_factory=list)


def linear_chain(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a growable model: each block's first module, then the head."""
    blocks: Any = getattr(model, "blocks", None)
    head: Any = getattr(model, "head", None)
    growable = (
        isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and isinstance(head, nn.Linear)
        and all(isinstance(b, nn.Sequential) and isinstance(b[0], nn.Linear)
                and all(isinstance(m, _ELEMENTWISE) for m in list(b)[1:]) for b in blocks)
    )
    if not growable:
        raise ValueError(
            f"net2net: model {type(model).__name__} cannot grow; allowed: a model whose blocks are "
            "nn.Sequential(nn.Linear, then activations or dropout) with an nn.Linear head (the 'mlp' model)"
        )
    return [block[0] for block in blocks] + [head]


def _state_powers(optimizer: torch.optim.Optimizer | None) -> dict[str, int] | None:
    for cls, powers in _STATE_POWERS:
        if type(optimizer) is cls:
            return powers
    return None


def _resize(param: torch.Tensor, new: torch.Tensor, optimizer: torch.optim.Optimizer | None,
            dim: int, index: torch.Tensor, grad_factor: torch.Tensor) -> None:
    """Give ``param`` the values ``new`` and map its optimiser state along ``dim`` by ``index``."""
    if optimizer is not None and optimizer.state.get(param):
        state, powers = optimizer.state[param], _state_powers(optimizer)
        per_element = {k for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}
        if powers is None or not per_element <= set(powers):
            del optimizer.state[param]
        else:
            shape = [1] * param.dim()
            shape[dim] = -1
            factor = grad_factor.to(param.dtype).reshape(shape)
            for key in per_element:
                state[key] = state[key].index_select(dim, index) * factor.pow(powers[key])
    param.data = new
    param.grad = None


def widen(
    model: nn.Module, block: int, width: int, *, optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None, noise: float = 0.0, mapping: Sequence[int] | None = None,
) -> list[int]:
    """Widen hidden block ``block`` to ``width`` units (Net2WiderNet); returns the unit mapping.

    Args:
        model: a growable model (see :func:`linear_chain`).
        block: index of the hidden block.
        width: the new number of units, more than the current one.
        optimizer: whose state for the resized parameters is mapped (see the module docstring).
        generator: draws the mapping of the new units and the symmetry-breaking noise.
        noise: standard deviation of the zero-sum noise on outgoing weights, relative to theirs.
        mapping: replay a recorded mapping instead of drawing one.
    """
    chain = linear_chain(model)
    if not (isinstance(block, int) and 0 <= block < len(chain) - 1):
        raise ValueError(f"net2net option block: got {block!r}; allowed: 0 to {len(chain) - 2} (a hidden block)")
    incoming, outgoing = chain[block], chain[block + 1]
    old = incoming.out_features
    if not (isinstance(width, int) and width > old):
        raise ValueError(f"net2net widen width: got {width!r}; allowed: an integer above the current width {old}")
    generator = generator or torch.Generator().manual_seed(0)
    device = incoming.weight.device
    if mapping is None:
        extra = torch.randint(0, old, (width - old,), generator=generator)
        index = torch.cat([torch.arange(old), extra]).to(device)
    else:
        index = torch.as_tensor(list(mapping), dtype=torch.long, device=device)
    copies = torch.bincount(index, minlength=old).to(incoming.weight.dtype)
    share = 1.0 / copies[index]
    with torch.no_grad():
        out_weight = outgoing.weight[:, index] * share
        if noise > 0:
            perturbation = torch.randn(out_weight.shape, generator=generator, dtype=out_weight.dtype).to(device)
            perturbation *= noise * outgoing.weight.std()
            group_sum = torch.zeros_like(outgoing.weight).index_add_(1, index, perturbation)
            out_weight += perturbation - group_sum[:, index] * share
        _resize(incoming.weight, incoming.weight[index], optimizer, 0, index, share)
        if incoming.bias is not None:
            _resize(incoming.bias, incoming.bias[index], optimizer, 0, index, share)
        _resize(outgoing.weight, out_weight, optimizer, 1, index, torch.ones_like(share))
    incoming.out_features = outgoing.in_features = width
    return index.tolist()


def deepen(model: nn.Module, block: int, *, optimizer: torch.optim.Optimizer | None = None) -> nn.Sequential:
    """Insert an identity-initialised copy of hidden block ``block`` right after it (Net2DeeperNet)."""
    chain = linear_chain(model)
    if not (isinstance(block, int) and 0 <= block < len(chain) - 1):
        raise ValueError(f"net2net option block: got {block!r}; allowed: 0 to {len(chain) - 2} (a hidden block)")
    blocks = cast(nn.ModuleList, model.blocks)  # linear_chain checked: a ModuleList of Sequentials
    source = cast(nn.Sequential, blocks[block])
    activations = [m for m in list(source)[1:] if not isinstance(m, nn.Dropout)]
    if not all(isinstance(m, nn.ReLU) for m in activations):
        raise ValueError(
            f"net2net deepen: block {block} uses {[type(m).__name__ for m in activations]}; allowed: ReLU "
            "(an identity layer preserves the function only when f(f(x)) = f(x))"
        )
    width = chain[block].out_features
    inserted = copy.deepcopy(source)
    identity = nn.utils.skip_init(  # no random init: the run's random stream stays as it was
        nn.Linear, width, width, device=chain[block].weight.device, dtype=chain[block].weight.dtype)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(width))
        identity.bias.zero_()
    inserted[0] = identity
    blocks.insert(block + 1, inserted)
    if optimizer is not None:
        group = next(g for g in optimizer.param_groups if any(p is chain[block].weight for p in g["params"]))
        group["params"].extend(identity.parameters())
    return inserted


@register_plugin(
    "net2net",
    "function-preserving widening or deepening (Net2Net) at listed steps or on a validation-loss plateau",
)
class Net2NetGrowth(TrainingPlugin):
    """Grow the model during training (see the module docstring).

    Args:
        operation: ``widen`` or ``deepen``.
        at_steps: grow after each of these optimiser steps.
        plateau_patience: also grow (at most ``max_growths`` times) when the probe loss has not
            improved by a relative ``min_delta`` for this many checks; ``None``: no plateau trigger.
        check_every: steps between probe-loss checks.
        min_delta: relative improvement that resets the plateau count.
        probe_samples: size of the fixed validation subset the probe loss is measured on.
        max_growths: most plateau-triggered growths.
        factor: widening multiplies each widened block's width by this.
        block: which hidden block to widen (``None``: all) or to deepen after (``None``: the last).
        noise: symmetry-breaking noise of widening, relative to the outgoing weights' std.
        seed: seeds the unit mappings and the noise (not the run's random stream).
    """

    def __init__(
        self, operation: str = "widen", at_steps: Sequence[int] = (), plateau_patience: int | None = None,
        check_every: int = 100, min_delta: float = 0.01, probe_samples: int = 512, max_growths: int = 1,
        factor: float = 2.0, block: int | None = None, noise: float = 0.01, seed: int = 0,
    ):
        field_name = "train.plugins.net2net option"
        if operation not in OPERATIONS:
            raise ValueError(f"{field_name} operation: got {operation!r}; allowed: {', '.join(OPERATIONS)}")
        if not all(isinstance(s, int) and s >= 1 for s in at_steps):
            raise ValueError(f"{field_name} at_steps: got {at_steps!r}; allowed: a list of steps >= 1")
        if plateau_patience is not None and not (isinstance(plateau_patience, int) and plateau_patience >= 1):
            raise ValueError(f"{field_name} plateau_patience: got {plateau_patience!r}; "
                             "allowed: an integer >= 1 or null")
        if not at_steps and plateau_patience is None:
            raise ValueError(f"{field_name}s: give at_steps, plateau_patience or both; neither triggers growth")
        if not (isinstance(factor, (int, float)) and factor > 1):
            raise ValueError(f"{field_name} factor: got {factor!r}; allowed: a number > 1")
        if not (isinstance(noise, (int, float)) and noise >= 0):
            raise ValueError(f"{field_name} noise: got {noise!r}; allowed: a number >= 0")
        self.operation, self.at_steps, self.patience = operation, set(at_steps), plateau_patience
        self.check_every, self.min_delta, self.probe_samples = check_every, min_delta, probe_samples
        self.max_growths, self.factor, self.block, self.noise, self.seed = max_growths, factor, block, noise, seed
        self.events: list[Growth] = []
        self.best, self.since_best, self.plateau_growths = math.inf, 0, 0

    def attach(self, parts) -> None:
        linear_chain(parts.model)
        self._parts = parts
        val = parts.dataset.val
        self._probe = Split(val.x[: self.probe_samples], val.y[: self.probe_samples])

    def _probe_loss(self) -> float:
        parts = self._parts
        return evaluate(parts.model, self._probe, task=parts.dataset.task, batch_size=len(self._probe),
                        precision=Precision("fp32", parts.device.type), device=parts.device)["loss"]

    def _plateaued(self, step: int) -> bool:
        if self.patience is None or self.plateau_growths >= self.max_growths or step % self.check_every:
            return False
        loss = self._probe_loss()
        if loss < self.best * (1 - self.min_delta):
            self.best, self.since_best = loss, 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience

    def after_step(self, step: int, batch: StepBatch) -> None:
        done = step + 1
        if done in self.at_steps:
            self.grow(done)
        elif self._plateaued(done):
            self.plateau_growths += 1
            self.since_best = 0
            self.grow(done)

    def grow(self, step: int) -> None:
        """Apply the configured growth now (after optimiser step ``step``) and record it."""
        model, optimizer = self._parts.model, self._parts.optimizer
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self.events))
        hidden = len(linear_chain(model)) - 1
        if self.operation == "deepen":
            block = hidden - 1 if self.block is None else self.block
            deepen(model, block, optimizer=optimizer)
            self.events.append(Growth(step, "deepen", block))
            return
        for block in range(hidden) if self.block is None else [self.block]:
            width = math.ceil(linear_chain(model)[block].out_features * self.factor)
            mapping = widen(model, block, width, optimizer=optimizer, generator=generator, noise=self.noise)
            self.events.append(Growth(step, "widen", block, mapping))

    def metrics(self) -> dict[str, float]:
        return {
            "net2net_parameters": float(sum(p.numel() for p in self._parts.model.parameters())),
            "net2net_growths": float(len({event.step for event in self.events})),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"events": [asdict(event) for event in self.events], "best": self.best,
                "since_best": self.since_best, "plateau_growths": self.plateau_growths}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the recorded growths on the (freshly built) model, then restore the counters.

        The replayed weights are placeholders: the checkpoint's model and optimiser states,
        loaded next, overwrite them.
        """
        model, optimizer = self._parts.model, self._parts.optimizer
        for event in [Growth(**recorded) for recorded in state["events"][len(self.events):]]:
            if event.operation == "deepen":
                deepen(model, event.block, optimizer=optimizer)
            else:
                widen(model, event.block, len(event.mapping), optimizer=optimizer, mapping=event.mapping)
            self.events.append(event)
        self.best, self.since_best = state["best"], state["since_best"]
        self.plateau_growths = state["plateau_growths"]
