"""Controller banks: the seed's "neuron-level external ML system", one small MLP per group.

``K`` two-layer MLPs are stored as stacked tensors (``w1 [K, F, H]``, ``w2 [K, H, O]``) and
applied to all ``N`` neurons at once (:func:`gathered_mlp`: for a small bank every neuron
through every controller in one matmul, then each neuron's own outputs; for a large one each
neuron's controller weights gathered and one batched matmul), so the cost does not depend on
how neurons are grouped and there is no loop over neurons or controllers.

A controller's outputs for neuron ``i`` are decoded by :class:`ControllerOutputs` in one of two
ways, chosen by ``objective``.

``residual`` (the default): a bounded residual on the base optimiser's rule. The first output
gives a log-multiplier ``delta_i = log(M) tanh(o_i)``, centred per layer (``delta_i - mean over
the layer``) so that the layer's overall step size stays with the tuned learning rate and its
schedule, and the multiplier is ``m_i = exp(delta_i - mean)``. Output weights start at zero, so
``m = 1`` exactly: at step 0, and for as long as the controllers are frozen (``controller_lr=0``),
RIBBED is its base optimiser. The controllers are trained on
``mean(s_i * delta_i) + penalty / 2 * mean(delta_i^2)`` with ``s_i`` the neuron's smoothed,
RMS-normalised meta-gradient (``ribbed.core.signals``): since ``dL/d delta_i = s_i``, the first
term is the loss's first-order change, and the penalty gives the loss an interior optimum
``delta_i = -s_i / penalty``. Why: the loss of the ``linear`` objective below, ``mean(h m)``, is
linear in the multiplier, has no interior optimum, and Adam drives every multiplier to a bound.
Measured on the default preset (MNIST-1D, 1D CNN, 3000 steps): 97% of live neurons ended within
10% of the lower bound and RIBBED trained at about half its tuned rate from step 1000 on; the
redundant coupling ``lambda`` (``m = 1 + lambda (s - 1)``) saturated with it (0.52 to 0.97).

``linear`` (the ablation it now is; the first design):

* two step-size heads, *explore* ``s = exp(tanh(o) log M)`` in ``[1/M, M]`` (bold changes)
  and *exploit* ``exp(tanh(o) log M / 2)`` in ``[1/sqrt(M), sqrt(M)]`` (fine adjustments),
  mixed per neuron by a context gate ``c_i = sigmoid(a . stability_i)`` read from the
  neuron's stability signals (momentum agreement, hypergradient, surprise): the seed's
  "contextual external models". The different ranges also break the symmetry between the
  heads, which start identical;
* the Meta-BP coupling strength ``lambda_i = sigmoid(o)`` in ``[0, 1]``; the applied update is
  the soft coupling ``(1 - lambda) d_base + lambda d_guided`` with the guided update
  ``s * d_base``, i.e. a per-neuron multiplier ``m = 1 + lambda (s - 1)``;
* trained on ``mean(cos_i * m_i)``, the hypergradient cosine (Baydin et al. 2018 give the
  scalar version for one global learning rate; here each neuron's output gets its own signal).

Both objectives also output predictions of the neuron's next-step statistics (self-supervised
tracking), trained by a squared error whose size is the "surprise" feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ribbed.core.features import FEATURE_NAMES

__all__ = [
    "DENSE_MAX_CONTROLLERS", "OBJECTIVES", "ControllerBank", "ControllerOutputs", "PREDICTED", "STABILITY",
    "gathered_mlp",
]

STABILITY = ("momentum_agreement", "hypergradient", "surprise")
PREDICTED = ("log_grad_norm", "act_mean")
_STABILITY_INDEX = [FEATURE_NAMES.index(name) for name in STABILITY]
OBJECTIVES = ("residual", "linear")


DENSE_MAX_CONTROLLERS = 16


def gathered_mlp(inputs: torch.Tensor, assignment: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``inputs [N, F]`` through MLP ``assignment[i]`` of a stacked bank
    (``w1 [K, F, H]``, ``b1 [K, H]``, ``w2 [K, H, O]``, ``b2 [K, O]``): ``[N, O]``, no loop over
    rows or MLPs.

    Two evaluations of the same function, chosen by ``K``. Up to ``DENSE_MAX_CONTROLLERS``
    every row goes through every MLP's layer as one matmul against the bank's weights laid
    side by side (``[F, K * H]``) and each row then takes its own MLP's columns: ``K`` times
    the (tiny) arithmetic, but no per-row copy of the weights, whose gather ``[N, F, H]`` and
    its backward (an ``index_add`` of ``N`` weight matrices) cost three to four times more on
    a CPU at ``K <= 16``. Beyond that the weights are gathered per row and applied by
    batched matmul, whose cost does not grow with ``K``. Both agree to rounding (summation
    order), tested in float64.
    """
    if w1.shape[0] <= DENSE_MAX_CONTROLLERS:
        hidden = torch.tanh(_each_then_pick(inputs, w1, assignment) + b1[assignment])
        return _each_then_pick(hidden, w2, assignment) + b2[assignment]
    hidden = torch.tanh(torch.bmm(inputs.unsqueeze(1), w1[assignment]).squeeze(1) + b1[assignment])
    return torch.bmm(hidden.unsqueeze(1), w2[assignment]).squeeze(1) + b2[assignment]


