"""Natural gradient with the mini-batch Fisher, for small networks.

Amari 1998 ("Natural Gradient Works Efficiently in Learning", Neural Computation 10(2))
steps along ``(F + λI)⁻¹ g``, where ``F`` is the Fisher information of the model's predictive
distribution. Here ``F`` is estimated on the step's batch and never approximated further
(contrast K-FAC): ``F = UᵀU / m`` with one row of ``U`` per per-sample gradient, and

    (F + λI)⁻¹ g = (g - Uᵀ (mλI + UUᵀ)⁻¹ U g) / λ

(the Woodbury identity), a solve the size of the batch rather than of the network, or the
direct ``P × P`` solve when that is smaller. Three estimates of ``F``
(Kunstner, Balles & Hennig 2019, "Limitations of the empirical Fisher approximation",
arXiv:1905.12558, explain why the first is not the Fisher):

* ``empirical``: per-sample gradients of the loss at the true targets (``m = N``);
* ``sampled``: per-sample gradients at targets drawn from the model, ``samples`` draws per
  input (``m = N * samples``); ``likelihood`` says how to draw: ``categorical`` for
  cross-entropy, ``gaussian`` for the unit-variance loss ``0.5 Σ (z - y)²``;
* ``exact``: the expectation over the model's predictive distribution in closed form,
  ``F = (1/N) Σ_i J_iᵀ H_i J_i`` with ``H_i`` the Hessian of the per-sample loss in the outputs
  (the generalised Gauss-Newton matrix; Martens 2020, "New insights and perspectives on the
  natural gradient method", JMLR 21). Rows are ``L_iᵀ J_i`` with ``H_i = L_i L_iᵀ``, so it costs
  one row per output: small nets only.

Per-sample gradients come from ``torch.func`` (``vmap`` over ``grad`` or ``jacrev`` of a
``functional_call``). The preconditioned gradient replaces ``param.grad`` and the base
optimiser (SGD by default) steps. Models with batch normalisation are not supported (a
per-sample forward pass has no batch statistics). The step needs its batch: use the
``keep-batch`` gradient method (see :mod:`ribbed.optim.batches`).

Why our own: ``nngeometry`` and ``backpack`` compute Fishers but require torchvision (and so
another torch build); the whole method is a few ``torch.func`` calls and one solve.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torch.func import grad, hessian, jacrev, vmap

from ribbed.optim.batches import expect_batches, forget_batches, recorded_batches
from ribbed.optim.functional import FlatParameters, closure_loss, join_batches
from ribbed.optim.registry import OptimizerError, register_optimizer
from ribbed.optim.wrapper import WrappedOptimizer, build_base, step_inner

__all__ = ["NaturalGradient", "damped_inverse_product", "fisher_rows"]

FISHERS = ("empirical", "sampled", "exact")
LIKELIHOODS = ("categorical", "gaussian")


def damped_inverse_product(rows: torch.Tensor, m: float, g: torch.Tensor, damping: float) -> torch.Tensor:
    """``(UᵀU/m + λI)⁻¹ g`` for ``U = rows`` (``[R, P]``), by the smaller of the two solves."""
    r, p = rows.shape
    if r < p:
        inner = rows @ rows.T
        inner.diagonal().add_(m * damping)
        coefficients = torch.linalg.solve(inner, rows @ g)
        return (g - rows.T @ coefficients) / damping
    fisher = rows.T @ rows / m
    fisher.diagonal().add_(damping)
    return torch.linalg.solve(fisher, g)


def _sample_targets(z: torch.Tensor, likelihood: str, samples: int) -> torch.Tensor:
    """``samples`` targets per input drawn from the model's predictive distribution, ``[S, N, ...]``."""
    if likelihood == "categorical":
        return torch.distributions.Categorical(logits=z.float()).sample((samples,))
    return z + torch.randn((samples, *z.shape), dtype=z.dtype, device=z.device)


