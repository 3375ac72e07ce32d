"""RIBBED's fast paths compute what the simple paths compute (float64, step by step).

* the direct AdamW update (``ribbed.core.scaled_adamw``) against the generic copy + base step +
  lerp path, which any base other than a plain ``torch.optim.AdamW`` takes;
* the shared per-neuron AdamW kernel against a plain per-parameter reference, in both modes
  (folded scales for RIBBED, materialised directions for AdamHD);
* the chiral term's in-place scatter-adds against ``G + gamma J G`` with a dense ``J``;
* the per-neuron features from norms and row products against the same quantities taken on
  each neuron's concatenated (weight row, bias) vector.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from ribbed import RIBBED
from ribbed.core import AdamHD
from ribbed.core.chiral import ChiralTerm
from ribbed.core.features import FEATURE_NAMES, neuron_features
from ribbed.core.layers import find_neuron_layers
from ribbed.core.scaled_adamw import scaled_adamw_, supports_scaled_step

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
COUPLED = {"controller_lr": 0.05, "feature_every": 3, "routing_every": 6, "chiral_gamma": 0.05, "graph_every": 20}


class GenericAdamW(torch.optim.AdamW):
    """AdamW under another name: RIBBED cannot assume its rule, so it takes the generic path."""


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def _batches(n: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (16,), generator=generator)) for _ in range(n)]


def _ribbed(model: nn.Module, base) -> tuple[RIBBED, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = RIBBED(model, lr=2e-2, base=base, base_options={"weight_decay": 0.05, "foreach": True}, **COUPLED)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.5)


def _train_step(model, optimizer, scheduler, batch) -> None:
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_only_a_plain_adamw_takes_the_direct_path():
    params = [nn.Parameter(torch.zeros(2))]
    assert supports_scaled_step(torch.optim.AdamW(params))
    for other in (GenericAdamW(params), torch.optim.AdamW(params, amsgrad=True),
                  torch.optim.AdamW(params, maximize=True), torch.optim.Adam(params)):
        assert not supports_scaled_step(other)


def test_direct_adamw_path_equals_copy_and_lerp_step_by_step():
    direct_model, generic_model = _model(), _model()
    direct, direct_schedule = _ribbed(direct_model, "adamw")
    generic, generic_schedule = _ribbed(generic_model, GenericAdamW)
    assert supports_scaled_step(direct.base) and not supports_scaled_step(generic.base)
    for batch in _batches(100):
        _train_step(direct_model, direct, direct_schedule, batch)
        _train_step(generic_model, generic, generic_schedule, batch)
        for a, b in zip(direct_model.parameters(), generic_model.parameters(), strict=True):
            torch.testing.assert_close(a, b, **TIGHT)
    torch.testing.assert_close(direct.controllers.multiplier, generic.controllers.multiplier, rtol=1e-6, atol=0)
    assert float(direct.controllers.multiplier.std()) > 1e-3  # the controllers gave the neurons different steps
    assert direct.param_groups[0]["lr"] == pytest.approx(2e-2 * 0.5 ** 3)
    for p, q in zip(direct_model.parameters(), generic_model.parameters(), strict=True):
        state, other = direct.base.state[p], generic.base.state[q]  # AdamW's own state and format
        assert float(state["step"]) == float(other["step"]) == 100.0
        torch.testing.assert_close(state["exp_avg"], other["exp_avg"], **TIGHT)


def test_direct_path_resumes_exactly_from_a_state_dict():
    batches = _batches(40)
    whole = _model()
    optimizer, schedule = _ribbed(whole, "adamw")
    for batch in batches:
        _train_step(whole, optimizer, schedule, batch)

    first = _model()
    optimizer, schedule = _ribbed(first, "adamw")
    for batch in batches[:17]:  # stops just before a feature refresh (feature_every=3)
        _train_step(first, optimizer, schedule, batch)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(seed=7)
    resumed.load_state_dict(saved["model"])
    optimizer, schedule = _ribbed(resumed, "adamw")
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    for batch in batches[17:]:
        _train_step(resumed, optimizer, schedule, batch)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def _reference_adamw(params, grads, exp_avgs, exp_avg_sqs, scales, step, lr, betas, eps, weight_decay):
    """AdamW written out per parameter, each neuron's rate ``lr * scale``."""
    beta1, beta2 = betas
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, scales, strict=True):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).add_(g * g, alpha=1 - beta2)
        u = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
        p.sub_(lr * s * (u + weight_decay * p))


