"""What an optimiser declares about how it must be run, for the machinery that runs it.

The training loop and the distribution strategies take any ``torch.optim.Optimizer``. An
optimiser that needs something of how it is run says so with a class attribute of
:class:`Capabilities`; the machinery asks through the functions here instead of checking the
optimiser's type, so it imports none of the optimisers it makes room for, and a wrapper that
forwards its base's declaration (:class:`ribbed.optim.WrappedOptimizer` does) is run like its
base. An optimiser that declares nothing is a plain one: every answer is ``False`` (and
:func:`telemetry` is empty, :func:`observe_labels` does nothing).

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

__all__ = ["Capabilities", "measures_density", "needs_batch", "needs_whole_neurons", "observe_labels", "telemetry"]


class Capabilities(Protocol):
    """The attributes an optimiser may declare; leaving one out means ``False``."""

    needs_whole_neurons: ClassVar[bool]
    """Each rank must hold every neuron whole (all of a layer's weight rows and biases). RIBBED
    averages its per-neuron features over the ranks, which is right under data parallelism
    (every rank holds the whole model) and wrong when ranks hold different layers (pipeline),
    different rows of a layer (tensor parallelism) or shards of the parameters (FSDP)."""

    needs_batch: bool
    """It evaluates the loss at trial parameters, on the step's batch: the run must use a
    gradient method that keeps the batch (``keep-batch``)."""

    measures_density: bool
    """It measures per-neuron information density itself, using the labels given to
    :meth:`observe_labels`, and reports the values in :meth:`telemetry`."""

    def observe_labels(self, labels: torch.Tensor) -> None:
        """The labels of the batch of the coming ``step()``."""

    def telemetry(self) -> dict[str, float]:
        """Values to add to each evaluation row."""


def needs_whole_neurons(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` declares :attr:`Capabilities.needs_whole_neurons`."""
    return bool(getattr(optimizer, "needs_whole_neurons", False))


def needs_batch(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` declares :attr:`Capabilities.needs_batch`."""
    return bool(getattr(optimizer, "needs_batch", False))


def measures_density(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` declares :attr:`Capabilities.measures_density`."""
    return bool(getattr(optimizer, "measures_density", False))


def observe_labels(optimizer: torch.optim.Optimizer, labels: torch.Tensor) -> None:
    """Give ``optimizer`` the labels of its coming step (:meth:`Capabilities.observe_labels`),
    if it declares that it uses them."""
    observe = getattr(optimizer, "observe_labels", None)
    if observe is not None:
        observe(labels)


def telemetry(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``optimizer``'s :meth:`Capabilities.telemetry` (empty when it declares none)."""
    report = getattr(optimizer, "telemetry", None)
    return report() if report is not None else {}
