"""Neuron norm projection: each neuron's incoming weights kept at the norm they started with.

After every optimiser step the weight vector feeding each neuron (a row of a ``Linear``
weight, an output channel of a ``Conv`` weight) is rescaled to the norm it had when the
projection was built; biases are left free. This is the projection half of Normalize-and-Project
(Lyle et al., "Normalization and effective learning rates in reinforcement learning", NeurIPS
2024), applied per neuron as in weight normalisation with a fixed gain (Salimans & Kingma,
NeurIPS 2016). Why it belongs beside RIBBED's controllers: a neuron's effective step size is
its learning rate divided by its squared weight norm, so as norms grow under a long stream of
tasks every step shrinks, and a step-size multiplier is fighting a drift it cannot see. With
the norms held fixed the effective rate of each neuron is exactly ``lr * multiplier / norm^2``,
so the multipliers the controllers learn are the neurons' true step sizes.

Scope: ``"hidden"`` projects every neuron layer but the last one in module order (the output
layer keeps its free scale, which sets the logits' temperature); ``"all"`` projects every
layer. A neuron replaced by a reset (:mod:`ribbed.core.resets`) is projected back to its
layer's target at the next step like any other.

Not a library function: torch's ``weight_norm`` parametrisation reparametrises the module (its
forward recomputes ``g * v / |v|``, and the optimiser then sees ``g`` and ``v``, not the
weight), which changes what the base optimiser's moments are about; the projection here acts on
the weight the optimiser owns, after its step, at the cost of one row-norm per layer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ribbed.core.layers import find_neuron_layers
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> layers = find_neuron_layers(model, set(model.parameters()), hooks=False)
    >>> projection = NeuronNormProjection(layers, scope="hidden")
    >>> before = model[0].weight.norm(dim=1).clone()
    >>> with torch.no_grad():
    ...     model[0].weight.mul_(3.0)
    >>> projection.project()
    >>> torch.allclose(model[0].weight.norm(dim=1), before)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ribbed.checks import check_number
from ribbed.core.chain import NeuronChain
from ribbed.core.layers import NeuronLayer

__all__ = ["PROJECTION_SCOPES", "NeuronNormProjection", "NormProjected", "check_projection_scope"]

PROJECTION_SCOPES = ("hidden", "all")


def check_projection_scope(scope: Any, field: str = "norm_projection") -> str:
    if scope not in PROJECTION_SCOPES:
        raise ValueError(f"{field}: got {scope!r}; allowed: {', '.join(map(repr, PROJECTION_SCOPES))}")
    return scope


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each neuron's incoming weights, shaped to broadcast against ``weight``."""
    norms = torch.linalg.vector_norm(weight.flatten(1), dim=1)
    return norms.view(-1, *([1] * (weight.dim() - 1)))


class NeuronNormProjection:
    """Holds each projected neuron's incoming-weight norm at its value when this was built."""

    def __init__(self, layers: list[NeuronLayer], *, scope: str = "hidden"):
        check_projection_scope(scope)
        chosen = layers[:-1] if scope == "hidden" else list(layers)
        self.scope = scope
        self.names = [layer.name for layer in chosen]
        self.weights: list[torch.Tensor] = [layer.weight for layer in chosen]
        if not self.weights:  # a projection that projects nothing would switch itself off unseen
            raise ValueError(f"norm_projection: scope {scope!r} selects no layer of this model (it has "
                             f"{len(layers)} optimised Linear/Conv layers); allowed: scope 'all', or a deeper model")
        with torch.no_grad():
            # kept in at least float32 (a bfloat16 norm is only good to ~3 digits)
            self.targets = [_row_norms(w.detach().to(torch.promote_types(w.dtype, torch.float32)))
                            for w in self.weights]
        zero = [name for name, target in zip(self.names, self.targets, strict=True) if not bool((target > 0).all())]
        if zero:
            raise ValueError(f"norm_projection: layers {zero} have a neuron whose incoming weights are all zero "
                             "(no direction to keep); allowed: layers initialised with non-zero weights")

    @torch.no_grad()
    def project(self) -> None:
        """Rescale every projected neuron's incoming weights back to their target norm."""
        factors = [(target / _row_norms(w.to(target.dtype)).clamp_min(1e-12)).to(w.dtype)
                   for w, target in zip(self.weights, self.targets, strict=True)]
        torch._foreach_mul_(self.weights, factors)

    def state_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "targets": [t.clone() for t in self.targets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["scope"] != self.scope or len(state["targets"]) != len(self.targets):
            raise ValueError(f"norm_projection state: saved for scope {state['scope']!r} over "
                             f"{len(state['targets'])} layers; this projection has scope {self.scope!r} over "
                             f"{len(self.targets)} layers")
        for mine, saved in zip(self.targets, state["targets"], strict=True):
            if mine.shape != saved.shape:
                raise ValueError(f"norm_projection state: a layer's targets have shape {tuple(saved.shape)}; "
                                 f"this model's layer has {tuple(mine.shape)}")
            mine.copy_(saved)


class NormProjected(NeuronChain):
    """A base optimiser followed by the neuron norm projection (registry ``norm-projected``).

    The baseline that tells whether RIBBED's controllers add anything to the projection alone.
    A chain of one transform (``ribbed.core.chain``): the base is built by registry name (AdamW
    by default) and shares its ``param_groups`` and ``state``, so LR schedulers work unchanged;
    the state dict is the base's, in torch's layout, with the projection's targets in the first
    trainable parameter's entry.
    """

    state_key = "norm_projection"

    def __init__(self, model: nn.Module, lr: float = 1e-3, *, base: Any = "adamw",
                 base_options: dict[str, Any] | None = None, scope: str = "hidden"):
        from ribbed.core.transforms import norm_projection

        check_number("lr", lr, "a number > 0", lambda v: v > 0)
        super().__init__(model, lr, transforms=[norm_projection(scope)], base=base, base_options=base_options)

    def upgrade_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """Checkpoints from before the chain kept only the projection's own state."""
        if "transforms" in state:
            return state
        return {"step": 0, "generator": self.generator.get_state(), "transforms": {"projection": state}}
