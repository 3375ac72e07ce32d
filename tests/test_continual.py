"""The continual-learning benchmark: streams, per-task metrics, the plasticity baselines (float64
parity with their formulas, exact state_dict round trips, option errors), the online runner and
both presets end to end at minimal size."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ribbed.config import load_config
from ribbed.continual import (
    Method,
    OnlineRun,
    dead_fraction,
    dead_units,
    early_fraction_mean,
    last_fraction_mean,
    representation_rank,
    run_online,
    tune_lr,
)
from ribbed.data import DatasetError
from ribbed.data.continual import PermutedImages, SlowlyChangingRegression, build_stream
from ribbed.experiments.presets import preset_path
from ribbed.experiments.studies import run_study
from ribbed.optim import OptimizerError, build_optimizer, evaluation_weights

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- streams


def test_regression_stream_is_deterministic_and_seed_dependent():
    first = list(SlowlyChangingRegression(seed=3, period=40).tasks(4))
    again = list(SlowlyChangingRegression(seed=3, period=40).tasks(4))
    other = list(SlowlyChangingRegression(seed=4, period=40).tasks(4))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not all(torch.equal(a.x, c.x) for a, c in zip(first, other, strict=True))


def test_regression_flips_exactly_one_flipping_bit_per_period_and_targets_come_from_the_ltu_net():
    stream = SlowlyChangingRegression(seed=0, num_inputs=12, flipping_bits=8, period=64, target_hidden=30)
    tasks = list(stream.tasks(6))
    for task in tasks:
        assert task.x.shape == (64, 12) and task.y.shape == (64, 1)
        flipping, noise = task.x[:, :8], task.x[:, 8:]
        assert torch.equal(flipping, flipping[:1].expand(64, -1))  # constant within the task
        assert len(torch.unique(noise, dim=0)) > 1  # the other bits are fresh every example
        assert set(task.x.unique().tolist()) <= {0.0, 1.0}
    for previous, task in zip(tasks, tasks[1:], strict=False):
        changed = (previous.x[0, :8] != task.x[0, :8]).nonzero().flatten().tolist()
        assert changed == [task.info["flipped"]]
    negatives = (stream.weight < 0).sum(1) + (stream.bias < 0)
    assert torch.equal(stream.threshold, 0.7 * 13 - negatives.float())
    x = tasks[2].x
    hidden = ((x @ stream.weight.T + stream.bias) > stream.threshold).float()
    assert torch.equal(tasks[2].y[:, 0], hidden @ stream.out_weight + stream.out_bias)


def test_permuted_stream_fixes_one_permutation_per_task_and_shows_every_image_once():
    stream = PermutedImages(seed=1, source="digits")
    tasks = list(stream.tasks(3))
    permutations = [t.info["permutation"] for t in tasks]
    assert not torch.equal(permutations[0], permutations[1]) and not torch.equal(permutations[1], permutations[2])
    for task, permutation in zip(tasks, permutations, strict=True):
        order = task.info["order"]
        assert sorted(order.tolist()) == list(range(len(stream.labels)))  # each image once
        assert torch.equal(task.x, stream.images[order][:, permutation])  # one permutation, every row
        assert torch.equal(task.y, stream.labels[order])
    again = list(PermutedImages(seed=1, source="digits").tasks(3))
    assert all(torch.equal(a.x, b.x) for a, b in zip(tasks, again, strict=True))


def test_stream_options_are_checked():
    with pytest.raises(DatasetError, match="flipping_bits got 30; allowed: at most num_inputs"):
        SlowlyChangingRegression(seed=0, flipping_bits=30)
    with pytest.raises(DatasetError, match="examples_per_task got 5000"):
        PermutedImages(seed=0, source="digits", examples_per_task=5000)
    with pytest.raises(DatasetError, match="stream: got 'mnist'; allowed: regression, permuted"):
        build_stream("mnist", seed=0)


# --------------------------------------------------------------------------- metrics


def test_dead_units_are_zero_on_every_example():
    activations = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert dead_units(activations).tolist() == [True, False, False, True]
    assert dead_fraction(activations) == 0.5
    with pytest.raises(ValueError, match="activations"):
        dead_fraction(torch.zeros(0, 3))


def test_last_and_early_fraction_means():
    values = [float(v) for v in range(1, 21)]
    assert last_fraction_mean(values, 0.1) == 19.5  # the last 2 of 20
    assert last_fraction_mean(values[:10], 0.1) == 10.0  # the last 1 of 10
    assert last_fraction_mean([4.0, 6.0], 0.1) == 6.0  # at least one
    assert early_fraction_mean(values, 0.1) == 3.5  # tasks 3 and 4: the second tenth
    with pytest.raises(ValueError, match="fraction"):
        last_fraction_mean(values, 0.0)


def test_representation_rank():
    assert representation_rank(torch.eye(3)) == pytest.approx(3.0)
    assert representation_rank(torch.ones(5, 4)) == pytest.approx(1.0)
    assert representation_rank(torch.zeros(5, 4)) == 0.0


# --------------------------------------------------------------------------- baselines

BETAS, EPS = (0.9, 0.999), 1e-8


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    return model, x, y


def _grads(params, x, y):
    """Gradients of the test loss at ``params`` (weights of the two Linear layers, in order)."""
    params = [p.detach().requires_grad_() for p in params]
    w1, b1, w2, b2 = params
    loss = F.mse_loss(F.relu(x @ w1.T + b1) @ w2.T + b2, y)
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def _train(optimizer, model, x, y, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


def _adam(state, g, t, lr):
    """One plain Adam step direction: ``lr * m_hat / (sqrt(v_hat) + eps)``, state updated in place."""
    state["m"] = BETAS[0] * state["m"] + (1 - BETAS[0]) * g
    state["v"] = BETAS[1] * state["v"] + (1 - BETAS[1]) * g * g
    m_hat, v_hat = state["m"] / (1 - BETAS[0] ** t), state["v"] / (1 - BETAS[1] ** t)
    return lr * m_hat / (v_hat.sqrt() + EPS)


def _assert_close(model, reference):
    for p, r in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)


def test_shrink_perturb_matches_its_formula_in_float64():
    model, x, y = _problem()
    lr, shrink, sigma, every = 0.01, 0.9, 0.05, 2
    optimizer = build_optimizer("shrink-perturb", model, lr=lr, base_options={"weight_decay": 0.0},
                                shrink=shrink, sigma=sigma, every=every, seed=7)
    reference = [p.detach().clone() for p in model.parameters()]
    states = [{"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in reference]
    noise = torch.Generator().manual_seed(7)
    for t in range(1, 6):
        _train(optimizer, model, x, y, 1)
        grads = _grads(reference, x, y)
        reference = [w - _adam(s, g, t, lr) for w, s, g in zip(reference, states, grads, strict=True)]
        if t % every == 0:
            reference = [shrink * w + sigma * torch.randn(w.shape, generator=noise, dtype=w.dtype)
                         for w in reference]
        _assert_close(model, reference)


def test_shrink_perturb_off_is_its_base_exactly():
    model, x, y = _problem()
    twin = copy.deepcopy(model)
    wrapped = build_optimizer("shrink-perturb", model, lr=0.01, shrink=1.0, sigma=0.0)
    plain = build_optimizer("adamw", twin, lr=0.01)
    _train(wrapped, model, x, y, 4)
    _train(plain, twin, x, y, 4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


@pytest.mark.parametrize("anchor", ["init", "zero"])
def test_adamw_l2_matches_its_formula_in_float64(anchor):
    model, x, y = _problem()
    lr, l2 = 0.01, 0.3
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer("adamw-l2", model, lr=lr, base_options={"weight_decay": 0.0}, l2=l2,
                                anchor=anchor)
    reference = [w.clone() for w in initial]
    states = [{"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in reference]
    for t in range(1, 6):
        _train(optimizer, model, x, y, 1)
        grads = _grads(reference, x, y)
        anchors = initial if anchor == "init" else [torch.zeros_like(w) for w in reference]
        grads = [g + l2 * (w - a) for g, w, a in zip(grads, reference, anchors, strict=True)]
        reference = [w - _adam(s, g, t, lr) for w, s, g in zip(reference, states, grads, strict=True)]
        _assert_close(model, reference)


def test_upgd_matches_its_formula_in_float64():
    model, x, y = _problem()
    lr, wd, beta, sigma = 0.05, 0.01, 0.9, 0.02
    optimizer = build_optimizer("upgd", model, lr=lr, weight_decay=wd, beta_utility=beta, sigma=sigma, seed=11)
    reference = [p.detach().clone() for p in model.parameters()]
    utilities = [torch.zeros_like(w) for w in reference]
    noise = torch.Generator().manual_seed(11)
    for t in range(1, 6):
        _train(optimizer, model, x, y, 1)
        grads = _grads(reference, x, y)
        utilities = [beta * u + (1 - beta) * (-g * w) for u, g, w in zip(utilities, grads, reference, strict=True)]
        eta = max(u.max() for u in utilities)
        updated = []
        for w, g, u in zip(reference, grads, utilities, strict=True):
            scaled = torch.sigmoid(u / (1 - beta**t) / eta)
            xi = sigma * torch.randn(w.shape, generator=noise, dtype=w.dtype)
            updated.append((1 - lr * wd) * w - lr * (g + xi) * (1 - scaled))
        reference = updated
        _assert_close(model, reference)


def test_schedulefree_adamw_matches_the_paper_and_evaluates_at_the_average():
    pytest.importorskip("schedulefree")
    model, x, y = _problem()
    lr, wd = 0.02, 0.01
    optimizer = build_optimizer("schedulefree-adamw", model, lr=lr, weight_decay=wd)
    z = [p.detach().clone() for p in model.parameters()]
    x_avg = [w.clone() for w in z]
    v = [torch.zeros_like(w) for w in z]
    for t in range(1, 6):
        y_point = [(1 - BETAS[0]) * zi + BETAS[0] * xi for zi, xi in zip(z, x_avg, strict=True)]
        _assert_close(model, y_point)  # train mode: the parameters hold y
        _train(optimizer, model, x, y, 1)
        grads = _grads(y_point, x, y)
        v = [BETAS[1] * vi + (1 - BETAS[1]) * g * g for vi, g in zip(v, grads, strict=True)]
        steps = [g / ((vi / (1 - BETAS[1] ** t)).sqrt() + EPS) + wd * yi
                 for g, vi, yi in zip(grads, v, y_point, strict=True)]
        z = [zi - lr * s for zi, s in zip(z, steps, strict=True)]
        x_avg = [(1 - 1 / t) * xi + (1 / t) * zi for xi, zi in zip(x_avg, z, strict=True)]
    with evaluation_weights(optimizer):
        _assert_close(model, x_avg)
    assert optimizer.param_groups[0]["train_mode"]


ROUND_TRIP = [
    ("shrink-perturb", {"sigma": 0.01, "shrink": 0.99, "every": 2}),
    ("upgd", {"sigma": 0.01}),
    ("adamw-l2", {"l2": 0.1}),
    ("adamw-l2", {"l2": 0.1, "anchor": "zero"}),
    ("schedulefree-adamw", {"weight_decay": 0.01}),
]


@pytest.mark.parametrize(("name", "options"), ROUND_TRIP)
def test_state_dict_round_trip_continues_exactly(name, options):
    model, x, y = _problem()
    optimizer = build_optimizer(name, model, lr=0.01, **options)
    _train(optimizer, model, x, y, 3)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    _train(optimizer, model, x, y, 3)

    torch.manual_seed(123)  # a resumed run starts from another global RNG state
    resumed_model, _, _ = _problem()
    resumed_model.load_state_dict(saved_model)
    resumed = build_optimizer(name, resumed_model, lr=0.01, **options)
    resumed.load_state_dict(saved)
    _train(resumed, resumed_model, x, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True))


@pytest.mark.parametrize(("name", "options", "message"), [
    ("shrink-perturb", {"shrink": 1.5}, r"shrink: got 1.5; allowed: a number in \(0, 1\]"),
    ("shrink-perturb", {"every": 0}, "every: got 0; allowed: an integer >= 1"),
    ("shrink-perturb", {"sigma": -1.0}, "sigma: got -1.0; allowed: a number >= 0"),
    ("shrink-perturb", {"sigma": float("inf")}, "sigma: got inf; allowed: a number >= 0"),
    ("upgd", {"beta_utility": 1.0}, r"beta_utility: got 1.0; allowed: a number in \[0, 1\)"),
    ("upgd", {"seed": -1}, "seed: got -1; allowed: an integer >= 0"),
    ("adamw-l2", {"anchor": "ones"}, "anchor: got 'ones'; allowed: init, zero"),
    ("adamw-l2", {"l2": float("nan")}, "l2: got nan; allowed: a number >= 0"),
    ("schedulefree-adamw", {"betas": [0.9]}, r"betas: got \[0.9\]; allowed: two numbers in \[0, 1\)"),
    ("schedulefree-adamw", {"warmup_steps": 1.5}, "warmup_steps: got 1.5; allowed: an integer >= 0"),
])
def test_options_are_checked_with_the_field_the_value_and_what_is_allowed(name, options, message):
    with pytest.raises(OptimizerError, match=message):
        build_optimizer(name, nn.Linear(2, 2), lr=0.01, **options)


def test_training_loop_evaluates_schedulefree_at_its_average(tiny_config):
    pytest.importorskip("schedulefree")
    from ribbed.train import build_run, evaluate, train

    config = tiny_config(optimizer={"name": "schedulefree-adamw", "lr": 0.01}, schedule={"kind": "constant"},
                         train={"steps": 12, "eval_every": 4})
    parts = build_run(config)
    result = train(parts, evaluate_test=False)  # evaluating mid-run must leave it in train mode
    assert result.status == "completed" and not parts.optimizer.param_groups[0]["train_mode"]
    again = evaluate(parts.model, parts.dataset.val, task="classification", batch_size=256,
                     precision=parts.precision, device=parts.device)
    assert again["loss"] == result.final["val_loss"]


# --------------------------------------------------------------------------- runner


def test_online_run_records_every_task_and_is_deterministic():
    stream = SlowlyChangingRegression(seed=0, period=30)
    method = Method("adamw", "adamw", 0.01, {"weight_decay": 0.0})
    first = run_online(stream, method, seed=1, tasks=3, hidden=(4,), probe=10)
    again = run_online(stream, method, seed=1, tasks=3, hidden=(4,), probe=10)
    assert first.status == "completed" and len(first.online) == len(first.dead) == len(first.rank) == 3
    assert first.online == again.online and first.dead == again.dead
    assert all(0 <= d <= 1 for d in first.dead) and all(0 <= r <= 4 for r in first.rank)


def test_online_run_of_schedulefree_predicts_at_the_average_and_classifies():
    pytest.importorskip("schedulefree")
    stream = PermutedImages(seed=0, source="digits", examples_per_task=64)
    run = run_online(stream, Method("sf", "schedulefree-adamw", 0.01), seed=0, tasks=2, hidden=(16,),
                     batch_size=8, probe=32)
    assert run.status == "completed" and all(0 <= a <= 1 for a in run.online)


def test_online_run_stops_at_divergence():
    stream = SlowlyChangingRegression(seed=0, period=30)
    run = run_online(stream, Method("sgd", "sgd", 1e12), seed=0, tasks=3, hidden=(4,), probe=10)
    assert run.status == "diverged" and run.diverged_at == 0 and run.headline() is None


def _stub(scores):
    return lambda lr: OnlineRun("m", 0, lr, online=[scores[lr]]) if scores[lr] is not None \
        else OnlineRun("m", 0, lr, status="diverged")


def test_tuning_reports_whether_the_best_lr_is_interior():
    interior = tune_lr(_stub({0.1: 0.5, 0.01: 0.9, 0.001: 0.7}), [0.1, 0.01, 0.001], mode="max")
    assert interior["best_lr"] == 0.01 and interior["interior"] and interior["grid"] == [0.001, 0.01, 0.1]
    edge = tune_lr(_stub({0.1: None, 0.01: 2.0, 0.001: 1.0}), [0.001, 0.01, 0.1], mode="min")
    assert edge["best_lr"] == 0.001 and not edge["interior"] and edge["scores"][2] is None


# --------------------------------------------------------------------------- presets end to end

TINY_PRESETS = {
    "plasticity-regression": ["options.tasks=3", "options.stream_options.period=24", "options.probe=8",
                              "options.seeds=2", "options.tune=true", "options.lr_grid=[0.001,0.01,0.1]"],
    "plasticity-permuted": ["options.tasks=3", "options.stream_options.examples_per_task=48",
                            "options.probe=16", "options.seeds=2", "options.hidden=[16]"],
}


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_presets_run_end_to_end_at_minimal_size(preset, tmp_path):
    config = load_config(preset_path(preset), TINY_PRESETS[preset])
    outcome = run_study(config, runs_dir=tmp_path)
    summary = outcome.summary
    assert outcome.report_html.is_file() and outcome.report_md.is_file()
    assert [f["alt"] for f in summary["figures"]] == ["online", "dead", "rank", "headline"]
    assert all((outcome.record.path / f["file"]).is_file() for f in summary["figures"])
    titles = [t["title"] for t in summary["tables"]]
    assert titles[0].startswith("Headline") and "Pairwise" in titles[1]
    ran = {row[0] for row in summary["tables"][0]["rows"]}
    assert {"adamw", "shrink-perturb", "upgd", "adamw-l2-init"} <= ran
    assert len(summary["data"]["runs"]) == 2 * len(ran)
    assert all(math.isfinite(v) for run in summary["data"]["runs"] for v in run["online"])
    assert any("Dohare" in line for line in summary["findings"])
    if "options.tune=true" in TINY_PRESETS[preset]:
        tuning = summary["tables"][2]
        assert tuning["columns"][-1] == "interior" and len(tuning["rows"]) == len(ran)


def test_an_unknown_optimiser_is_refused_before_anything_runs(tmp_path):
    """A typo in a method's optimiser stops the study with the field and the allowed names; it
    is not quietly left out of the comparison."""
    config = load_config(preset_path("plasticity-regression"),
                         [*TINY_PRESETS["plasticity-regression"], "options.methods.redo.optimizer=redoo"])
    with pytest.raises(ValueError, match=r"options\.methods\.redo\.optimizer: got 'redoo'; allowed: a registered"):
        run_study(config, runs_dir=tmp_path)
    (summary,) = tmp_path.glob("*/summary.json")  # the study's record says why it stopped
    assert json.loads(summary.read_text())["status"] == "failed"


@pytest.mark.parametrize("late_drop, claimed", [(0.05, True), (0.0005, False)])
def test_a_loss_of_plasticity_is_claimed_only_when_the_drop_is_significant(late_drop, claimed):
    """The study's finding about the baseline compares its early and late online accuracy over the
    seeds with a Welch test: a drop within the seeds' noise is not called a loss of plasticity."""
    from ribbed.continual.runner import OnlineRun
    from ribbed.experiments.studies.continual import _findings

    noise = [0.004, -0.003, 0.001, -0.002, 0.0]
    runs = [OnlineRun("adamw", seed, 1e-3,
                      online=[0.5] * 10 + [0.86 + e] * 10 + [0.5] * 70 + [0.86 - late_drop + e] * 10)
            for seed, e in enumerate(noise)]
    findings = _findings([], runs, "adamw", "max", "online accuracy", 0.1, False, None)
    lost = [line for line in findings if "plasticity is lost" in line]
    assert bool(lost) is claimed, findings
    assert claimed or any("no significant loss of plasticity" in line for line in findings)
