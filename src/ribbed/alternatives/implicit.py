"""Implicit differentiation through a deep-equilibrium (fixed-point) layer.

A deep equilibrium layer (Bai et al. 2019, "Deep Equilibrium Models", NeurIPS,
arXiv:1909.01377) outputs the fixed point ``z* = f(z*, x)`` of a cell ``f`` instead of a
stack of layers. Backprop through the solver's iterations ("unrolled") costs memory in the
number of iterations. The implicit function theorem gives the gradient from the fixed
point alone: with ``J = ∂f/∂z`` at ``z*``, ``dL/dθ = g ∂f/∂θ`` where ``g`` solves
``g = gJ + dL/dz*``, a linear system solved by the same fixed-point machinery using
vector-Jacobian products (the pattern of Kolter, Duvenaud and Johnson's "Deep Implicit
Layers" tutorial, NeurIPS 2020, chapter 4). Memory is then constant in the iterations.

Our cell is ``f(z, x) = tanh(γ Ŵ z + U x + b)`` with ``Ŵ`` spectrally normalised
(``torch.nn.utils.parametrizations.spectral_norm``) and ``γ < 1``, so ``f`` is a
contraction in ``z`` (tanh is 1-Lipschitz): the fixed point exists, is unique, and both the
forward and the backward iterations converge. Solvers: plain fixed-point iteration (the
default: at the small widths we train, it converges in under ten steps and costs least) or
Anderson acceleration (Walker & Ni 2011, "Anderson acceleration for fixed-point
iterations", SIAM J. Numer. Anal. 49(4)), which pays off when convergence is slow.

Model ``deq`` trains by plain backprop *unrolled* through fixed-point iterations; gradient
method ``implicit`` switches its layers to the implicit backward. Why our own: torchdeq,
the one PyTorch DEQ library, has had a single release (0.1.0, 2023), and the comparison
needs both backward modes of one layer; the solvers are a few lines each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ribbed.alternatives.common import check_choice, check_positive_int, check_positive_number
from ribbed.nn.checkpointing import run_blocks
from ribbed.nn.registry import check_option, is_positive_int, register_model
from ribbed.train import Backprop, register_gradient_method

__all__ = ["DEQClassifier", "DEQLayer", "ImplicitDifferentiation", "SOLVERS", "anderson",
           "fixed_point_iteration"]

Map = Callable[[torch.Tensor], torch.Tensor]


def _relative_residual(value: torch.Tensor, image: torch.Tensor) -> float:
    return ((image - value).norm() / (image.norm() + 1e-9)).item()


def fixed_point_iteration(f: Map, z0: torch.Tensor, *, tol: float, max_iter: int) -> torch.Tensor:
    """Iterate ``z ← f(z)`` until ``‖f(z) - z‖ / ‖f(z)‖ < tol`` or ``max_iter`` steps.

    Differentiable when run with grad enabled (backprop then unrolls the iterations).
    """
    z = z0
    for _ in range(max_iter):
        image = f(z)
        converged = _relative_residual(z, image) < tol
        z = image
        if converged:
            break
    return z


def anderson(
    f: Map, z0: torch.Tensor, *, tol: float, max_iter: int, memory: int = 5, ridge: float = 1e-4
) -> torch.Tensor:
    """Anderson acceleration of ``z ← f(z)`` (type II, undamped), batched over the first dim.

    Each step mixes the last ``memory`` images with weights ``α`` that minimise the norm of
    the combined residual subject to ``Σα = 1`` (a small ridge-regularised linear solve per
    example). Run under ``torch.no_grad``; the result is not meant to be differentiated.
    """
    batch, shape = len(z0), z0.shape
    flat = lambda z: z.reshape(batch, -1)  # noqa: E731
    iterates = [flat(z0)]
    images = [flat(f(z0))]
    for _ in range(max_iter - 1):
        count = len(iterates)
        residuals = torch.stack(images, 1) - torch.stack(iterates, 1)
        gram = residuals @ residuals.transpose(1, 2)
        gram = gram + ridge * torch.eye(count, dtype=gram.dtype, device=gram.device)
        system = torch.zeros(batch, count + 1, count + 1, dtype=gram.dtype, device=gram.device)
        system[:, 0, 1:] = system[:, 1:, 0] = 1
        system[:, 1:, 1:] = gram
        rhs = torch.zeros(batch, count + 1, 1, dtype=gram.dtype, device=gram.device)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(system, rhs)[:, 1:]
        z = (torch.stack(images, 1) * alpha).sum(1)
        image = flat(f(z.view(shape)))
        iterates, images = [*iterates, z][-memory:], [*images, image][-memory:]
        if _relative_residual(z, image) < tol:
            break
    return images[-1].view(shape)


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {
    "anderson": anderson,
    "fixed-point": fixed_point_iteration,
}


@dataclass(frozen=True)
class ImplicitBackward:
    """Settings of the implicit backward solve."""

    solver: str
    tol: float
    max_iter: int


class DEQLayer(nn.Module):
    """``z* = tanh(γ Ŵ z* + injection)``, solved from ``z = 0``.

    With ``implicit`` unset (the default) and grad enabled, the forward runs differentiable
    fixed-point iterations, so backprop unrolls them. With ``implicit`` set (by the
    ``implicit`` gradient method), the forward solves without a graph, re-attaches one
    application of the cell, and a hook on its output solves ``g = gJ + grad`` in backward.
    Without grad (evaluation) the forward just solves.
    """

    def __init__(self, width: int, contraction: float, solver: str, tol: float, max_iter: int):
        super().__init__()
        self.linear = cast(nn.Linear, spectral_norm(nn.Linear(width, width, bias=False)))  # the Linear, parametrized
        self.contraction, self.solver, self.tol, self.max_iter = contraction, solver, tol, max_iter
        self.implicit: ImplicitBackward | None = None

    def _solve(self, f: Map, z0: torch.Tensor, solver: str, tol: float, max_iter: int) -> torch.Tensor:
        return SOLVERS[solver](f, z0, tol=tol, max_iter=max_iter)

    def forward(self, injection: torch.Tensor) -> torch.Tensor:
        weight = self.contraction * self.linear.weight  # normalised once per forward, with grad

        def f(z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(F.linear(z, weight) + injection)

        z0 = torch.zeros_like(injection)
        if not torch.is_grad_enabled():
            return self._solve(f, z0, self.solver, self.tol, self.max_iter)
        if self.implicit is None:
            return fixed_point_iteration(f, z0, tol=self.tol, max_iter=self.max_iter)
        with torch.no_grad():
            fixed_point = self._solve(f, z0, self.solver, self.tol, self.max_iter)
        z = f(fixed_point)
        anchor = fixed_point.detach().requires_grad_()
        image = f(anchor)
        settings = self.implicit

        def implicit_backward(grad: torch.Tensor) -> torch.Tensor:
            def step(g: torch.Tensor) -> torch.Tensor:
                (vjp,) = torch.autograd.grad(image, anchor, g, retain_graph=True)
                return vjp + grad

            with torch.no_grad():
                return self._solve(step, grad, settings.solver, settings.tol, settings.max_iter)

        z.register_hook(implicit_backward)
        return z


@register_model("deq", "deep equilibrium classifier: one contractive tanh layer solved to its fixed point")
class DEQClassifier(nn.Module):
    """``x → U x + b → z* = tanh(γ Ŵ z* + U x + b) → head``; the DEQ layer is ``blocks[0]``.

    Args:
        input_shape: shape of one example; flattened.
        num_classes: number of output logits.
        width: size of the equilibrium state.
        contraction: ``γ`` in (0, 1), the Lipschitz bound of the cell in ``z``.
        solver: forward solver, ``"fixed-point"`` or ``"anderson"``.
        tol: relative residual at which the forward solve stops.
        max_iter: most forward iterations.
    """

    tasks = ("classification",)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: int = 256,
        contraction: float = 0.9,
        solver: str = "fixed-point",
        tol: float = 1e-4,
        max_iter: int = 40,
    ):
        super().__init__()
        check_option("width", width, is_positive_int(width), "a positive integer")
        check_option("contraction", contraction, isinstance(contraction, int | float)
                     and not isinstance(contraction, bool) and 0 < contraction < 1, "0 < contraction < 1")
        check_option("solver", solver, solver in SOLVERS, str(sorted(SOLVERS)))
        check_option("tol", tol, isinstance(tol, float) and tol > 0, "a positive float")
        check_option("max_iter", max_iter, is_positive_int(max_iter), "a positive integer")
        self.injection = nn.Linear(math.prod(input_shape), width)
        self.blocks = nn.ModuleList([DEQLayer(width, float(contraction), solver, tol, max_iter)])
        self.head = nn.Linear(width, num_classes)
        self.checkpoint_policy = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *input_shape]`` to ``[B, num_classes]`` logits."""
        return self.head(run_blocks(self.blocks, self.injection(x.flatten(1)), self.checkpoint_policy))


@register_gradient_method(
    "implicit",
    "implicit-function-theorem backward through deep-equilibrium layers instead of unrolling; model deq",
)
class ImplicitDifferentiation(Backprop):
    """Backprop, with every :class:`DEQLayer` of the model switched to the implicit backward.

    Args:
        solver: solver of the backward linear system, ``"fixed-point"`` or ``"anderson"``.
        tol: relative residual at which the backward solve stops.
        max_iter: most backward iterations.
    """

    def __init__(self, solver: str = "fixed-point", tol: float = 1e-4, max_iter: int = 40):
        self.settings = ImplicitBackward(
            check_choice("solver", solver, tuple(SOLVERS), "implicit"),
            check_positive_number("tol", tol, "implicit"),
            check_positive_int("max_iter", max_iter, "implicit"),
        )

    def attach(self, model: nn.Module) -> None:
        layers = [m for m in model.modules() if isinstance(m, DEQLayer)]
        if not layers:
            raise ValueError(
                f"train.gradient_method 'implicit' needs a model with deep-equilibrium layers "
                f"(e.g. 'deq'); {type(model).__name__} has none"
            )
        for layer in layers:
            layer.implicit = self.settings
