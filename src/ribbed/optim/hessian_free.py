"""Hessian-free optimisation: conjugate gradient on Gauss-Newton-vector products.

Martens 2010 ("Deep learning via Hessian-free optimization", ICML) minimises, each step, the
damped quadratic model of the loss around ``θ``

    q(d) = gᵀd + ½ dᵀ(G + λI)d,     G = (1/N) Σ_i J_iᵀ H_i J_i,

with ``G`` the generalised Gauss-Newton matrix (``J_i`` the Jacobian of the outputs,
``H_i`` the Hessian of the loss in the outputs), which is positive semi-definite where the
Hessian is not. ``G`` is never formed: ``Gv`` is a forward-mode product ``Jv``
(``torch.func.jvp``), the loss Hessian in the outputs applied to it, and a reverse-mode
product ``Jᵀu`` (``torch.func.vjp``). Conjugate gradient solves ``(G + λI)d = -g``:

* warm start from ``warm_start`` times the previous step's solution;
* Martens' stopping rule: stop at iteration ``i > k = max(10, 0.1 i)`` once the model's
  relative progress over the last ``k`` iterations falls below ``k * cg_tol``;
* CG backtracking: iterates at ``ceil(1.3^j)`` are kept and, starting from the last, the
  earliest whose batch loss is no better than a later one's is dropped (§4.6);
* Levenberg-Marquardt damping: ``ρ = (f(θ+d) - f(θ)) / q(d)``; ``λ`` grows by 3/2 when
  ``ρ < 1/4`` and shrinks by 2/3 when ``ρ > 3/4``;
* an Armijo backtracking line search on the step length, starting at ``lr`` (Martens &
  Sutskever 2012, "Training deep and recurrent networks with Hessian-free optimization").

Everything is evaluated on the step's batch (the ``keep-batch`` gradient method records it;
see :mod:`ribbed.optim.batches`); the gradient is ``param.grad`` as the training loop left it.
Dropout makes repeated evaluations differ; train deterministic models with it.

Why our own: no maintained PyTorch package offers Hessian-free with these pieces; the
curvature products are ``torch.func`` calls, so what is written here is CG and its controls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.func import grad, jvp, vjp

from ribbed.optim.batches import expect_batches, forget_batches, recorded_batches
from ribbed.optim.functional import FlatParameters, closure_loss, join_batches
from ribbed.optim.registry import OptimizerError, register_optimizer

__all__ = ["CGResult", "HessianFree", "conjugate_gradient", "gauss_newton_product"]

MatVec = Callable[[torch.Tensor], torch.Tensor]
# torch.func types vjp's and jvp's results as a pair or, with has_aux, a triple; these calls take no aux
_VJP = tuple[Any, Callable[..., Any]]
_JVP = tuple[Any, Any]


def gauss_newton_product(flat: FlatParameters, x: torch.Tensor, y: torch.Tensor,
                         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> MatVec:
    """``v -> Gv`` for the Gauss-Newton matrix of ``loss_fn(model(x), y)`` in the flat parameters."""
    params = flat.values()
    output = flat.output_fn(x)

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return loss_fn(out, y)

    with torch.enable_grad():
        z, pullback = cast(_VJP, vjp(output, params))
        # H u as a reverse-over-reverse product (H is symmetric); forward-over-reverse through
        # F.mse_loss fails in torch 2.13 ("ZeroTensors are immutable").
        _, loss_hessian = cast(_VJP, vjp(grad(loss_of), z.detach()))

    def product(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            _, jv = cast(_JVP, jvp(output, (params,), (flat.unflatten(v),)))
            (hjv,) = loss_hessian(jv)
            (jthjv,) = pullback(hjv)
        return flat.flatten(jthjv, v.dtype)

    return product


@dataclass
class CGResult:
    """The CG solution, the iterates kept for backtracking (oldest first), and the iteration count."""

    solution: torch.Tensor
    iterates: list[torch.Tensor]
    iterations: int


def conjugate_gradient(
    matvec: MatVec, b: torch.Tensor, x0: torch.Tensor | None = None, *,
    max_iters: int = 50, tol: float = 5e-4, keep_ratio: float = 1.3,
) -> CGResult:
    """Solve ``A x = b`` (``A`` symmetric positive definite, given as ``matvec``) by CG.

    Stops after ``max_iters``, on Martens' relative-progress rule with ``tol``, or when the
    residual is below ``1e-10 ||b||``. Iterates at ``ceil(keep_ratio^j)`` and the last are kept.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = r @ r
    objective = [float(-0.5 * x @ (b + r))]
    keep_at = {math.ceil(keep_ratio ** j) for j in range(int(math.log(max(max_iters, 2), keep_ratio)) + 2)}
    iterates: list[torch.Tensor] = []
    threshold = 1e-10 * b.norm()
    i = 0
    for i in range(1, max_iters + 1):
        ap = matvec(p)
        curvature = p @ ap
        if curvature <= 0:
            i -= 1
            break
        alpha = rr / curvature
        x.add_(p, alpha=float(alpha))
        r.sub_(ap, alpha=float(alpha))
        rr_new = r @ r
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
        objective.append(float(-0.5 * x @ (b + r)))
        if i in keep_at:
            iterates.append(x.clone())
        k = max(10, math.ceil(0.1 * i))
        if rr.sqrt() <= threshold:
            break
        if i > k and objective[i] < 0 and (objective[i] - objective[i - k]) / objective[i] < k * tol:
            break
    if not iterates or i not in keep_at:
        iterates.append(x.clone())
    return CGResult(x, iterates, i)


