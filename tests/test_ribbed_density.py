"""Information density: estimators against references and properties, RIBBED's logging and
reward, and the ``information-density`` training plug-in."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import mutual_info_score
from torch import nn

from ribbed.core import RIBBED
from ribbed.core.density import (
    InformationDensity,
    binned_mutual_information,
    effective_rank,
    hoyer_sparsity,
    singular_values,
)
from ribbed.core.layers import bin_indices, binned_entropy, find_neuron_layers
from ribbed.train import build_run, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- estimators


def test_entropy_of_a_uniform_spread_is_log_bins():
    bins = 8
    centres = torch.arange(bins, dtype=torch.float64).repeat(50) + 0.5
    columns = torch.stack([centres, 3 * centres - 7, centres[torch.randperm(len(centres), generator=_generator())]], 1)
    torch.testing.assert_close(binned_entropy(columns, bins), torch.full((3,), math.log(bins), dtype=torch.float64))


def test_mutual_information_of_independent_variables_is_near_zero():
    """Bound: for independent A, Y the plug-in ``2 S I`` is chi-squared with
    ``df = (bins-1)(classes-1)`` degrees of freedom (G-test), so its mean is ``df/(2S)`` and its
    sd ``sqrt(2 df)/(2S)``. Miller-Madow removes the mean: every neuron lies within 6 sd of 0,
    the average within 1 sd, and the plug-in average sits at the chi-squared mean."""
    size, bins, classes, neurons = 4000, 8, 4, 64
    samples = torch.randn(size, neurons, generator=_generator(), dtype=torch.float64)
    labels = torch.randint(classes, (size,), generator=_generator(1))
    df = (bins - 1) * (classes - 1)
    sd = math.sqrt(2 * df) / (2 * size)
    corrected = binned_mutual_information(samples, labels, bins)
    plug_in = binned_mutual_information(samples, labels, bins, correction="none")
    assert corrected.abs().max() < 6 * sd
    assert abs(float(corrected.mean())) < sd
    assert float(plug_in.mean()) == pytest.approx(df / (2 * size), rel=0.2)


def test_mutual_information_with_a_function_of_the_activation_is_the_label_entropy():
    size, bins = 3000, 8
    samples = torch.rand(size, 5, generator=_generator(), dtype=torch.float64)
    labels = bin_indices(samples, bins)[:, 2] // 2
    counts = torch.bincount(labels).double()
    label_entropy = float(scipy_entropy(counts.numpy()))
    plug_in = binned_mutual_information(samples, labels, bins, correction="none")
    assert float(plug_in[2]) == pytest.approx(label_entropy, abs=1e-9)
    corrected = binned_mutual_information(samples, labels, bins)
    assert float(corrected[2]) == pytest.approx(label_entropy + (len(counts) - 1) / (2 * size), abs=1e-9)
    assert (plug_in[[0, 1, 3, 4]] < 0.05).all()


def test_vectorised_estimators_equal_a_per_neuron_reference_loop():
    size, bins, neurons = 500, 10, 12
    samples = torch.randn(size, neurons, generator=_generator(), dtype=torch.float64)
    samples[:, 3] = 2.5
    samples[:, 5] = torch.relu(samples[:, 5])
    labels = (samples[:, 0] > 0).long() + 2 * (samples[:, 1] > 0.5).long()
    entropy = binned_entropy(samples, bins)
    information = binned_mutual_information(samples, labels, bins, correction="none")
    corrected = binned_mutual_information(samples, labels, bins)
    hoyer = hoyer_sparsity(samples)
    for j in range(neurons):
        column = samples[:, j].numpy()
        low, span = column.min(), max(column.max() - column.min(), 1e-12)
        binned = np.clip(np.floor((column - low) / span * bins).astype(int), 0, bins - 1)
        assert float(entropy[j]) == pytest.approx(scipy_entropy(np.bincount(binned, minlength=bins)), abs=1e-10)
        reference = mutual_info_score(labels.numpy(), binned)
        assert float(information[j]) == pytest.approx(reference, abs=1e-10)
        joint = {(a, y) for a, y in zip(binned.tolist(), labels.tolist(), strict=True)}
        bias = (len(joint) - len(set(binned.tolist())) - len(set(labels.tolist())) + 1) / (2 * size)
        assert float(corrected[j]) == pytest.approx(reference - bias, abs=1e-10)
        norm1, norm2 = np.abs(column).sum(), np.sqrt((column ** 2).sum())
        expected = (math.sqrt(size) - norm1 / norm2) / (math.sqrt(size) - 1)
        assert float(hoyer[j]) == pytest.approx(max(expected, 0.0), abs=1e-10)


def test_hoyer_sparsity_of_one_hot_constant_and_dead_neurons():
    samples = torch.zeros(50, 4, dtype=torch.float64)
    samples[7, 0] = 3.0
    samples[:, 1] = -1.5
    samples[:, 3] = torch.linspace(-1, 1, 50, dtype=torch.float64)
    hoyer = hoyer_sparsity(samples)
    assert float(hoyer[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(hoyer[1]) == pytest.approx(0.0, abs=1e-12)
    assert float(hoyer[2]) == 1.0
    assert 0.0 < float(hoyer[3]) < 1.0


def test_effective_rank_of_identity_rank_one_and_batches():
    n = 6
    assert float(effective_rank(torch.eye(n, dtype=torch.float64))) == pytest.approx(n, abs=1e-10)
    u, v = torch.randn(20, 1, dtype=torch.float64), torch.randn(1, n, dtype=torch.float64)
    assert float(effective_rank(u @ v)) == pytest.approx(1.0, abs=1e-6)
    batch = torch.stack([torch.eye(n, dtype=torch.float64), torch.diag(torch.tensor([1.0, 1, 0, 0, 0, 0],
                                                                                dtype=torch.float64))])
    torch.testing.assert_close(effective_rank(batch), torch.tensor([float(n), 2.0], dtype=torch.float64))
    assert float(effective_rank(torch.zeros(3, 3))) == 0.0
    for shape in ((30, 8), (8, 30)):
        matrix = torch.randn(*shape, generator=_generator(), dtype=torch.float64)
        sigma = torch.linalg.svdvals(matrix)
        p = sigma / sigma.sum()
        assert float(effective_rank(matrix)) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-10)


def test_gram_singular_values_match_the_svd():
    matrix = torch.randn(3, 40, 12, generator=_generator(), dtype=torch.float64)
    torch.testing.assert_close(singular_values(matrix).flip(-1), torch.linalg.svdvals(matrix))
    torch.testing.assert_close(singular_values(matrix.mT).flip(-1), torch.linalg.svdvals(matrix))


@pytest.mark.parametrize(("call", "field"), [
    (lambda: binned_mutual_information(torch.randn(9, 2), torch.zeros(9, dtype=torch.long), 0), "bins"),
    (lambda: binned_mutual_information(torch.randn(9, 2), torch.zeros(9), 4), "labels"),
    (lambda: binned_mutual_information(torch.randn(9, 2), torch.zeros(8, dtype=torch.long), 4), "labels"),
    (lambda: binned_mutual_information(torch.randn(9, 2), -torch.ones(9, dtype=torch.long), 4), "labels"),
    (lambda: binned_mutual_information(torch.randn(9, 2), torch.zeros(9, dtype=torch.long), 4,
                                       correction="jackknife"), "correction"),
    (lambda: hoyer_sparsity(torch.randn(1, 3)), "samples"),
    (lambda: RIBBED(nn.Linear(2, 2), density_every=-1), "density_every"),
    (lambda: RIBBED(nn.Linear(2, 2), density_every=5, density_reward=-1.0), "density_reward"),
    (lambda: RIBBED(nn.Linear(2, 2), controllers=False, density_every=5, density_reward=0.1), "density_reward"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# ---------------------------------------------------------------- the probe and RIBBED


def _conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8, 3))


def test_probe_matches_labels_to_conv_positions_and_micro_batches():
    model = _conv_net()
    layers = find_neuron_layers(model, set(model.parameters()), hooks=False)
    probe = InformationDensity(layers, bins=6)
    x = torch.randn(32, 1, 8, generator=_generator())
    y = torch.randint(3, (32,), generator=_generator(1))
    probe.arm(True)
    model(x[:16]), model(x[16:])
    probe.observe_labels(y)
    assert probe.measure()
    probe.arm(False)
    conv_rows = model[0](x).detach().movedim(1, -1).reshape(-1, 4)
    expected = binned_mutual_information(conv_rows, y.repeat_interleave(8), 6)
    torch.testing.assert_close(probe.values["mutual_information"][:4], expected)
    assert probe.values["mutual_information"].shape == (4 + 3,)
    assert probe.values["effective_rank"].shape == (2,)
    assert not probe.measure(), "outputs are forgotten once measured"


def test_probe_keeps_outputs_before_an_in_place_activation():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True))
    probe = InformationDensity(find_neuron_layers(model, set(model.parameters()), hooks=False))
    probe.arm(True)
    x = torch.randn(40, 3, generator=_generator())
    model(x)
    probe.arm(False)
    probe.measure()
    torch.testing.assert_close(probe.values["hoyer"], hoyer_sparsity(model[0](x).detach()))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(optimizer, model, steps: int, labels: bool = True) -> None:
    data = torch.randn(64, 6, generator=_generator(2))
    target = (data[:, 0] > 0).long() + (data[:, 1] > 0).long()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(data), target)
        loss.backward()
        if labels:
            optimizer.observe_labels(target)
        optimizer.step()
        optimizer.zero_grad()


def test_measuring_density_leaves_the_base_update_unchanged():
    model, reference = _mlp(), _mlp()
    ribbed = RIBBED(model, lr=1e-2, controllers=False, density_every=3)
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    _train(ribbed, model, 20)
    _train(adamw, reference, 20, labels=False)
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    row = ribbed.telemetry()
    assert {"density_entropy", "density_hoyer", "density_mutual_information",
            "density_effective_rank.0", "density_effective_rank.2"} <= set(row)
    assert ribbed.density.measurements == 7, "steps 0, 3, ..., 18"
    assert row["density_mutual_information"] > 0.05, "the trained hidden layer carries label information"


def test_without_labels_density_has_no_mutual_information():
    model = _mlp()
    optimizer = RIBBED(model, lr=1e-2, density_every=2)
    _train(optimizer, model, 4, labels=False)
    row = optimizer.telemetry()
    assert "density_entropy" in row and "density_mutual_information" not in row
    assert not any(key.startswith("density") for key in RIBBED(_mlp(), lr=1e-2).telemetry())


def test_density_reward_favours_informative_neurons():
    model = _mlp()
    optimizer = RIBBED(model, lr=1e-2, density_every=1, density_reward=1.0)
    _train(optimizer, model, 3)
    information = optimizer.density.values["mutual_information"]
    multiplier = torch.ones(len(information), requires_grad=True)
    optimizer.density.reward_loss(multiplier).backward()
    above = information > information.mean()
    assert (multiplier.grad[above] < 0).all() and (multiplier.grad[~above] > 0).all()
    _train(optimizer, model, 10)
    assert math.isfinite(optimizer.telemetry()["ribbed_controller_loss"])


def test_state_dict_round_trip_keeps_the_density():
    model = _mlp()
    optimizer = RIBBED(model, lr=1e-2, density_every=2)
    _train(optimizer, model, 5)
    copy = RIBBED(model, lr=1e-2, density_every=2)
    copy.load_state_dict(optimizer.state_dict())
    assert copy.telemetry() == optimizer.telemetry()
    assert copy.density.recording == optimizer.density.recording


# ---------------------------------------------------------------- the training plug-in


@pytest.mark.parametrize("optimizer", [
    {"name": "adamw", "lr": 0.01},
    {"name": "ribbed", "lr": 0.01, "options": {"density_every": 10}},
])
def test_plugin_puts_density_in_the_metrics_rows(tiny_config, optimizer):
    config = tiny_config(optimizer=optimizer, train={"steps": 30, "eval_every": 15, "plugins": [
        {"name": "information-density", "options": {"every": 10}}]})
    history = train(build_run(config)).history
    assert len(history) == 2
    for row in history:
        assert row["density_mutual_information"] > 0.02
        assert 0 < row["density_hoyer"] < 1
        assert row["density_effective_rank.blocks.0.0"] > 1


def test_plugin_rejects_bad_options(tiny_config):
    config = tiny_config(train={"plugins": [{"name": "information-density", "options": {"every": 0}}]})
    with pytest.raises(ValueError, match="every"):
        build_run(config)
