"""Guided ES and selection: the estimator's expectation and variance, exact restoration, RIBBED use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ribbed import RIBBED
from ribbed.core.evolution import (
    LossProbe,
    antithetic_estimate,
    gaussian_mutation,
    guided_covariance,
    guided_perturbations,
    orthonormal_basis,
    select,
)
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