def _each_then_pick(inputs: torch.Tensor, weights: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """``inputs[i] @ weights[assignment[i]]`` for every row: ``inputs [N, A]`` times all ``K``
    matrices ``weights [K, A, B]`` in one matmul (``[N, K, B]``), then each row's own ``[B]``."""
    k, a, b = weights.shape
    every = (inputs @ weights.transpose(0, 1).reshape(a, k * b)).view(-1, k, b)
    # a gather, not take_along_dim: the indices are in range, so no pass to wrap negative ones
    return torch.gather(every, 1, assignment.view(-1, 1, 1).expand(-1, 1, b)).squeeze(1)


@dataclass
class ControllerOutputs:
    """Decoded per-neuron outputs (each ``[N]`` except ``predictions [N, len(PREDICTED)]``)."""

    multiplier: torch.Tensor
    step: torch.Tensor
    coupling: torch.Tensor
    gate: torch.Tensor
    predictions: torch.Tensor
    log_multiplier: torch.Tensor  # the residual objective's centred delta (log m for ``linear``)


class ControllerBank(nn.Module):
    """``n_controllers`` MLPs ``F -> H -> O`` applied per neuron by gather + batched matmul.

    Args:
        n_controllers: K, the number of controllers (one per neuron group).
        hidden: H, hidden width of each controller.
        max_multiplier: M, the largest step-size factor a head can give (and 1/M the smallest;
            for ``residual``, the bound of ``delta`` before centring is ``log M``).
        objective: ``residual`` or ``linear`` (see the module docstring).
        contextual_heads: mix explore/exploit heads by a stability gate (else one head;
            ``linear`` only).
        coupling: learn lambda per neuron (else lambda = 1: the controller's step is applied;
            ``linear`` only).
        self_supervision: predict next-step statistics (else no prediction outputs are used).
    """

    def __init__(self, n_controllers: int, *, hidden: int = 16, max_multiplier: float = 4.0,
                 contextual_heads: bool = True, coupling: bool = True, self_supervision: bool = True,
                 objective: str = "linear", generator: torch.Generator | None = None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: got {objective!r}; allowed: one of {', '.join(OBJECTIVES)}")
        if objective == "residual" and (contextual_heads or coupling):
            raise ValueError(f"contextual_heads and coupling: got {contextual_heads!r}, {coupling!r} with "
                             "objective='residual'; allowed: False (the heads and lambda belong to the "
                             "'linear' objective)")
        self.objective = objective
        self.layer_of: torch.Tensor | None = None
        self.layer_sizes: torch.Tensor | None = None
        features = len(FEATURE_NAMES)
        self.outputs = 3 + len(PREDICTED)  # explore, exploit, coupling, then the predictions
        self.log_max = math.log(max_multiplier)
        self.contextual_heads, self.coupling, self.self_supervision = contextual_heads, coupling, self_supervision
        scale = 1.0 / math.sqrt(features)
        self.w1 = nn.Parameter(torch.randn(n_controllers, features, hidden, generator=generator) * scale)
        self.b1 = nn.Parameter(torch.zeros(n_controllers, hidden))
        self.w2 = nn.Parameter(torch.zeros(n_controllers, hidden, self.outputs))
        self.b2 = nn.Parameter(torch.zeros(n_controllers, self.outputs))
        self.gate = nn.Linear(len(STABILITY), 1)
        nn.init.zeros_(self.gate.weight), nn.init.zeros_(self.gate.bias)

    def raw(self, features: torch.Tensor, assignment: torch.Tensor,
            weights: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs ``[N, O]`` of each neuron's controller on its features ``[N, F]``.

        With ``assignment [N, k]`` and ``weights [N, k]`` (top-k attention routing,
        ``ribbed.core.routers``) each of a neuron's ``k`` controllers is evaluated by the same
        gather + bmm and their raw outputs are mixed by the weights before decoding: one decoding
        path serves both cases, the decoded multiplier and lambda keep their ranges, and each
        controller's gradient is scaled by its attention weight.
        """
        if assignment.dim() == 2:
            assert weights is not None, "a neuron's k controllers come with their weights"
            n, k = assignment.shape
            each = gathered_mlp(features.repeat_interleave(k, 0), assignment.flatten(),
                                self.w1, self.b1, self.w2, self.b2)
            return (each.view(n, k, -1) * weights.unsqueeze(2)).sum(1)
        return gathered_mlp(features, assignment, self.w1, self.b1, self.w2, self.b2)

    def set_layers(self, layer_of: torch.Tensor) -> None:
        """Each neuron's layer index ``[N]``: the residual objective centres ``delta`` per layer
        (without it, over all neurons)."""
        self.layer_of = layer_of
        self.layer_sizes = torch.bincount(layer_of)  # once: every forward centres by it

    def forward(self, features: torch.Tensor, assignment: torch.Tensor,
                weights: torch.Tensor | None = None) -> ControllerOutputs:
        out = self.raw(features, assignment, weights)
        if self.objective == "residual":
            delta = torch.tanh(out[:, 0]) * self.log_max
            centred = delta - _layer_mean(delta, self.layer_of, self.layer_sizes)
            multiplier = torch.exp(centred)
            ones = torch.ones_like(multiplier)
            return ControllerOutputs(multiplier, multiplier, ones, ones, out[:, 3:], centred)
        explore = torch.exp(torch.tanh(out[:, 0]) * self.log_max)
        if self.contextual_heads:
            exploit = torch.exp(torch.tanh(out[:, 1]) * (0.5 * self.log_max))
            gate = torch.sigmoid(self.gate(features[:, _STABILITY_INDEX]).squeeze(1))
            step = gate * explore + (1 - gate) * exploit
        else:
            gate = torch.ones_like(explore)
            step = explore
        coupling = torch.sigmoid(out[:, 2]) if self.coupling else torch.ones_like(step)
        multiplier = 1 + coupling * (step - 1)
        return ControllerOutputs(multiplier, step, coupling, gate, out[:, 3:], torch.log(multiplier))


def _layer_mean(values: torch.Tensor, layer_of: torch.Tensor | None, sizes: torch.Tensor | None) -> torch.Tensor:
    """Each entry's layer mean of ``values [N]`` given each layer's size (``torch.bincount`` of
    ``layer_of``); one segment when ``layer_of`` is None."""
    if layer_of is None or sizes is None:
        return values.mean().expand_as(values)
    sums = values.new_zeros(len(sizes)).index_add(0, layer_of, values)
    return (sums / sizes.to(values))[layer_of]
