"""Shared pieces of the optimisers that evaluate the model as a function of its parameters.

Natural gradient and Hessian-free treat the network as ``z = f(θ, x)`` (``torch.func``
transforms over ``functional_call``) and work on flat parameter vectors. These helpers
pick the optimised parameters, flatten and unflatten them, and join the step's
micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from ribbed.optim.batches import Batch

__all__ = ["FlatParameters", "closure_loss", "join_batches"]


def join_batches(batches: list[Batch]) -> Batch:
    """The step's micro-batches as one batch (equal micro-batches: the mean loss is unchanged)."""
    if len(batches) == 1:
        return batches[0]
    return Batch(torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches]), batches[0].loss_fn)


class FlatParameters:
    """The model parameters an optimiser updates, by name, with flat-vector views of them.

    Args:
        model: the network.
        param_groups: the optimiser's groups; only their parameters are variables.
    """

    def __init__(self, model: nn.Module, param_groups: list[dict]):
        optimised = {id(p) for group in param_groups for p in group["params"]}
        self.model = model
        self.named = {name: p for name, p in model.named_parameters() if id(p) in optimised}
        if len(self.named) != len(optimised):
            raise ValueError("the optimiser's parameters must all be parameters of the model it was built for")
        self.names = list(self.named)
        self.shapes = [p.shape for p in self.named.values()]
        self.sizes = [p.numel() for p in self.named.values()]

    def values(self) -> dict[str, torch.Tensor]:
        """Detached current values, by name."""
        return {name: p.detach() for name, p in self.named.items()}

    def flat_grad(self) -> torch.Tensor:
        """``param.grad`` of every variable as one vector in :attr:`compute_dtype` (zeros where missing)."""
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(self.compute_dtype)
                          for p in self.named.values()])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector as ``{name: tensor}`` shaped like the parameters, in their dtypes."""
        parts = torch.split(vector, self.sizes)
        return {name: part.view(p.shape).to(p.dtype)
                for (name, p), part in zip(self.named.items(), parts, strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """``{name: tensor}`` as one vector (in ``dtype`` if given)."""
        return torch.cat([tensors[name].reshape(-1).to(dtype or tensors[name].dtype) for name in self.names])

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype solves run in: the parameters' own, at least float32 (CPU solvers lack half types)."""
        return torch.promote_types(next(iter(self.named.values())).dtype, torch.float32)

    def write_grad(self, vector: torch.Tensor) -> None:
        """Set ``param.grad`` of every variable from a flat vector."""
        for p, part in zip(self.named.values(), torch.split(vector, self.sizes), strict=True):
            p.grad = part.view(p.shape).to(p.dtype, copy=True)

    def add_(self, vector: torch.Tensor) -> None:
        """``θ += vector`` in place."""
        torch._foreach_add_(list(self.named.values()), list(self.unflatten(vector).values()))

    def output_fn(self, x: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """``params -> model(x)`` with the other parameters and buffers as they are."""
        return lambda params: functional_call(self.model, params, (x,))


def closure_loss(closure):
    """``torch.optim``'s closure contract: re-evaluate the loss with gradients enabled (steps run
    under ``no_grad``); ``None`` when no closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
