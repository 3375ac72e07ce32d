"""RIBBED / Meta-BP: exactness when off, the chiral term, the hypergradient signal, persistence."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ribbed import RIBBED
from ribbed.core.chiral import ChiralTerm, skew_apply
from ribbed.core.features import FEATURE_NAMES
from ribbed.core.layers import binned_entropy, find_neuron_layers, row_dot
from ribbed.data import load_dataset
from ribbed.train import build_run, train
from tests.ribbed_helpers import (
    assert_resume_matches_uninterrupted,
    mlp,
    random_batches,
    train_steps,
)

ALL_OFF = {"controllers": False, "chiral_gamma": 0.0}


@pytest.mark.parametrize("base, base_options, reference", [
    ("adamw", {"weight_decay": 0.01}, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, foreach=True)),
    ("sgd", {"momentum": 0.9}, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=True)),
])
def test_all_components_off_is_the_base_optimizer_bit_for_bit(base, base_options, reference):
    ours, theirs = mlp(), mlp()
    batches = random_batches(100)
    train_steps(ours, RIBBED(ours, lr=1e-2, base=base, base_options=base_options, **ALL_OFF), batches)
    train_steps(theirs, reference(theirs.parameters()), batches)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_components_on_change_the_trajectory():
    """Guard for the test above: with controllers on, RIBBED is not its base."""
    ours, theirs = mlp(), mlp()
    batches = random_batches(30)
    train_steps(ours, RIBBED(ours, lr=1e-2), batches)
    train_steps(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=True), batches)
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), fan=st.integers(1, 12), graph=st.sampled_from(["ring", "random", "knn"]),
       seed=st.integers(0, 1000))
def test_chiral_term_is_orthogonal_to_the_gradient(n, fan, graph, seed):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(fan, n)
    layer.weight.grad, layer.bias.grad = torch.randn(n, fan, generator=generator), torch.randn(n, generator=generator)
    g = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).double()
    term = ChiralTerm(0.3, graph, neighbours=3)
    term.refresh(find_neuron_layers(layer, set(layer.parameters()), hooks=False), generator)
    jg = skew_apply(g, term.structure[0], ring=graph != "knn")
    assert abs(float((g * jg).sum())) <= 1e-6 * float((g * g).sum())


def test_chiral_gamma_zero_and_the_two_handednesses():
    def rotated(gamma):
        torch.manual_seed(3)
        layer = nn.Linear(5, 9)
        layer.weight.grad, layer.bias.grad = torch.randn(9, 5), torch.randn(9)
        before = layer.weight.grad.clone()
        layers = find_neuron_layers(layer, set(layer.parameters()), hooks=False)
        term = ChiralTerm(gamma, "ring")
        term.refresh(layers, torch.Generator().manual_seed(0))
        term.apply(layers)
        return before, layer.weight.grad

    before, plus = rotated(0.2)
    _, minus = rotated(-0.2)
    _, none = rotated(0.0)
    assert torch.equal(none, before)
    assert not torch.allclose(plus, before)
    torch.testing.assert_close(plus - before, -(minus - before))


def test_chiral_zero_gamma_in_the_optimizer_is_plain_adamw():
    ours, theirs = mlp(), mlp()
    batches = random_batches(20)
    train_steps(ours, RIBBED(ours, lr=1e-2, controllers=False, chiral_gamma=0.0), batches)
    train_steps(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=True), batches)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
    chiral = mlp()
    train_steps(chiral, RIBBED(chiral, lr=1e-2, controllers=False, chiral_gamma=0.5), batches)
    assert any(not torch.equal(a, b) for a, b in zip(chiral.parameters(), theirs.parameters(), strict=True))


def test_hypergradient_matches_finite_differences():
    """dL/dm_i at m = 1 for w = w_prev + m * d equals <g_i, d_i>, the signal controllers learn from."""
    model = mlp(width=6).double()
    x, y = (t.double() if t.is_floating_point() else t for t in random_batches(1)[0])
    optimizer = RIBBED(model, lr=0.05, max_multiplier=4.0)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    layer = optimizer.layers[1]
    prev_w, prev_b = optimizer.controllers.prev[2], optimizer.controllers.prev[3]
    d_w, d_b = layer.weight.detach() - prev_w, layer.bias.detach() - prev_b
    signal = row_dot((layer.weight.grad, layer.bias.grad), (d_w, d_b))
    eps = 1e-6
    for neuron in range(layer.n):
        values = []
        for sign in (1, -1):
            probe = copy.deepcopy(model)
            target = probe[2]
            with torch.no_grad():
                target.weight[neuron] += sign * eps * d_w[neuron]
                target.bias[neuron] += sign * eps * d_b[neuron]
            values.append(nn.functional.cross_entropy(probe(x), y).item())
        finite = (values[0] - values[1]) / (2 * eps)
        assert finite == pytest.approx(float(signal[neuron]), rel=1e-5, abs=1e-10)


def test_state_dict_round_trip_continues_identically():
    batches = random_batches(50)
    settings_ = {"chiral_gamma": 0.05, "routing_every": 7, "graph_every": 9, "feature_every": 2}
    _, resumed = assert_resume_matches_uninterrupted(
        mlp, lambda model: RIBBED(model, lr=1e-2, **settings_), train_steps, batches, split=23)
    # the base's state is RIBBED's own (tools such as RigL's moment reset and memory accounting read it)
    assert resumed.state is resumed.base.state and len(resumed.state) == len(list(mlp().parameters()))


def test_works_under_an_lr_scheduler():
    model = mlp()
    optimizer = RIBBED(model, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    train_steps(model, optimizer, random_batches(12), scheduler)
    assert optimizer.base.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert optimizer.param_groups is optimizer.base.param_groups


@pytest.mark.parametrize("lr, direction", [(1e-4, "up"), (1.9, "down")])
def test_controllers_learn_the_right_direction_on_a_quadratic(lr, direction):
    """The linear objective (one global direction): too small a step, multipliers grow; too
    large (oscillating), they shrink."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 32, bias=False)
    target = torch.randn(32, 16)
    optimizer = RIBBED(layer, lr=lr, base="sgd", controller_lr=3e-2, activation_features=False, feature_every=1,
                       self_supervision=False, objective="linear")
    for _ in range(60):
        (0.5 * (layer.weight - target).pow(2).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    mean = optimizer.telemetry()["ribbed_multiplier_mean"]
    assert (mean > 1.2) if direction == "up" else (mean < 0.8), mean


@pytest.mark.parametrize("signal", ["trace", "one-step"])
def test_residual_controllers_move_step_from_oscillating_to_slow_neurons(signal):
    """The residual objective on one layer whose rows have very different curvatures under SGD
    at lr 1: rows at curvature 0.02 crawl, rows at 1.9 oscillate. The controllers give the slow
    rows multipliers above 1 and the oscillating rows below 1 (all but a stray row or two, whose
    controller the routing shares with the other kind), the layer's log-multipliers stay
    centred, and the multipliers stay inside their bound (no saturation)."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 32, bias=False)
    target = torch.randn(32, 16)
    curvature = torch.cat([torch.full((16, 1), 0.02), torch.full((16, 1), 1.9)])
    optimizer = RIBBED(layer, lr=1.0, base="sgd", controller_lr=3e-2, activation_features=False, feature_every=1,
                       self_supervision=False, signal=signal)
    for _ in range(60):
        (0.5 * (curvature * (layer.weight - target).pow(2)).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    multiplier = optimizer.controllers.multiplier
    slow, fast = multiplier[:16], multiplier[16:]
    assert slow.mean() > 1.1 and fast.mean() < 0.9, multiplier
    assert (slow > 1).sum() >= 14 and (fast < 1).sum() >= 14, multiplier
    assert abs(float(multiplier.log().mean())) < 1e-5
    assert optimizer.telemetry()["ribbed_near_bound"] == 0.0


def test_frozen_residual_controllers_are_the_base_bit_for_bit():
    """controller_lr=0: every piece runs (features, routing, signal, hooks) but the bank's output
    weights stay zero, so every multiplier is exactly 1 and the steps are AdamW's own."""
    batches = random_batches(40)
    ours, theirs = mlp(), mlp()
    optimizer = RIBBED(ours, lr=1e-2, controller_lr=0.0, feature_every=3, base_options={"weight_decay": 0.01})
    train_steps(ours, optimizer, batches)
    train_steps(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.01), batches)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
    assert torch.equal(optimizer.controllers.multiplier, torch.ones_like(optimizer.controllers.multiplier))
    assert optimizer.telemetry()["ribbed_controller_loss"] == 0.0