class HessianFree(torch.optim.Optimizer):
    """Hessian-free (truncated Gauss-Newton) optimiser for ``model``.

    Args:
        model: the network (evaluated with ``torch.func`` on the step's batch).
        lr: initial step length of the line search (1 is the Gauss-Newton step).
        damping: initial Levenberg-Marquardt ``λ``.
        cg_max_iters: conjugate-gradient iterations per step at most.
        cg_tol: Martens' relative-progress tolerance.
        warm_start: CG starts from this times the previous solution (0: from zero).
        adapt_damping: adjust ``λ`` by the reduction ratio.
        backtrack: choose among kept CG iterates by the batch loss.
        line_search: Armijo backtracking of the step length.

    Example:
        >>> from ribbed.optim import record_batch
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = HessianFree(model)
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> loss_fn = torch.nn.functional.mse_loss
        >>> opt.zero_grad(); loss_fn(model(x), y).backward(); record_batch(model, x, y, loss_fn); opt.step()
    """

    needs_batch = True  # evaluates the loss on the step's batch: train with keep-batch

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        damping: float = 1.0,
        cg_max_iters: int = 50,
        cg_tol: float = 5e-4,
        warm_start: float = 0.95,
        adapt_damping: bool = True,
        backtrack: bool = True,
        line_search: bool = True,
    ):
        for name, value, valid, allowed in (
            ("lr", lr, lr > 0, "> 0"),
            ("damping", damping, damping > 0, "> 0"),
            ("cg_max_iters", cg_max_iters, isinstance(cg_max_iters, int) and cg_max_iters >= 1, "an integer >= 1"),
            ("cg_tol", cg_tol, cg_tol >= 0, ">= 0"),
            ("warm_start", warm_start, 0 <= warm_start <= 1, "in [0, 1]"),
        ):
            if not valid:
                raise OptimizerError(f"optimizer.options.{name}: got {value!r}; allowed: {allowed}")
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": lr, "damping": damping, "cg_max_iters": cg_max_iters, "cg_tol": cg_tol,
                                  "warm_start": warm_start, "adapt_damping": adapt_damping,
                                  "backtrack": backtrack, "line_search": line_search})
        self.model = model
        self.flat = FlatParameters(model, self.param_groups)
        self.last_iterations = 0
        expect_batches(model)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        forget_batches(self.model)

    def telemetry(self) -> dict[str, float]:
        """The current damping and the last step's CG iterations (joins the loop's metric rows)."""
        return {"hf_damping": float(self.param_groups[0]["damping"]), "hf_cg_iterations": float(self.last_iterations)}

    def _loss_at(self, batch, step: torch.Tensor | None) -> float:
        params = self.flat.values()
        if step is not None:
            params = {n: p + d for (n, p), d in zip(params.items(), self.flat.unflatten(step).values(), strict=True)}
        return float(batch.loss_fn(self.flat.output_fn(batch.x)(params), batch.y))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        group = self.param_groups[0]
        batch = join_batches(recorded_batches(self.model, "optimizer 'hessian_free'"))
        g = self.flat.flat_grad()
        damping = group["damping"]
        gn = gauss_newton_product(self.flat, batch.x, batch.y, batch.loss_fn)

        def damped(v):
            return gn(v) + damping * v

        previous = [self.state[p].get("direction") for p in self.flat.named.values()]
        x0 = None
        if group["warm_start"] > 0 and all(d is not None for d in previous):
            x0 = group["warm_start"] * torch.cat([d.reshape(-1) for d in previous])
        result = conjugate_gradient(damped, -g, x0, max_iters=group["cg_max_iters"], tol=group["cg_tol"])
        self.last_iterations = result.iterations
        f0 = self._loss_at(batch, None)
        direction, f_new = self._choose_iterate(batch, result, group["backtrack"])
        if group["adapt_damping"]:
            predicted = float(g @ direction + 0.5 * direction @ damped(direction))
            rho = (f_new - f0) / predicted if predicted < 0 else -math.inf
            if rho < 0.25:
                group["damping"] = damping * 1.5
            elif rho > 0.75:
                group["damping"] = damping * 2 / 3
        for p, d in zip(self.flat.named.values(), torch.split(direction, self.flat.sizes), strict=True):
            self.state[p]["direction"] = d.view(p.shape).clone()
        self.flat.add_(self._step_length(batch, direction, g, f0, f_new, group) * direction)
        forget_batches(self.model)
        return loss

    def _choose_iterate(self, batch, result: CGResult, backtrack: bool) -> tuple[torch.Tensor, float]:
        """The last CG iterate, or (backtracking) the earliest kept one no later one improves on."""
        chosen = result.iterates[-1]
        best = self._loss_at(batch, chosen)
        if backtrack:
            for candidate in reversed(result.iterates[:-1]):
                value = self._loss_at(batch, candidate)
                if value >= best:
                    break
                chosen, best = candidate, value
        return chosen, best

    def _step_length(self, batch, direction, g, f0: float, f_new: float, group: dict) -> float:
        """Armijo backtracking from ``lr``: the largest ``lr * 0.8^j`` with sufficient decrease, else 0."""
        rate = group["lr"]
        if not group["line_search"]:
            return rate
        slope = float(g @ direction)
        value = f_new if rate == 1.0 else self._loss_at(batch, rate * direction)
        for _ in range(60):
            if value <= f0 + 1e-2 * rate * slope:
                return rate
            rate *= 0.8
            value = self._loss_at(batch, rate * direction)
        return 0.0


@register_optimizer("hessian_free", "Hessian-free: CG on Gauss-Newton products with LM damping and CG backtracking "
                                    "(Martens 2010); needs train.gradient_method keep-batch",
                    signature_of=HessianFree)
def build_hessian_free(model: nn.Module, lr: float, **options) -> HessianFree:
    """:class:`HessianFree` for ``model`` (the options are its keyword arguments)."""
    return HessianFree(model, lr=lr, **options)
