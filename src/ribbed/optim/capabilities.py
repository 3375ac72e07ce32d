"""What an optimiser declares about how it must be run, for the machinery that runs it.

The training loop and the distribution strategies take any ``torch.optim.Optimizer``. An
optimiser that needs something of how it is run says so with a class attribute of
:class:`Capabilities`; the machinery asks through the functions here instead of checking the
optimiser's type, so it imports none of the optimisers it makes room for, and a wrapper that
forwards its base's declaration (:class:`ribbed.optim.WrappedOptimizer` does) is run like its
base. An optimiser that declares nothing is a plain one: every answer is ``False``.

Example:
    >>> import torch
    >>> class PerNeuron(torch.optim.SGD):
    ...     needs_whole_neurons = True
    >>> weight = torch.nn.Parameter(torch.zeros(2, 2))
    >>> needs_whole_neurons(PerNeuron([weight], lr=0.1)), needs_whole_neurons(torch.optim.SGD([weight], lr=0.1))
    (True, False)
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

__all__ = ["Capabilities", "needs_whole_neurons"]


class Capabilities(Protocol):
    """The attributes an optimiser may declare; leaving one out means ``False``."""

    needs_whole_neurons: ClassVar[bool]
    """Each rank must hold every neuron whole (all of a layer's weight rows and biases). RIBBED
    averages its per-neuron features over the ranks, which is right under data parallelism
    (every rank holds the whole model) and wrong when ranks hold different layers (pipeline),
    different rows of a layer (tensor parallelism) or shards of the parameters (FSDP)."""


def needs_whole_neurons(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` declares :attr:`Capabilities.needs_whole_neurons`."""
    return bool(getattr(optimizer, "needs_whole_neurons", False))