def test_features_cover_every_neuron_and_name():
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 5))
    optimizer = RIBBED(model, lr=1e-3)
    loss = model(torch.randn(7, 1, 8)).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert optimizer.n_neurons == 4 + 5
    assert optimizer.controllers._pending[0].shape == (9, len(FEATURE_NAMES))
    assert torch.isfinite(optimizer.controllers._pending[0]).all()


def test_entropy_of_uniform_and_constant_activations():
    uniform = torch.linspace(0, 1, 16 * 1000).reshape(-1, 1)[:-1].repeat(1, 3)
    torch.testing.assert_close(binned_entropy(uniform, 16), torch.full((3,), math.log(16)), atol=1e-3, rtol=0)
    assert torch.equal(binned_entropy(torch.ones(50, 2), 8), torch.zeros(2))


def test_bad_settings_name_the_field():
    model = mlp()
    for kwargs, field in [({"n_controllers": 0}, "n_controllers"), ({"max_multiplier": 1.0}, "max_multiplier"),
                          ({"chiral_gamma": 0.1, "chiral_graph": "spiral"}, "chiral_graph"),
                          ({"feature_every": 0}, "feature_every"), ({"base": "nope"}, "nope"),
                          ({"max_multiplier": float("inf")}, "max_multiplier: got inf"),
                          ({"multiplier_penalty": float("nan")}, "multiplier_penalty: got nan")]:
        with pytest.raises(ValueError, match=field):
            RIBBED(model, lr=1e-3, **kwargs)


