"""Research tools: Hessian spectra, loss-landscape slices, concrete dropout, Net2Net growth, the study."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ribbed.config import StudyConfig
from ribbed.data import Split, load_dataset
from ribbed.nn import build_model, pop_aux_loss
from ribbed.research import (
    ConcreteDropout,
    HessianOperator,
    concrete_dropout_rates,
    deepen,
    filter_normalized_direction,
    interpolation,
    lanczos_top_eigenvalues,
    power_iteration,
    slice_1d,
    slice_2d,
    surface,
    top_eigenvalues,
    widen,
)
from ribbed.train import Precision, build_run, evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def _explicit_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The full Hessian of the cross-entropy in the flat parameter vector (the reference)."""
    names, params = zip(*model.named_parameters(), strict=True)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    sizes = [p.numel() for p in params]

    def loss(vector):
        pieces = [piece.reshape(p.shape) for piece, p in zip(vector.split(sizes), params, strict=True)]
        return F.cross_entropy(functional_call(model, dict(zip(names, pieces, strict=True)), (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


@pytest.fixture(scope="module")
def hessian_case():
    model = _tiny_net()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (24,), generator=generator)
    hessian = _explicit_hessian(model, x, y)
    return model, x, y, torch.linalg.eigvalsh(hessian), hessian


def test_hessian_vector_products_equal_the_explicit_hessian(hessian_case):
    model, x, y, _, hessian = hessian_case
    hvp = HessianOperator(model, F.cross_entropy, x, y)
    vector = torch.randn(hvp.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(hvp(vector), hessian @ vector, rtol=1e-10, atol=1e-12)


def test_power_iteration_finds_the_dominant_eigenvalue(hessian_case):
    model, x, y, eigenvalues, _ = hessian_case
    dominant = eigenvalues[eigenvalues.abs().argmax()]
    value, vector = power_iteration(HessianOperator(model, F.cross_entropy, x, y), iterations=2000, tol=1e-12)
    assert value == pytest.approx(float(dominant), rel=1e-6)
    assert float(vector.norm()) == pytest.approx(1.0)


def test_lanczos_top_eigenvalues_match_eigvalsh(hessian_case):
    model, x, y, eigenvalues, _ = hessian_case
    top = lanczos_top_eigenvalues(HessianOperator(model, F.cross_entropy, x, y), 4, tol=1e-12)
    torch.testing.assert_close(torch.from_numpy(top), eigenvalues.flip(0)[:4], rtol=1e-8, atol=1e-10)


def test_parameters_unused_in_evaluation_get_zero_curvature():
    torch.manual_seed(0)
    model = build_model("mlp-dropout", input_shape=(6,), num_classes=3, hidden=(4,), dropout="concrete").double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    hvp = HessianOperator(model, F.cross_entropy, x, y)
    names = [name for name, _ in model.named_parameters()]
    offsets = torch.tensor([0, *[p.numel() for p in model.parameters()]]).cumsum(0)
    rate = offsets[names.index("head.dropout.rate_logit")]
    column = hvp(torch.nn.functional.one_hot(rate, hvp.dim).double())
    assert not column.any(), "the identity dropout of evaluation mode has no curvature"
    assert hvp(torch.ones(hvp.dim, dtype=torch.float64)).abs().sum() > 0


def test_eigenvalue_settings_are_checked(hessian_case):
    model, x, y, _, _ = hessian_case
    hvp = HessianOperator(model, F.cross_entropy, x, y)
    with pytest.raises(ValueError, match=r"k: got 2 with method 'power'; allowed: 1"):
        top_eigenvalues(hvp, 2, method="power")
    with pytest.raises(ValueError, match=r"method: got 'arnoldi'; allowed: power, lanczos"):
        top_eigenvalues(hvp, 1, method="arnoldi")
    with pytest.raises(ValueError, match=r"k: got 44; allowed: 1 <= k < number of parameters \(44\)"):
        lanczos_top_eigenvalues(hvp, 44)


def test_hessian_tracker_reports_each_evaluation_and_changes_nothing(tiny_config, digits):
    config = tiny_config(train={"steps": 20, "eval_every": 10})
    plain = train(build_run(config, digits))
    tracked_config = tiny_config(train={"steps": 20, "eval_every": 10, "plugins": [
        {"name": "hessian-spectrum", "options": {"k": 2, "method": "lanczos", "samples": 128}}]})
    tracked = train(build_run(tracked_config, digits))
    assert tracked.final == plain.final
    for row in tracked.history:
        assert math.isfinite(row["hessian_eig1"]) and row["hessian_eig1"] >= row["hessian_eig2"]
    with pytest.raises(ValueError, match=r"hessian-spectrum option k: got 3; allowed: 1 with method 'power'"):
        build_run(tiny_config(train={"plugins": [{"name": "hessian-spectrum", "options": {"k": 3}}]}), digits)


# ----------------------------------------------------------------------------- landscape


def _loss_at(model, data, vectors, coefficients):
    """Reference: the loss with parameters θ + Σ c·d set by functional_call, in float64."""
    params = dict(model.named_parameters())
    moved = {name: p + sum(c * v[i] for c, v in zip(coefficients, vectors, strict=True))
             for i, (name, p) in enumerate(params.items())}
    with torch.no_grad():
        return float(F.cross_entropy(functional_call(model, moved, (data.x,)), data.y))


def test_filter_normalised_direction_matches_filter_norms():
    model = build_model("cnn1d", input_shape=(40,), num_classes=10, channels=6)
    direction = filter_normalized_direction(model, generator=torch.Generator().manual_seed(0))
    for param, d in zip(model.parameters(), direction, strict=True):
        if param.dim() == 1:
            assert not d.any(), "biases get no direction"
            continue
        torch.testing.assert_close(d.flatten(1).norm(dim=1), param.detach().flatten(1).norm(dim=1))
        assert not torch.allclose(d, param.detach())
    unignored = filter_normalized_direction(model, generator=torch.Generator().manual_seed(0), ignore_1d=False)
    bias = list(model.parameters())[1]
    assert float(unignored[1].norm()) == pytest.approx(float(bias.detach().norm()), rel=1e-5)


def test_slices_equal_the_loss_at_the_moved_weights_and_restore_them():
    model = _tiny_net()
    generator = torch.Generator().manual_seed(3)
    data = Split(torch.randn(40, 3, generator=generator, dtype=torch.float64),
                 torch.randint(0, 4, (40,), generator=generator))
    before = [p.detach().clone() for p in model.parameters()]
    d = filter_normalized_direction(model, generator=generator)
    e = filter_normalized_direction(model, generator=generator)
    alphas = torch.linspace(-1, 1, 5)
    line = slice_1d(model, data, d, alphas, task="classification", batch_size=16)
    for alpha, loss in zip(alphas.tolist(), line.loss.tolist(), strict=True):  # evaluate() takes float32 logits
        assert loss == pytest.approx(_loss_at(model, data, [d], [alpha]), rel=1e-6)
    plane = slice_2d(model, data, (d, e), alphas, torch.linspace(-0.5, 0.5, 3), task="classification")
    assert plane.loss.shape == (5, 3)
    assert float(plane.loss[4, 0]) == pytest.approx(_loss_at(model, data, [d, e], [1.0, -0.5]), rel=1e-6)
    assert float(plane.loss[2, 1]) == pytest.approx(float(line.loss[2]), rel=1e-6)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    with pytest.raises(ValueError, match=r"coordinates: got shape \(3,\); allowed: \[points, 2\]"):
        surface(model, data, [d, e], torch.zeros(3), task="classification")


def test_interpolation_joins_the_two_models():
    start, end = _tiny_net(), _tiny_net()
    with torch.no_grad():
        for p in end.parameters():
            p.add_(0.5)
    generator = torch.Generator().manual_seed(4)
    data = Split(torch.randn(30, 3, generator=generator, dtype=torch.float64),
                 torch.randint(0, 4, (30,), generator=generator))
    curve = interpolation(start, end, data, torch.tensor([0.0, 1.0]), task="classification")
    precision = Precision("fp32", "cpu")
    for model, loss in zip((start, end), curve.loss.tolist(), strict=True):
        expected = evaluate(model, data, task="classification", batch_size=64, precision=precision,
                            device=torch.device("cpu"))["loss"]
        assert loss == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------- regularisation


def test_concrete_dropout_is_unbiased_identity_in_eval_and_has_a_rate_gradient():
    torch.manual_seed(0)
    dropout = ConcreteDropout(init_rate=0.3).double()
    x = torch.rand(200_000, dtype=torch.float64) + 0.5
    out = dropout(x)
    assert float(out.detach().mean() / x.mean()) == pytest.approx(1.0, abs=0.01)
    kept = (out.detach() * 0.7 / x).clamp(0, 1)  # 1 - z, the relaxed keep mask
    assert float((kept < 0.5).double().mean()) == pytest.approx(0.3, abs=0.01), "P(z > 1/2) = p"
    out.sum().backward()
    assert dropout.rate_logit.grad is not None and float(dropout.rate_logit.grad) != 0.0
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_concrete_dropout_regularizer_matches_the_paper_and_its_entropy_term_pushes_p_to_half():
    dropout = ConcreteDropout(init_rate=0.2).double()
    p = 0.2
    expected = 1e-3 * 7.0 / (1 - p) + 2e-2 * 5 * (p * math.log(p) + (1 - p) * math.log(1 - p))
    value = dropout.regularizer(torch.tensor(7.0, dtype=torch.float64), 5, 1e-3, 2e-2)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-7)
    optimizer = torch.optim.SGD(dropout.parameters(), lr=0.5)
    for _ in range(300):
        optimizer.zero_grad()
        dropout.regularizer(torch.tensor(0.0), 10, 0.0, 1.0).backward()
        optimizer.step()
    assert float(dropout.rate.detach()) == pytest.approx(0.5, abs=1e-3)


def test_mlp_dropout_sets_each_layer_and_learns_its_rates(tiny_config, digits):
    model = build_model("mlp-dropout", input_shape=(64,), num_classes=10, hidden=(32, 16),
                        dropout=[0.0, 0.25, "concrete"])
    assert [type(layer.dropout).__name__ for layer in (model.blocks[0][0], model.blocks[1][0], model.head)] == [
        "Dropout", "Dropout", "ConcreteDropout"]
    assert model.blocks[1][0].dropout.p == 0.25
    model.train()
    model(torch.randn(8, 64))
    assert pop_aux_loss(model) is not None, "the concrete dropout's regulariser is recorded"
    config = tiny_config(model={"name": "mlp-dropout", "options": {"hidden": [32], "dropout": "concrete"}},
                         train={"steps": 40, "eval_every": 20, "plugins": [{"name": "dropout-rates"}]})
    result = train(build_run(config, digits))
    assert result.final["val_acc"] > 0.7
    rates = [row["dropout_rate/head.dropout"] for row in result.history]
    assert rates[-1] != pytest.approx(0.1, abs=1e-4), "the rate is learned"
    assert concrete_dropout_rates(result.model) == {"head.dropout": pytest.approx(rates[-1])}


@pytest.mark.parametrize(("dropout", "message"), [
    ([0.1, 0.2], r"dropout=\[0.1, 0.2\]; allowed: one entry, or a list of 3"),
    (1.0, r"dropout=1.0; allowed: a rate 0 <= rate < 1 or 'concrete'"),
    ("gaussian", r"dropout='gaussian'; allowed: a rate"),
])
def test_bad_dropout_settings_name_the_value(dropout, message):
    with pytest.raises(ValueError, match=message):
        build_model("mlp-dropout", input_shape=(8,), num_classes=3, hidden=(4, 4), dropout=dropout)


def test_dropout_rates_plugin_needs_a_concrete_dropout(tiny_config, digits):
    with pytest.raises(ValueError, match=r"dropout-rates: model MLP has no concrete dropout"):
        build_run(tiny_config(train={"plugins": [{"name": "dropout-rates"}]}), digits)


# ----------------------------------------------------------------------------- Net2Net


def _mlp(activation: str = "relu") -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", input_shape=(6,), num_classes=4, hidden=(5, 7), activation=activation).double().eval()


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_widening_preserves_the_function(noise):
    model = _mlp()
    x = torch.randn(32, 6, dtype=torch.float64)
    before = model(x)
    mapping = widen(model, 0, 12, generator=torch.Generator().manual_seed(0), noise=noise)
    widen(model, 1, 9, generator=torch.Generator().manual_seed(1), noise=noise)
    assert model.blocks[0][0].weight.shape == (12, 6) and model.blocks[1][0].weight.shape == (9, 12)
    assert model.head.weight.shape == (4, 9) and model.blocks[1][0].in_features == 12
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    assert mapping[:5] == list(range(5)) and all(0 <= unit < 5 for unit in mapping[5:])
    copies = [j for j in range(5, 12)]
    columns = model.blocks[1][0].weight[:, copies]
    originals = model.blocks[1][0].weight[:, [mapping[j] for j in copies]]
    assert torch.allclose(columns, originals) == (noise == 0.0), "noise breaks the symmetry between copies"


def test_deepening_preserves_the_function_and_needs_relu():
    model = _mlp()
    x = torch.randn(32, 6, dtype=torch.float64)
    before = model(x)
    deepen(model, 1)
    assert len(model.blocks) == 3 and model.blocks[2][0].weight.shape == (7, 7)
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"net2net deepen: block 0 uses \['Tanh'\]; allowed: ReLU"):
        deepen(_mlp("tanh"), 0)
    with pytest.raises(ValueError, match=r"net2net: model Sequential cannot grow"):
        widen(nn.Sequential(nn.Linear(2, 2)), 0, 4)


def _gradients(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_widening_maps_gradients_and_optimizer_state_alike():
    """The grown net's gradient is the mapped old gradient, so SGD momentum maps exactly."""
    model = _mlp().train()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _gradients(model, x, y)
    optimizer.step()
    old_grads = _gradients(model, x, y)
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    mapping = torch.tensor(widen(model, 0, 9, optimizer=optimizer, generator=torch.Generator().manual_seed(0)))
    share = 1.0 / torch.bincount(mapping).double()[mapping]
    new_grads = _gradients(model, x, y)

    def mapped(tensors):
        weight0, bias0, weight1, *rest = tensors
        return [weight0[mapping] * share[:, None], bias0[mapping] * share, weight1[:, mapping], *rest]

    for new, expected in zip(new_grads, mapped(old_grads), strict=True):
        torch.testing.assert_close(new, expected, rtol=1e-10, atol=1e-12)
    for p, expected in zip(model.parameters(), mapped(momentum), strict=True):
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], expected)