def fisher_rows(
    flat: FlatParameters, x: torch.Tensor, y: torch.Tensor, loss_fn, *,
    fisher: str, likelihood: str = "categorical", samples: int = 1,
) -> tuple[torch.Tensor, int]:
    """Rows ``U`` and divisor ``m`` with ``F = UᵀU / m`` for the batch ``(x, y)``.

    See the module docstring for the three estimates.
    """
    params = flat.values()

    def output(p, xi):
        return flat.output_fn(xi.unsqueeze(0))(p)

    def sample_loss(p, xi, ti):
        return loss_fn(output(p, xi), ti.unsqueeze(0))

    with torch.enable_grad():
        if fisher == "exact":
            z = torch.func.functional_call(flat.model, params, (x,)).detach()
            hessians = vmap(hessian(lambda zi, yi: loss_fn(zi.unsqueeze(0), yi.unsqueeze(0))))(z, y)
            k = z[0].numel()
            eigenvalues, eigenvectors = torch.linalg.eigh(hessians.reshape(len(z), k, k).to(flat.compute_dtype))
            roots = (eigenvectors * eigenvalues.clamp(min=0).sqrt().unsqueeze(1)).to(z.dtype)

            def projected(p, xi, root):
                return root.T @ output(p, xi).reshape(-1)

            jac = vmap(jacrev(projected), in_dims=(None, 0, 0), randomness="different")(params, x, roots)
            return torch.cat([jac[n].reshape(len(x) * k, -1).to(flat.compute_dtype) for n in flat.names], dim=1), len(x)
        if fisher == "empirical":
            targets, repeats = y.unsqueeze(0), 1
        else:
            z = torch.func.functional_call(flat.model, params, (x,)).detach()
            targets, repeats = _sample_targets(z, likelihood, samples), samples
        inputs = x.expand(repeats, *x.shape).reshape(-1, *x.shape[1:])
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")(
            params, inputs, targets.reshape(-1, *targets.shape[2:])
        )
        return (torch.cat([grads[n].reshape(len(inputs), -1).to(flat.compute_dtype) for n in flat.names], dim=1),
                len(inputs))


class NaturalGradient(WrappedOptimizer):
    """Precondition gradients by the damped mini-batch Fisher, then let ``base`` step.

    Args:
        model: the network (evaluated per sample with ``torch.func``).
        base: the optimiser that steps with the natural gradient.
        fisher: ``"empirical"``, ``"sampled"`` or ``"exact"`` (see the module docstring).
        likelihood: ``"categorical"`` or ``"gaussian"``: how ``sampled`` draws targets.
        samples: target draws per input for ``sampled``.
        damping: ``λ`` in ``(F + λI)⁻¹ g``.

    Example:
        >>> from ribbed.optim import record_batch
        >>> model = nn.Linear(3, 2)
        >>> opt = NaturalGradient(model, torch.optim.SGD(model.parameters(), lr=0.5),
        ...                       likelihood="gaussian", fisher="exact")
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> loss_fn = lambda z, t: 0.5 * (z - t).square().sum(-1).mean()
        >>> loss_fn(model(x), y).backward(); record_batch(model, x, y, loss_fn); opt.step()
    """

    state_key = "natural_gradient"

    needs_batch = True  # evaluates the loss on the step's batch: train with keep-batch

    def __init__(
        self,
        model: nn.Module,
        base: torch.optim.Optimizer,
        *,
        fisher: Literal["empirical", "sampled", "exact"] = "empirical",
        likelihood: Literal["categorical", "gaussian"] = "categorical",
        samples: int = 1,
        damping: float = 1e-3,
    ):
        if fisher not in FISHERS:
            raise OptimizerError(f"optimizer.options.fisher: got {fisher!r}; allowed: {', '.join(FISHERS)}")
        if likelihood not in LIKELIHOODS:
            raise OptimizerError(f"optimizer.options.likelihood: got {likelihood!r}; allowed: {', '.join(LIKELIHOODS)}")
        if not (isinstance(samples, int) and samples >= 1):
            raise OptimizerError(f"optimizer.options.samples: got {samples!r}; allowed: an integer >= 1")
        if not damping > 0:
            raise OptimizerError(f"optimizer.options.damping: got {damping!r}; allowed: > 0")
        super().__init__(base, {"damping": damping})
        self.model, self.fisher, self.likelihood, self.samples = model, fisher, likelihood, samples
        self.flat = FlatParameters(model, self.param_groups)
        expect_batches(model)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        forget_batches(self.model)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        batch = join_batches(recorded_batches(self.model, "optimizer 'natural_gradient'"))
        rows, m = fisher_rows(self.flat, batch.x, batch.y, batch.loss_fn, fisher=self.fisher,
                              likelihood=self.likelihood, samples=self.samples)
        g = self.flat.flat_grad()
        self.flat.write_grad(damped_inverse_product(rows, m, g, self.param_groups[0]["damping"]))
        step_inner(self.base)
        forget_batches(self.model)
        return loss


@register_optimizer("natural_gradient", "natural gradient with the damped mini-batch Fisher "
                                        "(empirical, sampled or exact), small nets (Amari 1998)")
def build_natural_gradient(
    model: nn.Module,
    lr: float,
    base: str = "sgd",
    base_options: dict[str, Any] | None = None,
    fisher: Literal["empirical", "sampled", "exact"] = "empirical",
    likelihood: Literal["categorical", "gaussian"] = "categorical",
    samples: int = 1,
    damping: float = 1e-3,
) -> NaturalGradient:
    """:class:`NaturalGradient` over the registered optimiser ``base`` (SGD by default)."""
    return NaturalGradient(model, build_base(model, lr, base, base_options), fisher=fisher,
                           likelihood=likelihood, samples=samples, damping=damping)
