"""Guided ES and selection (controller banks, chirality signs): the estimator's expectation and
variance, exact restoration, RIBBED use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ribbed import RIBBED
from ribbed.core.chiral import CHIRAL_GRAPHS, ChiralTerm, add_skew_, skew_apply
from ribbed.core.evolution import (
    LossProbe,
    antithetic_estimate,
    evolve_chirality,
    gaussian_mutation,
    guided_covariance,
    guided_perturbations,
    orthonormal_basis,
    select,
    sign_flip_mutation,
)
from ribbed.core.layers import find_neuron_layers
from ribbed.data import load_dataset
from ribbed.optim import record_batch
from ribbed.train import build_run, train
from tests.ribbed_helpers import assert_resume_matches_uninterrupted

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8


def _quadratic(seed: int = 0):
    """``f(θ) = ½ θᵀAθ + bᵀθ`` in float64, vectorised over rows of ``θ``, and its gradient at ``θ0``."""
    generator = torch.Generator().manual_seed(seed)
    root = torch.randn(N, N, generator=generator, dtype=torch.float64)
    a = root @ root.T / N + torch.eye(N, dtype=torch.float64)
    b = torch.randn(N, generator=generator, dtype=torch.float64)
    theta = torch.randn(N, generator=generator, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x @ a) * x).sum(-1) + x @ b

    return f, theta, a @ theta + b


def _batch_means(f, theta, basis, alpha, sigma, draws: int, chunk: int, seed: int = 1) -> torch.Tensor:
    """Estimates from ``draws`` antithetic pairs, averaged within chunks: ``[draws / chunk, N]``."""
    generator = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(draws // chunk):
        eps = guided_perturbations(chunk, N, basis, alpha, sigma, generator, dtype=torch.float64)
        means.append(antithetic_estimate(eps, f(theta + eps), f(theta - eps), sigma))
    return torch.stack(means)


def test_isotropic_estimate_is_unbiased_on_a_quadratic():
    f, theta, g = _quadratic()
    means = _batch_means(f, theta, None, alpha=1.0, sigma=0.1, draws=200_000, chunk=2000)
    standard_error = means.std(0) / len(means) ** 0.5
    # stated tolerance: within 5 standard errors in every coordinate (a false alarm is < 1e-5)
    assert ((means.mean(0) - g).abs() <= 5 * standard_error).all(), (means.mean(0), g)
    assert (means.mean(0) - g).norm() < 0.05 * g.norm()


def test_guided_estimate_has_expectation_sigma_g():
    f, theta, g = _quadratic()
    generator = torch.Generator().manual_seed(3)
    basis = orthonormal_basis(torch.randn(2, N, generator=generator, dtype=torch.float64))
    alpha = 0.3
    expected = guided_covariance(basis, N, alpha) @ g  # float64: Σ = alpha I + (1 - alpha)(n/k) U Uᵀ
    means = _batch_means(f, theta, basis, alpha, sigma=0.1, draws=200_000, chunk=2000)
    standard_error = means.std(0) / len(means) ** 0.5
    assert ((means.mean(0) - expected).abs() <= 5 * standard_error).all(), (means.mean(0), expected)
    assert not torch.allclose(expected, g, rtol=0.1)  # the guided expectation is not the gradient itself


def test_covariance_of_the_draws_is_the_stated_one():
    generator = torch.Generator().manual_seed(4)
    basis = orthonormal_basis(torch.randn(3, N, generator=generator, dtype=torch.float64))
    eps = guided_perturbations(200_000, N, basis, 0.4, 0.5, generator, dtype=torch.float64)
    empirical = eps.T @ eps / len(eps)
    stated = 0.5 ** 2 * guided_covariance(basis, N, 0.4) / N  # sigma² C
    torch.testing.assert_close(empirical, stated, atol=3e-3, rtol=0)


def test_guidance_along_the_true_gradient_lowers_the_variance():
    """At equal population, an estimate guided by a basis spanning g errs less than isotropic ES
    (each normalised by its expected scale along g, so both are unbiased for g)."""
    n = 50
    generator = torch.Generator().manual_seed(5)
    g = torch.randn(n, generator=generator, dtype=torch.float64)

    def f(x):
        return x @ g  # linear: the antithetic difference is exact, only the sampling varies

    basis, alpha, population = (g / g.norm()).unsqueeze(1), 0.5, 4
    scale = alpha + (1 - alpha) * n  # E[ĝ] = Σ g = (alpha + (1 - alpha) n / k) g when g spans U (k = 1)
    errors = {}
    for name, u, a, c in (("isotropic", None, 1.0, 1.0), ("guided", basis, alpha, scale)):
        eps = guided_perturbations(4000 * population, n, u, a, 0.1, generator, dtype=torch.float64)
        eps = eps.view(4000, population, n)
        estimates = torch.stack([antithetic_estimate(e, f(e), f(-e), 0.1) for e in eps]) / c
        errors[name] = (estimates - g).pow(2).sum(1).mean()
    assert errors["guided"] < 0.1 * errors["isotropic"], errors


def test_selection_decreases_a_quadratic_and_never_accepts_worse():
    target = torch.linspace(-1, 1, 10, dtype=torch.float64)

    def loss_of(v):
        return float((v - target).pow(2).sum())

    generator = torch.Generator().manual_seed(6)
    vector = torch.zeros(10, dtype=torch.float64)
    history = [loss_of(vector)]
    for _ in range(60):
        result = select(vector, 6, loss_of, gaussian_mutation(0.1), generator)
        assert loss_of(result.vector) <= result.losses[0] and result.losses[0] == history[-1]
        assert result.losses[result.winner] == min(result.losses) or result.winner == 0
        vector = result.vector
        history.append(loss_of(vector))
    assert all(b <= a for a, b in zip(history, history[1:], strict=False))
    assert history[-1] < 0.3 * history[0]
    at_optimum = select(target.clone(), 6, loss_of, gaussian_mutation(0.1), generator)
    assert at_optimum.winner == 0 and torch.equal(at_optimum.vector, target)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3))


def test_probe_restores_parameters_buffers_grads_and_random_state_exactly():
    model = _net()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    buffers = [b.clone() for b in model.buffers()]
    grads = [p.grad for p in params]
    offsets = [torch.randn_like(p) for p in params]
    rng = torch.get_rng_state()
    with LossProbe(model, params, lambda: nn.functional.cross_entropy(model(x), y)) as probe:
        plus, again = probe.at_offset(offsets, 1.0), probe.at_offset(offsets, 1.0)
        minus = probe.at_offset(offsets, -1.0)
        model.zero_grad()  # as a closure might
        probe.at([p + 1 for p in before])
    assert plus == again != minus  # common random numbers: the same dropout mask every evaluation
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3))


def _batches(n: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator))
            for _ in range(n)]


def _closure(model, optimizer, loss_fn, x, y):
    """A torch.optim closure that back-propagates only when gradients are on (ES evaluations
    call it under ``no_grad``)."""
    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss
    return closure


def _train_with_closure(model, optimizer, batches, loss_fn=nn.functional.cross_entropy) -> list[float]:
    return [float(optimizer.step(_closure(model, optimizer, loss_fn, x, y)).detach()) for x, y in batches]


def test_es_with_zero_weight_leaves_the_base_trajectory_bit_for_bit():
    """Every ES evaluation (with dropout in the model) leaves parameters, gradients and the
    random stream as they were: with es_weight=0 RIBBED is exactly its base."""
    ours, theirs = _mlp(), _mlp()
    batches = _batches(15)
    optimizer = RIBBED(ours, lr=1e-2, controllers=False, es_every=1, es_weight=0.0, es_population=3)
    torch.manual_seed(9)  # the same dropout masks for both runs
    _train_with_closure(ours, optimizer, batches)
    torch.manual_seed(9)
    _train_with_closure(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=True), batches)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
    assert "es_cosine" in optimizer.telemetry()


def test_es_without_closure_or_batch_is_a_clear_error():
    model = _mlp()
    optimizer = RIBBED(model, lr=1e-2, es_every=1)
    nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(RuntimeError, match=r"es_every.*closure.*keep-batch"):
        optimizer.step()


def test_pure_es_direction_still_descends():
    """With es_weight=1 the gradient is replaced by the guided estimate; a regression still fits."""
    torch.manual_seed(7)
    model = nn.Linear(5, 1)
    x = torch.randn(128, 5)
    y = x @ torch.randn(5, 1) + 0.5
    optimizer = RIBBED(model, lr=0.1, base="sgd", controllers=False, es_every=1, es_weight=1.0, es_alpha=0.2,
                       es_subspace=2, es_population=4, es_sigma=1e-3)
    losses = _train_with_closure(model, optimizer, [(x, y)] * 60, nn.functional.mse_loss)
    assert losses[-1] < 0.05 * losses[0], losses[::10]
    assert optimizer.telemetry()["es_cosine"] > 0.5


def test_selection_in_ribbed_never_takes_a_worse_trial_step():
    model = _mlp()
    optimizer = RIBBED(model, lr=1e-2, feature_every=2, evolve_every=2, evolve_population=4, evolve_sigma=0.5)
    accepted = 0
    for x, y in _batches(20):
        nn.functional.cross_entropy(model(x), y).backward()
        record_batch(model, x, y, nn.functional.cross_entropy)
        optimizer.step()
        optimizer.zero_grad()
        telemetry = optimizer.telemetry()
        if "evolve_gain" in telemetry:
            assert telemetry["evolve_gain"] >= 0
            accepted += telemetry["evolve_accepted"]
    assert accepted > 0  # guard: selection did replace the bank at least once


def test_state_dict_round_trip_with_es_and_selection():
    settings = {"es_every": 2, "es_population": 2, "evolve_every": 3, "evolve_population": 3, "feature_every": 3}

    def make_optimizer(model):
        optimizer = RIBBED(model, lr=1e-2, **settings)
        torch.manual_seed(9)  # after building: the bank's initialisation draws from the global stream
        return optimizer

    assert_resume_matches_uninterrupted(_mlp, make_optimizer, _train_with_closure, _batches(16), split=7)


@pytest.mark.parametrize("kwargs, field", [
    ({"es_every": -1}, "es_every"), ({"es_alpha": 1.5}, "es_alpha"), ({"es_sigma": 0}, "es_sigma"),
    ({"es_weight": 2}, "es_weight"), ({"es_subspace": 0}, "es_subspace"), ({"es_population": 0}, "es_population"),
    ({"evolve_population": 1}, "evolve_population"), ({"evolve_every": 1, "controllers": False}, "evolve_every"),
])
def test_bad_es_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RIBBED(_mlp(), lr=1e-3, **kwargs)


def test_ribbed_with_es_trains_in_the_loop_with_keep_batch(tiny_config):
    config = tiny_config(
        optimizer={"name": "ribbed", "lr": 0.01,
                   "options": {"es_every": 5, "es_population": 2, "evolve_every": 10, "evolve_population": 3}},
        train={"steps": 40, "eval_every": 20, "gradient_method": "keep-batch"},
    )
    result = train(build_run(config, load_dataset("digits")))
    assert result.status == "completed" and result.final["test_acc"] > 0.5


def test_every_research_piece_composes_with_density_and_grouping():
    """ES, selection and unrolled training with the information density on: trial evaluations
    and the unroll pause the forward-hook recorders, and every piece reports in telemetry."""
    model = _mlp()
    optimizer = RIBBED(model, lr=1e-2, feature_every=2, density_every=3, es_every=2, es_population=2,
                       evolve_every=2, evolve_population=3, controller_training="unrolled", unroll_steps=1,
                       chiral_gamma=0.05)
    for x, y in _batches(8):
        optimizer.observe_labels(y)
        nn.functional.cross_entropy(model(x), y).backward()
        record_batch(model, x, y, nn.functional.cross_entropy)
        optimizer.step()
        optimizer.zero_grad()
    telemetry = optimizer.telemetry()
    assert {"es_cosine", "evolve_gain", "unrolled_loss"} <= telemetry.keys()
    assert any(key.startswith("density_") for key in telemetry)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- chirality signs


def _chiral_setup(graph: str = "ring", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A three-layer MLP with random gradients and a refreshed chiral term (default signs)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 4)).to(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    layers = find_neuron_layers(model, set(model.parameters()), hooks=False)
    term = ChiralTerm(0.4, graph, neighbours=3)
    term.refresh(layers, torch.Generator().manual_seed(seed))
    return model, layers, term


def _rotated(layers, term, signs) -> list[torch.Tensor]:
    """Each parameter's gradient after ``term`` with ``signs`` (the gradients are put back)."""
    before = [p.grad.clone() for layer in layers for p in layer.params]
    term.signs = signs
    term.apply(layers)
    after = [p.grad.clone() for layer in layers for p in layer.params]
    for p, g in zip([p for layer in layers for p in layer.params], before, strict=True):
        p.grad.copy_(g)
    return after


