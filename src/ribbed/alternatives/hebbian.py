"""Hebbian learning of the hidden layers, with a supervised read-out.

Each hidden layer learns from its own input ``x`` and response ``u = W x`` only, with no
error signal; the head is trained on the (detached) features by the true gradient of the
loss. Two rules, each one batched matrix product per layer:

* ``oja``: Oja's subspace rule (Oja 1989, "Neural networks, principal components, and
  subspaces", Int. J. Neural Systems 1(1)), ``ΔW = u xᵀ - u uᵀ W`` averaged over the
  batch: the rows converge to an orthonormal basis of the input's principal subspace.
* ``softhebb``: soft winner-take-all (Moraitis et al. 2022, "SoftHebb: Bayesian inference
  in unsupervised Hebbian soft winner-take-all networks", Neuromorph. Comput. Eng. 2;
  Journé et al. 2023, "Hebbian deep learning without feedback", ICLR), ``y = softmax(u/τ)``
  over the layer's neurons and ``Δw_k = y_k (x - u_k w_k)``: neurons compete for inputs
  and each weight vector converges to unit norm.

The update goes into ``.grad`` as ``-ΔW`` so that any optimiser's descent step moves the
weights along ``+ΔW`` (plain SGD with rate η gives exactly ``W ← W + η ΔW``). Biases of
the hidden layers are not learned. Why our own: the Hebbian packages on PyPI (hahtorch,
biopytorch) are unmaintained single releases and neither plugs into a training loop; the
rules are two lines each.
"""

from __future__ import annotations

import torch
from torch import nn

from ribbed.alternatives.common import (
    add_to_grads,
    backward_scale,
    check_choice,
    check_positive_number,
    cut_between_blocks,
    feedforward_parts,
    forward_loss,
)
from ribbed.train import register_gradient_method

__all__ = ["HEBBIAN_RULES", "Hebbian", "oja_update", "softhebb_update"]


def oja_update(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Oja's subspace rule ``mean_b (u xᵀ - u uᵀ W)`` with ``u = W x``, for ``x: [B, n_in]``."""
    u = x @ weight.T
    return (u.T @ x - (u.T @ u) @ weight) / len(x)


def softhebb_update(x: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """SoftHebb ``mean_b y_k (x - u_k w_k)`` with ``u = W x`` and ``y = softmax(u / τ)``."""
    u = x @ weight.T
    y = torch.softmax(u / temperature, dim=1)
    return (y.T @ x - (y * u).sum(0).unsqueeze(1) * weight) / len(x)


HEBBIAN_RULES = ("oja", "softhebb")


@register_gradient_method(
    "hebbian",
    "hidden layers learn by Oja's rule or soft winner-take-all (SoftHebb), supervised read-out",
)
class Hebbian:
    """Hebbian hidden layers (one ``nn.Linear`` per block) and a backprop-trained head.

    Args:
        rule: ``"oja"`` or ``"softhebb"`` (see the module docstring).
        temperature: the softmax temperature ``τ`` of SoftHebb's competition.
    """

    def __init__(self, rule: str = "softhebb", temperature: float = 0.03):
        self.rule = check_choice("rule", rule, HEBBIAN_RULES, "hebbian")
        self.temperature = check_positive_number("temperature", temperature, "hebbian")

    def attach(self, model: nn.Module) -> None:
        self.blocks, self.head = feedforward_parts(model, "hebbian")
        layers: list[nn.Linear] = []
        for index, block in enumerate(self.blocks):
            first = block[0] if isinstance(block, nn.Sequential) else None
            if not isinstance(first, nn.Linear):
                raise ValueError(
                    f"train.gradient_method 'hebbian' needs blocks that start with a Linear layer "
                    f"(as mlp's do); block {index} of {type(model).__name__} starts with "
                    f"{type(next(iter(block.children()), block)).__name__}"
                )
            layers.append(first)
        self.layers = layers

    def _update(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.rule == "oja":
            return oja_update(x, weight)
        return softhebb_update(x, weight, self.temperature)

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        with cut_between_blocks(self.blocks, self.head, method="hebbian") as seen:
            _, loss, total = forward_loss(model, x, y, loss_fn, precision)
        precision.backward(total * loss_scale if loss_scale != 1.0 else total)
        weights = [layer.weight for layer in self.layers]
        with torch.no_grad():
            updates = [-self._update(inputs.flatten(1).float(), w.float())
                       for inputs, w in zip(seen.inputs[:-1], weights, strict=True)]
        add_to_grads(weights, updates, backward_scale(precision, loss_scale))
        return loss.detach()
