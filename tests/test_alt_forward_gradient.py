"""Forward gradients: exact directional derivatives, and an unbiased estimate that converges
to the true gradient as tangents are averaged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ribbed.alternatives import ForwardGradient, forward_gradient
from ribbed.nn import build_model
from ribbed.train.precision import Precision


def _problem():
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(6,), num_classes=3, hidden=(8,)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=generator)
    return model, x, y


def _true_gradient(model, x, y) -> torch.Tensor:
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return torch.cat([g.flatten() for g in grads])


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def test_one_tangent_gives_the_exact_directional_derivative_times_the_tangent():
    model, x, y = _problem()
    loss, estimate = forward_gradient(model, x, y, F.cross_entropy, 1, torch.Generator().manual_seed(5))
    tangent = torch.randn(1, _flat(model.parameters()).numel(), generator=torch.Generator().manual_seed(5),
                          dtype=torch.float64)[0]
    truth = _true_gradient(model, x, y)
    torch.testing.assert_close(_flat(estimate), (truth @ tangent) * tangent, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach())


def test_the_average_over_many_tangents_converges_to_the_true_gradient():
    model, x, y = _problem()
    truth = _true_gradient(model, x, y)
    generator = torch.Generator().manual_seed(7)
    few = _flat(forward_gradient(model, x, y, F.cross_entropy, 4, generator)[1])
    many = _flat(forward_gradient(model, x, y, F.cross_entropy, 20_000, generator)[1])
    assert F.cosine_similarity(many, truth, dim=0) > 0.95
    assert F.cosine_similarity(few, truth, dim=0) < 0.8  # the knob matters: few tangents are noisy
    torch.testing.assert_close(many.norm() / truth.norm(), torch.tensor(1.0, dtype=torch.float64), rtol=0.1, atol=0)


def test_the_method_adds_the_scaled_estimate_to_existing_gradients():
    model, x, y = _problem()
    params = list(model.parameters())
    torch.manual_seed(11)
    expected = _flat(forward_gradient(model, x, y, F.cross_entropy, 3)[1])
    for p in params:
        p.grad = torch.ones_like(p)
    torch.manual_seed(11)
    ForwardGradient(tangents=3).accumulate(model, x, y, F.cross_entropy, Precision("fp32", "cpu"), 0.25)
    torch.testing.assert_close(_flat(p.grad for p in params), 1 + 0.25 * expected)


def test_tangents_must_be_a_positive_integer():
    import pytest

    with pytest.raises(ValueError, match=r"train.gradient_options.tangents: got 0 .* a positive integer"):
        ForwardGradient(tangents=0)