def test_net2net_plugin_grows_on_schedule_and_on_plateau_and_replays(tiny_config, digits):
    scheduled = tiny_config(train={"steps": 20, "eval_every": 10, "plugins": [
        {"name": "net2net", "options": {"at_steps": [10], "factor": 1.5}}]})
    parts = build_run(scheduled, digits)
    result = train(parts)
    assert [row["net2net_growths"] for row in result.history] == [1.0, 1.0]
    assert [block[0].out_features for block in result.model.blocks] == [48, 48]
    assert result.final["val_acc"] > 0.6

    fresh = build_run(scheduled, digits)
    fresh.plugins[0].load_state_dict(parts.plugins[0].state_dict())
    fresh.model.load_state_dict(result.model.state_dict())
    fresh.optimizer.load_state_dict(parts.optimizer.state_dict())
    x = digits.val.x[:16]
    torch.testing.assert_close(fresh.model.eval()(x), result.model.eval()(x), rtol=0, atol=0)

    frozen = tiny_config(optimizer={"name": "sgd", "lr": 1e-9}, train={"steps": 12, "eval_every": 12, "plugins": [
        {"name": "net2net", "options": {"operation": "deepen", "plateau_patience": 2, "check_every": 3}}]})
    grown = train(build_run(frozen, digits))
    assert len(grown.model.blocks) == 3, "a loss that does not move is a plateau"
    assert grown.history[-1]["net2net_growths"] == 1.0


