"""Unrolled controller training: functional base rules, the meta-gradient, its link to the online signal."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from ribbed import RIBBED
from ribbed.core.features import neuron_features
from ribbed.core.layers import find_neuron_layers, row_dot
from ribbed.core.unrolled import FunctionalBase, neuron_scales, unrolled_meta_gradient
from ribbed.optim import record_batch
from ribbed.optim.batches import Batch
from ribbed.optim.functional import FlatParameters

pytestmark = pytest.mark.usefixtures("one_thread")

BASES = {
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd-dampened": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batches(n: int, seed: int = 1) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [Batch(torch.randn(16, 4, generator=generator, dtype=torch.float64),
                  torch.randint(0, 3, (16,), generator=generator), nn.functional.cross_entropy) for _ in range(n)]


def _backward(model: nn.Module, batch: Batch) -> None:
    batch.loss_fn(model(batch.x), batch.y).backward()


@pytest.mark.parametrize("name", list(BASES))
def test_functional_rules_reproduce_torch_optim(name):
    """Started from a torch optimiser's state after one real step, the pure rule's next steps
    equal torch's own (float64)."""
    model = _model()
    optimizer = BASES[name](model.parameters())
    batches = _batches(4)
    _backward(model, batches[0])
    optimizer.step()
    optimizer.zero_grad()
    rule = FunctionalBase(optimizer, FlatParameters(model, optimizer.param_groups))
    params, state = rule.flat.values(), rule.initial_state()
    params = {n: p.clone() for n, p in params.items()}
    for batch in batches[1:]:
        grads = grad(lambda ps, b=batch: b.loss_fn(functional_call(model, ps, (b.x,)), b.y))(params)
        deltas, state = rule.deltas(params, grads, state)
        params = {n: p + deltas[n] for n, p in params.items()}
        _backward(model, batch)
        optimizer.step()
        optimizer.zero_grad()
    for n, p in model.named_parameters():
        torch.testing.assert_close(params[n], p.detach(), rtol=1e-12, atol=1e-14)


def _meta(optimizer, model, batches, log_m, steps):
    rule = FunctionalBase(optimizer, FlatParameters(model, optimizer.param_groups))
    layers = find_neuron_layers(model, set(model.parameters()), hooks=False)
    return unrolled_meta_gradient(model, rule, batches, log_m, neuron_scales(layers, rule.flat), steps)