def test_ribbed_trains_in_the_loop_from_config(tiny_config):
    config = tiny_config(optimizer={"name": "ribbed", "lr": 0.01, "options": {"chiral_gamma": 0.01}},
                         train={"steps": 60, "eval_every": 30})
    result = train(build_run(config, load_dataset("digits")))
    assert result.status == "completed" and result.final["test_acc"] > 0.5


def test_adam_hd_without_hypergradient_is_adamw_in_float64():
    from ribbed.core import AdamHD

    ours, theirs = mlp().double(), mlp().double()
    batches = [(x.double(), y) for x, y in random_batches(25)]
    train_steps(ours, AdamHD(ours, lr=1e-2, hypergrad_lr=0.0, weight_decay=0.01), batches)
    train_steps(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.01), batches)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adam_hd_rates_are_per_neuron_and_follow_the_hypergradient():
    from ribbed.core import AdamHD

    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    target = torch.randn(6, 8) * torch.arange(1, 7).unsqueeze(1)
    optimizer = AdamHD(layer, lr=1e-3, hypergrad_lr=1e-3)
    for _ in range(40):
        (0.5 * (layer.weight - target).pow(2).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    rates = optimizer.state[layer.weight]["scale"] * 1e-3
    assert rates.shape == (6,) and (rates > 1e-3).all(), rates
    assert len(set(rates.tolist())) == 6


def _no_decay_groups(model: nn.Module) -> list[dict]:
    """Weights decayed, biases not: the two groups transformers' Trainer builds."""
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def test_adam_hd_param_groups_without_hypergradient_are_adamw_with_those_groups_in_float64():
    from ribbed.optim import build_optimizer

    ours, theirs = mlp().double(), mlp().double()
    batches = [(x.double(), y) for x, y in random_batches(25)]
    optimizer = build_optimizer("adam-hd", ours, lr=1e-2, params=_no_decay_groups(ours), hypergrad_lr=0.0,
                                weight_decay=0.1)
    train_steps(ours, optimizer, batches)
    train_steps(theirs, torch.optim.AdamW(_no_decay_groups(theirs), lr=1e-2, weight_decay=0.1), batches)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adam_hd_given_a_parameter_list_instead_of_the_model_says_what_to_pass():
    from ribbed.core import AdamHD

    model = mlp()
    with pytest.raises(ValueError, match=r"model: got a list; allowed: the torch.nn.Module .* params="):
        AdamHD(list(model.parameters()), lr=1e-3)
    with pytest.raises(ValueError, match=r"model: got a generator; allowed: the torch.nn.Module"):
        AdamHD(model.parameters(), lr=1e-3)


def test_adam_hd_keeps_float32_scales_for_bfloat16_parameters_and_reloads_them_exactly():
    """In bfloat16 a scale of 1 plus a hypergradient step of ~1e-4 rounds back to 1: the rates
    would never move (plain AdamW). The scales are float32 and survive a state-dict round trip."""
    from ribbed.core import AdamHD

    model = mlp().to(torch.bfloat16)
    optimizer = AdamHD(model, lr=1e-2, hypergrad_lr=1e-5)
    batches = [(x.to(torch.bfloat16), y) for x, y in random_batches(12)]
    train_steps(model, optimizer, batches)
    scales = [state["scale"] for state in optimizer.state.values()]
    assert all(scale.dtype == torch.float32 for scale in scales)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert any(((scale != 1) & ((scale - 1).abs() < 2 ** -8)).any() for scale in scales)  # below bf16's resolution
    fresh = AdamHD(model, lr=1e-2, hypergrad_lr=1e-5)
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for p in model.parameters():
        assert fresh.state[p]["scale"].dtype == torch.float32
        assert torch.equal(fresh.state[p]["scale"], optimizer.state[p]["scale"])
        assert torch.equal(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])


