"""Loss-landscape slices: the loss along one or two directions through a trained model.

Following Li, Xu, Taylor, Studer & Goldstein (2018, "Visualizing the loss landscape of
neural nets", NeurIPS, arXiv:1712.09913), a random Gaussian direction is *filter
normalised*: each filter (a row of a Linear weight, an output channel of a convolution, a
row of an embedding) is rescaled to the norm of the same filter of the weights, so slices of
networks whose weights differ in scale are comparable. One-dimensional parameters (biases,
normalisation gains) get a zero direction, as in the paper's experiments (``ignore_1d``).
The loss is then evaluated at ``θ + α·d`` (1D) or ``θ + α·d + β·e`` (2D) on a fixed data
subset, and linear interpolation ``(1 - α)·θ₀ + α·θ₁`` between two models (e.g. the
initialisation and the trained weights, Goodfellow, Vinyals & Saxe 2015, arXiv:1412.6544)
is the same computation with direction ``θ₁ - θ₀``.

We write our own because the one library for this (``loss-landscapes``) has had no release
since 2019 and predates filter normalisation of embeddings and current torch. Points are set
with ``torch._foreach_*`` operations (one call per coordinate for all parameters) and the
loss comes from ribbed's own :func:`ribbed.train.evaluate`; the weights are restored after.

Example:
    >>> import torch
    >>> from ribbed.data import Split
    >>> model = torch.nn.Linear(4, 3)
    >>> data = Split(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> d = filter_normalized_direction(model, generator=torch.Generator().manual_seed(0))
    >>> curve = slice_1d(model, data, d, torch.linspace(-1, 1, 5), task="classification")
    >>> curve.loss.shape
    torch.Size([5])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ribbed.data import Split
from ribbed.train import Precision, evaluate

__all__ = [
    "Direction",
    "Slice1D",
    "Slice2D",
    "filter_normalized_direction",
    "interpolation",
    "model_difference",
    "slice_1d",
    "slice_2d",
    "surface",
]

Direction = list[torch.Tensor]


@dataclass
class Slice1D:
    """Loss and accuracy at coordinates ``alphas`` along one direction."""

    alphas: torch.Tensor
    loss: torch.Tensor
    acc: torch.Tensor

    def as_dict(self) -> dict[str, list[float]]:
        return {"alphas": self.alphas.tolist(), "loss": self.loss.tolist(), "acc": self.acc.tolist()}


@dataclass
class Slice2D:
    """Loss and accuracy on the grid ``alphas × betas`` (``loss[i, j]`` at ``alphas[i], betas[j]``)."""

    alphas: torch.Tensor
    betas: torch.Tensor
    loss: torch.Tensor
    acc: torch.Tensor

    def as_dict(self) -> dict[str, list]:
        return {"alphas": self.alphas.tolist(), "betas": self.betas.tolist(),
                "loss": self.loss.tolist(), "acc": self.acc.tolist()}


def _parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def filter_normalized_direction(
    model: nn.Module, *, generator: torch.Generator, ignore_1d: bool = True
) -> Direction:
    """A random direction with each filter rescaled to the norm of the model's filter.

    Args:
        model: the model whose weights set the scale.
        generator: draws the Gaussian direction (CPU generator; the result is moved to the
            parameters' device).
        ignore_1d: zero direction for 1-D parameters (biases, norm gains); otherwise each is
            one filter, rescaled to its own norm.

    Returns:
        One tensor per trainable parameter, in ``model.parameters()`` order.
    """
    direction = []
    for param in _parameters(model):
        weights = param.detach()
        if weights.dim() <= 1 and ignore_1d:
            direction.append(torch.zeros_like(weights))
            continue
        noise = torch.randn(weights.shape, generator=generator, dtype=weights.dtype).to(weights.device)
        rows_w, rows_d = weights.reshape(len(weights), -1), noise.reshape(len(noise), -1)
        if weights.dim() <= 1:
            rows_w, rows_d = rows_w.reshape(1, -1), rows_d.reshape(1, -1)
        scale = rows_w.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        direction.append((rows_d * scale).reshape(weights.shape))
    return direction


def model_difference(start: nn.Module, end: nn.Module) -> Direction:
    """``θ_end - θ_start`` per trainable parameter (the models must have the same shapes)."""
    return list(torch._foreach_sub([p.detach() for p in _parameters(end)],
                                   [p.detach() for p in _parameters(start)]))


def surface(
    model: nn.Module,
    data: Split,
    directions: Sequence[Direction],
    coordinates: torch.Tensor,
    *,
    task: str,
    batch_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and accuracy at ``θ + Σ_k c_k·d_k`` for each row ``c`` of ``coordinates [G, K]``.

    ``θ`` is the model's current weights; they are restored afterwards, also on error.
    """
    if coordinates.dim() != 2 or coordinates.shape[1] != len(directions):
        raise ValueError(
            f"coordinates: got shape {tuple(coordinates.shape)}; allowed: [points, {len(directions)}] "
            "(one column per direction)"
        )
    params = _parameters(model)
    device = params[0].device
    base = [p.detach().clone() for p in params]
    precision = Precision("fp32", device.type)
    losses, accs = [], []
    try:
        with torch.no_grad():
            for point in coordinates.tolist():
                torch._foreach_copy_(params, base)
                for coefficient, direction in zip(point, directions, strict=True):
                    torch._foreach_add_(params, direction, alpha=coefficient)
                result = evaluate(model, data, task=task, batch_size=batch_size,
                                  precision=precision, device=device)
                losses.append(result["loss"])
                accs.append(result["acc"])
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, base)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(accs, dtype=torch.float64)


def slice_1d(model: nn.Module, data: Split, direction: Direction, alphas: torch.Tensor, *,
             task: str, batch_size: int = 1024) -> Slice1D:
    """The loss along ``θ + α·direction`` for each ``α`` in ``alphas``."""
    loss, acc = surface(model, data, [direction], alphas.reshape(-1, 1).double(), task=task,
                        batch_size=batch_size)
    return Slice1D(alphas, loss, acc)


def slice_2d(model: nn.Module, data: Split, directions: tuple[Direction, Direction],
             alphas: torch.Tensor, betas: torch.Tensor, *, task: str, batch_size: int = 1024) -> Slice2D:
    """The loss on the grid ``θ + α·d + β·e`` for ``α`` in ``alphas``, ``β`` in ``betas``."""
    grid = torch.cartesian_prod(alphas.double(), betas.double())
    loss, acc = surface(model, data, list(directions), grid, task=task, batch_size=batch_size)
    shape = (len(alphas), len(betas))
    return Slice2D(alphas, betas, loss.reshape(shape), acc.reshape(shape))


def interpolation(start: nn.Module, end: nn.Module, data: Split, alphas: torch.Tensor, *,
                  task: str, batch_size: int = 1024) -> Slice1D:
    """The loss of ``(1 - α)·θ_start + α·θ_end``: 0 is ``start``, 1 is ``end``.

    Evaluated by moving ``start`` along ``θ_end - θ_start`` (``start`` is restored after).
    """
    return slice_1d(start, data, model_difference(start, end), alphas, task=task, batch_size=batch_size)
