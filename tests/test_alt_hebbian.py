"""Hebbian rules: Oja's rule finds the principal subspace, SoftHebb normalises its weights,
and the gradient method hands the rules' updates (negated) to the optimiser."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ribbed.alternatives import Hebbian
from ribbed.alternatives.hebbian import oja_update, softhebb_update
from ribbed.nn import build_model
from ribbed.train.precision import Precision


def _correlated_data(generator: torch.Generator, n: int = 20_000):
    """Zero-mean data in 8 dimensions whose top 3 principal directions are known."""
    basis, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))
    scales = torch.tensor([3.0, 2.5, 2.0, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    x = (torch.randn(n, 8, generator=generator, dtype=torch.float64) * scales) @ basis.T
    return x, basis[:, :3]


def test_oja_rule_converges_to_an_orthonormal_basis_of_the_principal_subspace():
    generator = torch.Generator().manual_seed(0)
    x, top = _correlated_data(generator)
    weight = 0.1 * torch.randn(3, 8, generator=generator, dtype=torch.float64)
    for batch in x.split(50):
        weight += 0.01 * oja_update(batch, weight)
    torch.testing.assert_close(weight @ weight.T, torch.eye(3, dtype=torch.float64), atol=0.05, rtol=0)
    inside = (weight @ top).norm() / weight.norm()
    assert inside > 0.99, f"only {inside:.3f} of the weights lie in the principal subspace"


def test_softhebb_weight_vectors_converge_to_unit_norm():
    generator = torch.Generator().manual_seed(1)
    x, _ = _correlated_data(generator)
    weight = 0.05 * torch.randn(6, 8, generator=generator, dtype=torch.float64)
    for batch in x.split(50):
        weight += 0.05 * softhebb_update(batch, weight, temperature=2.0)
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(6, dtype=torch.float64), atol=0.01, rtol=0)


@pytest.mark.parametrize("rule", ["oja", "softhebb"])
def test_the_method_gives_hidden_layers_the_negated_rule_and_the_head_the_true_gradient(rule):
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(10,), num_classes=4, hidden=(6, 5)).double()
    x, y = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 4, (32,))
    method = Hebbian(rule=rule, temperature=0.5)
    method.attach(model)
    method.accumulate(model, x, y, F.cross_entropy, Precision("fp32", "cpu"), 0.5)

    with torch.no_grad():
        h1 = model.blocks[0](x)
        features = model.blocks[1](h1)
    update = oja_update if rule == "oja" else lambda a, w: softhebb_update(a, w, 0.5)
    torch.testing.assert_close(model.blocks[0][0].weight.grad, -0.5 * update(x, model.blocks[0][0].weight.detach()))
    torch.testing.assert_close(model.blocks[1][0].weight.grad, -0.5 * update(h1, model.blocks[1][0].weight.detach()))
    assert model.blocks[0][0].bias.grad is None and model.blocks[1][0].bias.grad is None
    head_grads = torch.autograd.grad(0.5 * F.cross_entropy(model.head(features), y), list(model.head.parameters()))
    for param, expected in zip(model.head.parameters(), head_grads, strict=True):
        torch.testing.assert_close(param.grad, expected)


@pytest.mark.parametrize("options, message", [
    ({"rule": "anti"}, r"train.gradient_options.rule: got 'anti' .* allowed: oja, softhebb"),
    ({"temperature": -1.0}, r"train.gradient_options.temperature: got -1.0"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        Hebbian(**options)


def test_blocks_must_start_with_a_linear_layer():
    with pytest.raises(ValueError, match="needs blocks that start with a Linear layer"):
        Hebbian().attach(build_model("cnn1d", input_shape=(40,), num_classes=10))
