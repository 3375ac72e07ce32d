"""Implicit differentiation of a deep-equilibrium layer equals unrolled backprop at the fixed point."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ribbed.alternatives import ImplicitDifferentiation
from ribbed.alternatives.implicit import anderson, fixed_point_iteration
from ribbed.nn import build_model


def _gradients(model, x, y) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("solver", ["fixed-point", "anderson"])
def test_the_implicit_gradient_equals_the_unrolled_gradient(solver):
    torch.manual_seed(0)
    model = build_model("deq", input_shape=(12,), num_classes=3, width=16, contraction=0.9,
                        solver=solver, tol=1e-12, max_iter=1000).double()
    model.eval()  # freeze spectral normalisation's power iteration so both passes see one weight
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 3, (8,))
    unrolled = _gradients(model, x, y)
    ImplicitDifferentiation(solver=solver, tol=1e-12, max_iter=1000).attach(model)
    implicit = _gradients(model, x, y)
    for a, b in zip(implicit, unrolled, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert max(g.abs().max() for g in unrolled) > 1e-2, "guard: gradients large enough to compare"


def test_a_truncated_backward_solve_is_visibly_wrong():
    """Guard: the comparison above can fail; two backward iterations are not enough."""
    torch.manual_seed(0)
    model = build_model("deq", input_shape=(12,), num_classes=3, width=16, contraction=0.9,
                        solver="fixed-point", tol=1e-12, max_iter=1000).double().eval()
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 3, (8,))
    unrolled = _gradients(model, x, y)
    ImplicitDifferentiation(solver="fixed-point", tol=1e-12, max_iter=2).attach(model)
    implicit = _gradients(model, x, y)
    assert max((a - b).abs().max() for a, b in zip(implicit, unrolled, strict=True)) > 1e-4


def test_anderson_and_plain_iteration_find_the_same_fixed_point():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(20, 20, generator=generator, dtype=torch.float64)
    weight = 0.95 * weight / torch.linalg.matrix_norm(weight, ord=2)
    bias = torch.randn(5, 20, generator=generator, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ weight.T + bias)

    plain = fixed_point_iteration(f, torch.zeros_like(bias), tol=1e-13, max_iter=2000)
    accelerated = anderson(f, torch.zeros_like(bias), tol=1e-13, max_iter=200)
    torch.testing.assert_close(f(plain), plain, rtol=0, atol=1e-11)
    torch.testing.assert_close(accelerated, plain, rtol=0, atol=1e-10)


def test_implicit_needs_equilibrium_layers_and_sane_options():
    with pytest.raises(ValueError, match="needs a model with deep-equilibrium layers"):
        ImplicitDifferentiation().attach(build_model("mlp", input_shape=(4,), num_classes=2))
    with pytest.raises(ValueError, match=r"train.gradient_options.solver: got 'newton'"):
        ImplicitDifferentiation(solver="newton")
    with pytest.raises(ValueError, match=r"invalid contraction=1.5; allowed: 0 < contraction < 1"):
        build_model("deq", input_shape=(4,), num_classes=2, contraction=1.5)
