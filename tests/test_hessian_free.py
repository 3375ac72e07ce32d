"""Hessian-free against direct linear algebra in float64: the Gauss-Newton product, the CG
solution, and a whole step, on a tiny network; plus its damping and batch contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from ribbed.optim import HessianFree, conjugate_gradient, gauss_newton_product, record_batch
from ribbed.optim.functional import FlatParameters


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def tiny_problem():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(7, 3), torch.randint(0, 3, (7,))
    return model, x, y


def explicit_gauss_newton(model, x, y) -> torch.Tensor:
    """``G = J^T H J`` with ``J`` the full output Jacobian and ``H`` the loss Hessian in the outputs."""
    flat = FlatParameters(model, [{"params": list(model.parameters())}])
    params = flat.values()
    outputs = functional_call(model, params, (x,))
    jacobian = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    j = torch.cat([jacobian[n].reshape(outputs.numel(), -1) for n in flat.names], dim=1)
    h = hessian(lambda z: F.cross_entropy(z, y))(outputs.detach()).reshape(outputs.numel(), outputs.numel())
    return j.T @ h @ j


def flat_gradient(model, x, y) -> torch.Tensor:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_gauss_newton_product_equals_the_explicit_matrix():
    model, x, y = tiny_problem()
    flat = FlatParameters(model, [{"params": list(model.parameters())}])
    product = gauss_newton_product(flat, x, y, F.cross_entropy)
    matrix = explicit_gauss_newton(model, x, y)
    v = torch.randn(matrix.shape[0])
    torch.testing.assert_close(product(v), matrix @ v, rtol=1e-10, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert eigenvalues.min() > -1e-10, "the Gauss-Newton matrix must be positive semi-definite"


def test_cg_solution_matches_the_direct_solve_of_the_damped_system():
    model, x, y = tiny_problem()
    damping = 0.1
    system = explicit_gauss_newton(model, x, y) + damping * torch.eye(sum(p.numel() for p in model.parameters()))
    g = flat_gradient(model, x, y)
    result = conjugate_gradient(lambda v: system @ v, -g, max_iters=4 * len(g), tol=0.0)
    torch.testing.assert_close(result.solution, torch.linalg.solve(system, -g), rtol=1e-8, atol=1e-10)
    assert result.iterations <= len(g) + 5


def test_cg_keeps_iterates_on_the_backtracking_schedule():
    matrix = torch.diag(torch.linspace(1.0, 100.0, 60))
    result = conjugate_gradient(lambda v: matrix @ v, torch.ones(60), max_iters=20, tol=0.0)
    assert result.iterations == 20 and len(result.iterates) == len({1, 2, 3, 4, 5, 7, 9, 11, 14, 18, 20})
    torch.testing.assert_close(result.iterates[-1], result.solution)


def test_a_step_moves_by_the_direct_solution():
    """With warm start, backtracking, line search and damping adaptation off, one step is
    ``θ - (G + λI)⁻¹ g`` exactly."""
    model, x, y = tiny_problem()
    damping = 0.5
    n = sum(p.numel() for p in model.parameters())
    expected_step = torch.linalg.solve(explicit_gauss_newton(model, x, y) + damping * torch.eye(n),
                                       -flat_gradient(model, x, y))
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    optimizer = HessianFree(model, damping=damping, cg_max_iters=4 * n, cg_tol=0.0, warm_start=0.0,
                            adapt_damping=False, backtrack=False, line_search=False)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    record_batch(model, x, y, F.cross_entropy)
    optimizer.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after - before, expected_step, rtol=1e-7, atol=1e-9)


def _step(model, optimizer, x, y, loss_fn):
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    record_batch(model, x, y, loss_fn)
    optimizer.step()
    return loss.item()


def test_damping_shrinks_where_the_quadratic_model_is_exact():
    """For a linear model and squared error the Gauss-Newton model is the loss itself, so the
    reduction ratio is near 1 and Levenberg-Marquardt lowers the damping by 2/3."""
    model = nn.Linear(3, 2)
    x, y = torch.randn(20, 3), torch.randn(20, 2)
    optimizer = HessianFree(model, damping=1.0)
    _step(model, optimizer, x, y, F.mse_loss)
    assert optimizer.param_groups[0]["damping"] == pytest.approx(2 / 3)


class Sine(nn.Module):
    """``sin(w x)``: near ``w x = π/2`` its linearisation is flat, so Gauss-Newton overshoots."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))

    def forward(self, x):
        return torch.sin(self.w * x)


def test_damping_grows_where_the_step_overshoots():
    """Fitting 1.5 with ``sin(w)`` from ``w = 1.5``: the near-zero slope makes the Gauss-Newton
    step jump far (to ``w ≈ 8.6``) where the loss is higher, so ``ρ < 1/4`` and ``λ`` grows by 3/2."""
    model, x, y = Sine(1.5), torch.ones(1, 1), torch.full((1, 1), 1.5)
    optimizer = HessianFree(model, damping=1e-6, backtrack=False, line_search=False)
    before = F.mse_loss(model(x), y).item()
    _step(model, optimizer, x, y, F.mse_loss)
    assert F.mse_loss(model(x), y).item() > before
    assert optimizer.param_groups[0]["damping"] == pytest.approx(1.5e-6)


def test_line_search_refuses_a_step_that_raises_the_loss():
    model, x, y = Sine(1.5), torch.ones(1, 1), torch.full((1, 1), 1.5)
    optimizer = HessianFree(model, damping=1e-6, backtrack=False)
    before = F.mse_loss(model(x), y).item()
    _step(model, optimizer, x, y, F.mse_loss)
    assert F.mse_loss(model(x), y).item() <= before


def test_training_reduces_the_loss_on_a_classification_batch():
    model, x, y = tiny_problem()
    optimizer = HessianFree(model, cg_max_iters=20)
    losses = [_step(model, optimizer, x, y, F.cross_entropy) for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]
    telemetry = optimizer.telemetry()
    assert 1 <= telemetry["hf_cg_iterations"] <= 20
    assert telemetry["hf_damping"] == optimizer.param_groups[0]["damping"] != 1.0


def test_a_step_without_a_recorded_batch_says_how_to_give_one():
    model, x, y = tiny_problem()
    optimizer = HessianFree(model)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="train.gradient_method: keep-batch"):
        optimizer.step()


def test_bad_options_name_the_field_value_and_rule():
    with pytest.raises(ValueError, match=r"optimizer.options.warm_start: got 2; allowed: in \[0, 1\]"):
        HessianFree(nn.Linear(2, 2), warm_start=2)