@pytest.mark.parametrize("name", ["sgd-nesterov", "adamw"])
def test_meta_gradient_equals_central_finite_differences(name):
    model = _model()
    optimizer = BASES[name](model.parameters())
    batches = _batches(3)
    _backward(model, batches[0])
    optimizer.step()  # start the unroll from a non-empty optimiser state
    log_m = 0.3 * torch.randn(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    meta, _ = _meta(optimizer, model, batches[1:], log_m, steps=3)
    h = 1e-6
    finite = torch.tensor([
        (_meta(optimizer, model, batches[1:], log_m + h * e, 3)[1]
         - _meta(optimizer, model, batches[1:], log_m - h * e, 3)[1])
        / (2 * h) for e in torch.eye(8, dtype=torch.float64)
    ], dtype=torch.float64)
    torch.testing.assert_close(meta, finite, rtol=1e-6, atol=1e-9)
    assert meta.abs().max() > 1e-4  # guard: a vanishing meta-gradient would pass trivially


def test_one_sgd_step_gives_the_online_hypergradient_signal():
    """T=1, SGD: ∂L(θ_1)/∂log m_i = <∇L(θ_1), θ_1 - θ_0>_i, i.e. the online hypergradient cosine
    (features) times |g_i||d_i|, for the multipliers RIBBED actually applies."""
    model = _model()
    optimizer = RIBBED(model, lr=0.5, base="sgd", feature_every=4, activation_features=False, controller_lr=0.1)
    batches = _batches(7)
    for batch in batches[:6]:  # refreshes at steps 0 and 4: the multipliers are no longer all 1
        _backward(model, batch)
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.allclose(optimizer.controllers.multiplier, torch.ones_like(optimizer.controllers.multiplier))
    batch = batches[6]
    meta, _ = _meta(optimizer.base, model, [batch], optimizer.controllers.multiplier.double().log(), steps=1)
    _backward(model, batch)
    optimizer.step()  # step 6: no refresh, the same multipliers
    optimizer.zero_grad()
    _backward(model, batch)
    prev = dict(zip(optimizer.neuron_params, optimizer.controllers.prev, strict=True))
    raw, cosine = neuron_features(optimizer.layers, prev, {}, torch.zeros(optimizer.n_neurons))
    dots, norms = [], []
    for layer in optimizer.layers:
        g, d = (layer.weight.grad, layer.bias.grad), (layer.weight - prev[layer.weight], layer.bias - prev[layer.bias])
        dots.append(row_dot(g, d))
        norms.append((row_dot(g, g) * row_dot(d, d)).sqrt())
    torch.testing.assert_close(meta, torch.cat(dots).detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(meta / torch.cat(norms).detach(), cosine.double(), rtol=1e-5, atol=1e-6)


def test_meta_gradient_is_finite_where_adam_saw_only_zero_gradients():
    """An input that is always 0 leaves its weights' second moments at 0 (sqrt's derivative is
    infinite there); the meta-gradient must stay finite and match finite differences."""
    model = _model()
    optimizer = BASES["adamw"](model.parameters())  # decoupled decay: those gradients are exactly 0
    batches = [Batch(b.x * torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64), b.y, b.loss_fn)
               for b in _batches(2)]
    log_m = torch.zeros(8, dtype=torch.float64)
    meta, _ = _meta(optimizer, model, batches, log_m, steps=2)
    assert torch.isfinite(meta).all()
    e, h = torch.eye(8, dtype=torch.float64)[0], 1e-6
    finite = (_meta(optimizer, model, batches, log_m + h * e, 2)[1]
              - _meta(optimizer, model, batches, log_m - h * e, 2)[1]) / (2 * h)
    assert float(meta[0]) == pytest.approx(finite, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("lr, direction", [(1e-3, "up"), (1.9, "down")])
def test_unrolled_controllers_learn_the_right_direction_on_a_quadratic(lr, direction):
    """Too small a step: the unrolled meta-gradient grows the multipliers; too large (oscillating): shrinks them."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 32, bias=False)
    target = torch.randn(32, 16)
    eye = torch.eye(16)

    def loss_fn(out, y):
        return 0.5 * (out - y).pow(2).sum()

    optimizer = RIBBED(layer, lr=lr, base="sgd", controller_lr=3e-2, activation_features=False, feature_every=1,
                       self_supervision=False, controller_training="unrolled", unroll_steps=2, objective="linear")
    for _ in range(40):
        loss_fn(layer(eye), target.T).backward()
        record_batch(layer, eye, target.T, loss_fn)
        optimizer.step()
        optimizer.zero_grad()
    telemetry = optimizer.telemetry()
    mean = telemetry["ribbed_multiplier_mean"]
    assert "unrolled_loss" in telemetry
    assert (mean > 1.2) if direction == "up" else (mean < 0.8), mean


def test_a_short_unrolled_run_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(128, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    optimizer = RIBBED(model, lr=1e-2, feature_every=2, controller_training="unrolled", unroll_steps=2)
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        record_batch(model, x, y, nn.functional.cross_entropy)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses[::10]
    assert float(optimizer.controllers.bank.w2.abs().max()) > 0  # the controllers were trained (they start at zero)


def test_unrolled_needs_a_recorded_batch():
    model = _model().float()
    optimizer = RIBBED(model, lr=1e-2, feature_every=1, controller_training="unrolled")
    model(torch.randn(4, 4)).pow(2).mean().backward()
    optimizer.step()  # the first refresh only computes features; the second trains the controllers
    optimizer.zero_grad()
    model(torch.randn(4, 4)).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="controller_training='unrolled'.*keep-batch"):
        optimizer.step()


@pytest.mark.parametrize("kwargs, field", [
    ({"controller_training": "unrolled", "base": "rmsprop"}, "controller_training"),
    ({"controller_training": "unrolled", "base": "adam", "base_options": {"amsgrad": True}}, "amsgrad"),
    ({"controller_training": "unrolled", "controllers": False}, "controller_training"),
    ({"controller_training": "backprop"}, "controller_training"),
    ({"controller_training": "unrolled", "unroll_steps": 0}, "unroll_steps"),
])
def test_bad_unrolled_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RIBBED(_model().float(), lr=1e-3, **kwargs)