def test_net2net_options_are_checked(tiny_config, digits):
    with pytest.raises(ValueError, match=r"net2net options: give at_steps, plateau_patience or both"):
        build_run(tiny_config(train={"plugins": [{"name": "net2net"}]}), digits)
    with pytest.raises(ValueError, match=r"net2net option operation: got 'prune'; allowed: widen, deepen"):
        build_run(tiny_config(train={"plugins": [{"name": "net2net",
                                                  "options": {"operation": "prune", "at_steps": [1]}}]}), digits)


# ----------------------------------------------------------------------------- the study


def test_landscape_study_reports_tables_figures_and_findings(tmp_path):
    from ribbed.experiments.studies import run_study

    base = {"data": {"name": "digits", "batch_size": 64}, "model": {"name": "mlp", "options": {"hidden": [16]}},
            "train": {"steps": 30, "eval_every": 15}}
    config = StudyConfig(name="landscape-test", study="landscape", options={
        "base": base, "seeds": [0, 1],
        "optimizers": {"adamw": {"name": "adamw", "lr": 0.01}, "sgd": {"name": "sgd", "lr": 0.1}},
        "landscape_samples": 256, "slice_points": 5, "grid_points": 3, "hessian_samples": 128, "top_k": 2,
    })
    outcome = run_study(config, runs_dir=tmp_path)
    summary = outcome.summary
    assert [figure["alt"] for figure in summary["figures"]] == [
        "interpolation", "slice-1d", "slice-2d", "hessian-over-training", "hessian-spectrum"]
    for figure in summary["figures"]:
        assert (outcome.record.path / figure["file"]).read_bytes()[:4] == b"\x89PNG"
    curvature = summary["tables"][0]["rows"]
    assert [row[0] for row in curvature] == ["adamw", "sgd"]
    assert all(row[4] <= row[3] <= row[5] for row in curvature), "λ1 lies in its interval"
    eigenvalues = summary["data"]["eigenvalues"]
    assert all(len(per_seed) == 2 and per_seed[0][0] >= per_seed[0][1] for per_seed in eigenvalues.values())
    interpolation_loss = summary["data"]["interpolation"]["sgd"]["loss"]
    assert interpolation_loss[1] > interpolation_loss[3], "trained weights beat the initialisation"
    assert any("mean top eigenvalue is" in line and "Welch p" in line for line in summary["findings"])
    assert "Curvature of the trained models" in outcome.report_md.read_text()
    with pytest.raises(ValueError, match=r"options.seeds: got \[\]"):
        run_study(config.model_copy(update={"options": {**config.options, "seeds": []}}), runs_dir=tmp_path)
