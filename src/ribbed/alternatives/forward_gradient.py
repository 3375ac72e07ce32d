"""Forward gradients: gradient estimates from forward-mode directional derivatives.

Baydin et al. 2022 ("Gradients without Backpropagation", arXiv:2202.08587): for a tangent
``v ~ N(0, I)`` over all parameters, one forward-mode pass gives the directional derivative
``∇L·v`` alongside the loss, and ``(∇L·v) v`` is an unbiased estimate of ``∇L`` (because
``E[v vᵀ] = I``). No backward pass and no stored activations are needed. Its variance
grows with the number of parameters, so averaging over ``K`` tangents,
``ĝ = (1/K) Σ_k (∇L·v_k) v_k``, is the knob that trades compute for accuracy.

Built on PyTorch's own forward mode: ``torch.func.jvp`` of the loss as a function of a
flat parameter vector (``torch.func.functional_call``), vectorised over the ``K`` tangents
with ``torch.func.vmap``, so one call does all tangents and the estimate is one matrix
product ``d @ V / K`` over the flat vector.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from ribbed.alternatives.common import add_to_grads, backward_scale, check_positive_int
from ribbed.nn.auxiliary import pop_aux_loss
from ribbed.train import register_gradient_method

__all__ = ["ForwardGradient", "forward_gradient"]


def forward_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, tangents: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss and the forward-gradient estimate ``(1/K) Σ_k (∇L·v_k) v_k`` per parameter.

    Args:
        model: the model; its parameters that require grad are differentiated.
        x, y: one batch.
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        tangents: ``K``, the number of random directions averaged.
        generator: source of the Gaussian tangents (the global RNG when None).

    Returns:
        ``(loss, estimates)`` with one estimate per parameter, in ``model.parameters()`` order.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    flat = torch.cat([p.detach().flatten() for p in params.values()])
    directions = torch.randn(tangents, flat.numel(), generator=generator, device=flat.device,
                             dtype=flat.dtype)

    def unflatten(vector: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view(shape) for chunk, shape in zip(vector.split(sizes), shapes, strict=True)]

    def loss_of(vector: torch.Tensor) -> torch.Tensor:
        output = functional_call(model, dict(zip(params, unflatten(vector), strict=True)), (x,))
        loss = loss_fn(output, y)
        aux = pop_aux_loss(model)
        return loss if aux is None else loss + aux

    # jvp without has_aux returns two values; torch annotates both arities as one union
    losses, derivatives = vmap(lambda v: jvp(loss_of, (flat,), (v,)), randomness="same")(directions)  # type: ignore[misc]
    return losses[0].detach(), unflatten(derivatives @ directions / tangents)


@register_gradient_method(
    "forward-gradient",
    "forward-mode directional derivatives along random tangents, no backward pass (Baydin et al. 2022)",
)
class ForwardGradient:
    """``param.grad += (1/K) Σ_k (∇L·v_k) v_k`` from ``K`` forward-mode passes (one vmapped call).

    Args:
        tangents: ``K``, the number of Gaussian tangents per step (Baydin et al. use 1).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> model = torch.nn.Linear(4, 3)
        >>> loss, estimate = forward_gradient(model, torch.randn(8, 4), torch.zeros(8, dtype=torch.long),
        ...                                   F.cross_entropy, tangents=16)
        >>> [e.shape for e in estimate]
        [torch.Size([3, 4]), torch.Size([3])]
    """

    def __init__(self, tangents: int = 1):
        self.tangents = check_positive_int("tangents", tangents, "forward-gradient")

    def attach(self, model: nn.Module) -> None:
        return None

    def accumulate(self, model, x, y, loss_fn, precision, loss_scale):
        with precision.autocast():
            loss, estimates = forward_gradient(model, x, y, loss_fn, self.tangents)
        params = [p for p in model.parameters() if p.requires_grad]
        add_to_grads(params, estimates, backward_scale(precision, loss_scale))
        return loss