@pytest.mark.parametrize("graph", CHIRAL_GRAPHS)
def test_default_signs_are_the_single_handed_term_bit_for_bit(graph):
    _, layers, term = _chiral_setup(graph)
    assert torch.equal(term.signs, torch.ones(3, dtype=torch.int8))
    expected = []
    for layer, neighbours in zip(layers, term.structure, strict=True):  # the term before per-layer signs
        for p in layer.params:
            rows = p.grad.clone().view(layer.n, -1)
            expected.append(add_skew_(rows, rows.clone(), neighbours, graph != "knn", term.gamma).view_as(p))
    assert all(torch.equal(a, b) for a, b in zip(_rotated(layers, term, term.signs), expected, strict=True))


def test_a_negative_layer_sign_is_minus_gamma_for_that_layer_only():
    _, layers, term = _chiral_setup()
    mixed = _rotated(layers, term, torch.tensor([1, -1, 1], dtype=torch.int8))
    plus = _rotated(layers, term, torch.ones(3, dtype=torch.int8))
    term.gamma = -term.gamma
    minus = _rotated(layers, term, torch.ones(3, dtype=torch.int8))
    # two parameters (weight, bias) per layer: layer 1 is entries 2 and 3
    assert all(torch.equal(mixed[i], (minus if i in (2, 3) else plus)[i]) for i in range(6))
    assert not torch.equal(mixed[2], plus[2])  # guard: the flipped layer did change