def test_a_single_neuron_with_more_controllers_than_neurons():
    neuron = nn.Linear(3, 1)
    optimizer = RIBBED(neuron, lr=0.05, base="sgd", n_controllers=4, feature_every=1)
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    for _ in range(5):
        nn.functional.mse_loss(neuron(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.controllers.clusters.assignment.shape == (1,)


def test_routing_recovers_well_separated_groups():
    from ribbed.core.clustering import OnlineKMeans

    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    generator = torch.Generator().manual_seed(0)
    points = (centres.repeat_interleave(25, 0) + torch.randn(100, 2, generator=generator))
    truth = torch.arange(4).repeat_interleave(25)
    routing = OnlineKMeans(4)
    routing.observe(points)
    for _ in range(3):
        assignment = routing.refresh(generator)
    pairs = {(int(a), int(t)) for a, t in zip(assignment, truth, strict=True)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4
    assert routing.changes == 0


@pytest.mark.parametrize("base", ["lion", "kfac"])
def test_ribbed_over_other_registry_optimizers(base):
    """RIBBED wraps Lion and K-FAC (which hooks the model's layers): off it is exactly its base,
    on it trains."""
    from ribbed.optim import build_optimizer

    batches = random_batches(15)
    ours, theirs = mlp(), mlp()
    train_steps(ours, RIBBED(ours, lr=1e-3, base=base, **ALL_OFF), batches)
    train_steps(theirs, build_optimizer(base, theirs, lr=1e-3), batches)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
    model = mlp()
    optimizer = RIBBED(model, lr=1e-3, base=base, feature_every=1)
    x, y = batches[0]
    before = nn.functional.cross_entropy(model(x), y).item()
    train_steps(model, optimizer, [(x, y)] * 30)
    assert nn.functional.cross_entropy(model(x), y).item() < before
