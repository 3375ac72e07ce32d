"""Activation functions by name, and a per-neuron learned mixture of them.

:class:`ActivationMixture` gives every unit (a feature of a Linear layer, a channel of a
convolution) its own softmax weights over a few activation functions,
``f_i(x) = sum_k softmax(logits_i)_k phi_k(x)``, learned by backpropagation with the rest of
the network: RIBBED's "per-neuron choice of activation function" (``../shared/DESIGN.md``),
in the spirit of adaptive activation functions (Agostinelli et al. 2015, "Learning activation
functions to improve deep neural networks") and of DARTS's softmax relaxation of a discrete
choice (Liu et al. 2019). PyTorch has no such module; it is one parameter ``[units, K]`` and
``K`` element-wise passes, one per function (never a loop over units).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATION_CHOICES", "ELEMENTWISE", "MIXTURE", "MIXTURE_FUNCTIONS", "ActivationMixture",
           "build_activation"]

ELEMENTWISE: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}
MIXTURE = "mixture"
ACTIVATION_CHOICES = (*ELEMENTWISE, MIXTURE)
MIXTURE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "identity": lambda x: x,
}


class ActivationMixture(nn.Module):
    """Per-unit softmax mixture of activation functions.

    Args:
        units: number of units (features or channels) along ``unit_dim``.
        functions: names from :data:`MIXTURE_FUNCTIONS` (default relu, tanh, gelu, identity).
        unit_dim: the input dimension that indexes units (-1 for Linear outputs, 1 for
            convolution channels).

    The logits start at zero (an even mixture). :meth:`weights` is ``[units, K]``;
    :meth:`preferred` names each unit's heaviest function.

    Example:
        >>> mix = ActivationMixture(3)
        >>> mix(torch.randn(5, 3)).shape
        torch.Size([5, 3])
    """

    def __init__(self, units: int, functions: Sequence[str] = ("relu", "tanh", "gelu", "identity"),
                 unit_dim: int = -1):
        super().__init__()
        if not isinstance(units, int) or isinstance(units, bool) or units < 1:
            raise ValueError(f"units: got {units!r}; allowed: an integer >= 1")
        unknown = [name for name in functions if name not in MIXTURE_FUNCTIONS]
        if isinstance(functions, str) or not functions or unknown:
            raise ValueError(f"functions: got {functions!r}; allowed: a non-empty list of "
                             f"{', '.join(MIXTURE_FUNCTIONS)}")
        self.functions, self.unit_dim = tuple(functions), unit_dim
        self.logits = nn.Parameter(torch.zeros(units, len(self.functions)))

    def weights(self) -> torch.Tensor:
        """Mixture weights ``[units, K]`` (rows sum to 1)."""
        return torch.softmax(self.logits, dim=-1)

    def preferred(self) -> list[str]:
        """Each unit's function of largest weight."""
        return [self.functions[k] for k in self.logits.argmax(-1).tolist()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.unit_dim] != self.logits.shape[0]:
            raise ValueError(f"input: dimension {self.unit_dim} has {x.shape[self.unit_dim]} units; "
                             f"allowed: {self.logits.shape[0]}")
        shape = [1] * x.dim()
        shape[self.unit_dim] = self.logits.shape[0]
        weights = self.weights().to(x.dtype)
        terms = (weights[:, k].view(shape) * MIXTURE_FUNCTIONS[name](x) for k, name in enumerate(self.functions))
        out = next(terms)  # functions is never empty (checked in __init__)
        for term in terms:
            out = out + term
        return out

    def extra_repr(self) -> str:
        return f"units={self.logits.shape[0]}, functions={list(self.functions)}, unit_dim={self.unit_dim}"


def build_activation(name: str, units: int, unit_dim: int = -1) -> nn.Module:
    """The activation ``name`` (one of :data:`ACTIVATION_CHOICES`) for a layer of ``units``."""
    if name == MIXTURE:
        return ActivationMixture(units, unit_dim=unit_dim)
    if name not in ELEMENTWISE:
        raise ValueError(f"activation: got {name!r}; allowed: {', '.join(ACTIVATION_CHOICES)}")
    return ELEMENTWISE[name]()