@pytest.mark.parametrize("graph", CHIRAL_GRAPHS)
def test_mixed_signs_keep_the_term_orthogonal_to_the_gradient(graph):
    for seed in range(5):
        _, layers, term = _chiral_setup(graph, seed, torch.float64)
        term.gamma = 1.0  # then the change of layer l's gradient is s_l J g
        signs = torch.where(torch.rand(3, generator=torch.Generator().manual_seed(seed)) < 0.5, -1, 1)
        after = _rotated(layers, term, signs.to(torch.int8))
        for i, layer in enumerate(layers):
            g = torch.cat([p.grad.reshape(layer.n, -1) for p in layer.params], 1)
            change = torch.cat([after[2 * i + j].reshape(layer.n, -1) for j in range(2)], 1) - g
            assert change.abs().max() > 0
            assert abs(float((g * change).sum())) <= 1e-6 * float((g * g).sum())


def _separable_target(model, layers, term, best_signs, lr):
    """Parameters after an SGD step with ``best_signs`` (computed with ``skew_apply``): the loss
    ``|theta - target|²`` is 0 for ``best_signs`` and grows with each layer of the other handedness."""
    target = []
    for layer, neighbours, sign in zip(layers, term.structure, best_signs.tolist(), strict=True):
        for p in layer.params:
            rows = p.grad.view(layer.n, -1)
            rotated = rows + sign * term.gamma * skew_apply(rows, neighbours, ring=term.graph != "knn")
            target.append((p.detach() - lr * rotated.view_as(p)).clone())
    params = list(model.parameters())
    return lambda: sum((p - t).pow(2).sum() for p, t in zip(params, target, strict=True))