@pytest.mark.parametrize("directions", [False, True])
def test_scaled_adamw_kernel_matches_a_per_parameter_reference(directions):
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 3, 2), (5,), (4, 7), ()]
    params = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    ours, theirs = [p.clone() for p in params], [p.clone() for p in params]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    rows = [torch.rand(5, generator=generator, dtype=torch.float64) + 0.25, torch.rand(4, generator=generator,
                                                                                     dtype=torch.float64) + 0.25]
    scales = [rows[0].view(5, 1, 1), rows[0], rows[1].view(4, 1), torch.tensor(1.0, dtype=torch.float64)]
    for step in range(1, 31):
        grads = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
        lr = 0.01 * (0.9 ** (step // 10))
        returned = scaled_adamw_(ours, grads, moments[0], moments[1], scales, steps=[float(step)] * 4, lr=lr,
                                 beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, directions=directions)
        _reference_adamw(theirs, grads, moments[2], moments[3], scales, step, lr, (0.9, 0.99), 1e-8, 0.1)
        assert (returned is not None) == directions
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, **TIGHT)


def test_factors_kept_while_the_scales_are_unchanged_give_the_same_steps_bit_for_bit():
    """RIBBED keeps ``1/s``, ``eps/s`` and the decay of the current lr between refreshes
    (``derived``); the steps equal recomputing them every step, also across lr changes."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(6, 4), (6,)]
    params = [torch.randn(shape, generator=generator) for shape in shapes]
    kept, fresh = [p.clone() for p in params], [p.clone() for p in params]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    row = torch.rand(6, generator=generator) + 0.25
    scales, derived = [row.view(6, 1), row], {}
    for step in range(1, 13):
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        lr = 0.01 * (0.5 ** (step // 4))  # a schedule: the kept decay must follow the lr
        options = dict(steps=[float(step)] * 2, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
        scaled_adamw_(kept, grads, moments[0], moments[1], scales, derived=derived, **options)
        scaled_adamw_(fresh, grads, moments[2], moments[3], scales, **options)
        for a, b in zip(kept, fresh, strict=True):
            assert torch.equal(a, b)
    assert {key[0] for key in derived} == {"decay", "inverse", "eps"} and len(derived) == 3


def test_adam_hd_follows_its_update_rule_in_float64():
    """AdamHD through the shared kernel: each parameter's per-neuron rates move by
    beta <g_t, u_{t-1}> and each neuron steps AdamW's direction at its own rate (a written-out
    reference, step by step)."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()
    optimizer = AdamHD(layer, lr=1e-2, hypergrad_lr=1e-3, weight_decay=0.01)
    params = [p.detach().clone() for p in layer.parameters()]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    previous = [torch.zeros_like(p) for p in params]
    scales = [torch.ones(4, 1, dtype=torch.float64), torch.ones(4, dtype=torch.float64)]  # weight, bias
    generator = torch.Generator().manual_seed(2)
    for step in range(1, 26):
        x = torch.randn(8, 5, generator=generator, dtype=torch.float64)
        layer(x).pow(2).mean().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        scales = [s + (1e-3 / 1e-2) * (g * d).reshape(4, -1).sum(1).view_as(s)
                  for s, g, d in zip(scales, grads, previous, strict=True)]
        before = [p.clone() for p in params]
        _reference_adamw(params, grads, *moments, scales, step, 1e-2, (0.9, 0.999), 1e-8, 0.01)
        previous = [(b - p) / (1e-2 * s) for b, p, s in zip(before, params, scales, strict=True)]
        for ours, theirs in zip(layer.parameters(), params, strict=True):
            torch.testing.assert_close(ours.detach(), theirs, **TIGHT)


def _dense_skew(neighbours: torch.Tensor, n: int, ring: bool) -> torch.Tensor:
    """``J = A - A^T`` as a dense matrix, ``A`` linking each neuron to its successor (ring) or to
    each of its nearest neighbours."""
    targets = neighbours[:, :1] if ring else neighbours
    adjacency = torch.zeros(n, n, dtype=torch.float64)
    adjacency[torch.arange(n).unsqueeze(1).expand_as(targets), targets] = 1.0
    return adjacency - adjacency.T


@pytest.mark.parametrize("graph", ["ring", "random", "knn"])
@pytest.mark.parametrize("gamma", [0.3, -0.3])
def test_chiral_application_is_g_plus_gamma_j_g(graph, gamma):
    generator = torch.Generator().manual_seed(4)
    layer = nn.Conv1d(3, 11, 2).double()
    grads = (torch.randn(11, 3, 2, generator=generator, dtype=torch.float64),
             torch.randn(11, generator=generator, dtype=torch.float64))
    layer.weight.grad, layer.bias.grad = grads[0].clone(), grads[1].clone()
    layers = find_neuron_layers(layer, set(layer.parameters()), hooks=False)
    term = ChiralTerm(gamma, graph, neighbours=3)
    term.refresh(layers, generator)
    term.apply(layers)
    skew = _dense_skew(term.structure[0], 11, ring=graph != "knn")
    assert torch.count_nonzero(skew) > 0
    for param, grad in zip((layer.weight, layer.bias), grads, strict=True):
        rows = grad.reshape(11, -1)
        expected = (rows + gamma * skew @ rows).view_as(grad)
        torch.testing.assert_close(param.grad, expected, **TIGHT)


def test_row_features_match_the_concatenated_neuron_vectors():
    model = nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6, 4)).double()
    optimizer = RIBBED(model, lr=1e-2, feature_every=1)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        model(torch.randn(9, 2, 8, generator=generator, dtype=torch.float64)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model(torch.randn(9, 2, 8, generator=generator, dtype=torch.float64)).pow(2).mean().backward()
    prev = dict(zip(optimizer.neuron_params, optimizer.controllers.prev, strict=True))
    momentum = optimizer.controllers._momentum()
    features, _ = neuron_features(optimizer.layers, prev, momentum, optimizer.controllers.surprise)

    def neuron_rows(layer, tensors):
        weight, bias = (tensors(p) for p in layer.params)
        return torch.cat([weight.reshape(layer.n, -1), bias.unsqueeze(1)], 1)

    expected = []
    for layer in optimizer.layers:
        g = neuron_rows(layer, lambda p: p.grad)
        d = neuron_rows(layer, lambda p: p.detach() - prev[p])
        w = neuron_rows(layer, lambda p: p.detach())
        m = neuron_rows(layer, lambda p: momentum[p])
        expected.append(torch.stack([g.norm(dim=1).log(), (d.norm(dim=1) / w.norm(dim=1)).log(),
                                     nn.functional.cosine_similarity(g, m, eps=0),
                                     nn.functional.cosine_similarity(g, d, eps=0)], 1))
    names = ["log_grad_norm", "log_update_ratio", "momentum_agreement", "hypergradient"]
    columns = [FEATURE_NAMES.index(name) for name in names]
    torch.testing.assert_close(features[:, columns], torch.cat(expected).float(), rtol=1e-5, atol=1e-6)