def test_sign_selection_never_accepts_worse_and_finds_the_better_handedness():
    model, layers, term = _chiral_setup()
    best = torch.tensor([1, -1, 1], dtype=torch.int8)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = _separable_target(model, layers, term, best, lr=0.1)
    generator = torch.Generator().manual_seed(0)
    previous = None
    for _ in range(10):
        with LossProbe(model, list(model.parameters()), loss) as probe:
            result = evolve_chirality(term, layers, probe, sgd, sgd.step, population=3, generator=generator)
        assert result.losses[result.winner] <= result.losses[0]
        assert result.winner == 0 or result.losses[result.winner] < result.losses[0]
        assert previous is None or result.losses[0] == previous  # the incumbent scores the same again
        assert term.last["chiral_evolve_gain"] >= 0
        previous = result.losses[result.winner]
        if torch.equal(term.signs, best):
            break
    assert torch.equal(term.signs, best), term.signs
    assert previous < 1e-10 and term.last["chiral_signs_positive_share"] == pytest.approx(2 / 3)


def _state_copy(optimizer) -> tuple[dict, list[dict]]:
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}
    return state, [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


@pytest.mark.parametrize("make_base, warm_steps", [
    (lambda params: torch.optim.AdamW(params, lr=1e-2), 2),
    (lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9), 0),  # the trial step creates the state
])
def test_sign_trials_restore_parameters_grads_and_base_state_and_the_winner_is_the_real_step(make_base, warm_steps):
    model, layers, term = _chiral_setup()
    base = make_base(model.parameters())
    x, y = torch.randn(16, 5), torch.randint(0, 4, (16,))
    for _ in range(warm_steps):
        base.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        base.step()
    base.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    params, groups = list(model.parameters()), base.param_groups
    before, grads = [p.detach().clone() for p in params], [p.grad.clone() for p in params]
    state, hyper = _state_copy(base)
    state_tensors = {p: dict(s) for p, s in base.state.items()}

    def loss():
        return nn.functional.cross_entropy(model(x), y)

    with LossProbe(model, params, loss) as probe:
        result = evolve_chirality(term, layers, probe, base, base.step, population=5,
                                  generator=torch.Generator().manual_seed(1))
    assert probe.evaluations == 5
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
    assert base.param_groups is groups and _state_copy(base)[1] == hyper
    assert base.state.keys() == state.keys()
    for p, saved in state.items():
        assert base.state[p].keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(base.state[p][key], value) and base.state[p][key] is state_tensors[p][key]
    term.apply(layers)
    base.step()
    with torch.no_grad():
        assert float(loss()) == result.losses[result.winner]


def _plain_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def test_chirality_selection_in_ribbed_takes_the_winners_trial_step():
    model = _plain_mlp()
    optimizer = RIBBED(model, lr=1e-2, controllers=False, chiral_gamma=2.0, evolve_every=2, evolve_chirality=True,
                       evolve_population=4)
    flips = 0.0
    for step, (x, y) in enumerate(_batches(12)):
        closure = _closure(model, optimizer, nn.functional.cross_entropy, x, y)
        optimizer.step(closure)
        telemetry = optimizer.telemetry()
        if step % 2 == 0:
            with torch.no_grad():
                assert float(closure()) == telemetry["chiral_evolve_loss"]
            assert telemetry["chiral_evolve_gain"] >= 0
            flips += telemetry["chiral_sign_flips"]
    assert flips > 0  # guard: selection did change a handedness
    assert telemetry["chiral_signs_positive_share"] == float((optimizer.chiral.signs > 0).double().mean())


@pytest.mark.parametrize("controllers", [False, True])
def test_state_dict_round_trip_with_chirality_selection(controllers):
    settings = {"controllers": controllers, "chiral_gamma": 2.0, "evolve_every": 2, "evolve_chirality": True,
                "evolve_population": 3, "feature_every": 3}

    def make_optimizer(model):
        optimizer = RIBBED(model, lr=1e-2, **settings)
        torch.manual_seed(9)
        return optimizer

    whole, resumed = assert_resume_matches_uninterrupted(_plain_mlp, make_optimizer, _train_with_closure,
                                                         _batches(12), split=5)
    assert torch.equal(whole.chiral.signs, resumed.chiral.signs)


@pytest.mark.parametrize("kwargs, message", [
    ({"evolve_chirality": True, "chiral_gamma": 0.1}, r"evolve_chirality: got True with evolve_every=0; allowed"),
    ({"evolve_chirality": True, "evolve_every": 2}, r"evolve_chirality: got True with chiral_gamma=0.0; allowed"),
    ({"evolve_chirality": 1, "evolve_every": 2, "chiral_gamma": 0.1}, r"evolve_chirality: got 1; allowed: True or"),
    ({"evolve_every": 2, "controllers": False, "chiral_gamma": 0.1}, r"evolve_every: got 2 .*allowed"),
])
def test_bad_chirality_settings_name_field_value_and_rule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RIBBED(_mlp(), lr=1e-3, **kwargs)


def test_bad_signs_and_flips_name_field_value_and_rule():
    with pytest.raises(ValueError, match=r"chiral signs: got \[1, 0, -1\]; allowed: a 1-D tensor of \+1/-1"):
        ChiralTerm(0.1, signs=torch.tensor([1, 0, -1]))
    _, layers, _ = _chiral_setup()
    with pytest.raises(ValueError, match=r"chiral signs: got \[1, -1\]; allowed: .*3 entries"):
        ChiralTerm(0.1, signs=torch.tensor([1, -1])).refresh(layers, torch.Generator())
    with pytest.raises(ValueError, match=r"max_flips: got 0; allowed: an integer >= 1"):
        sign_flip_mutation(0)
