"""Structure adaptation: the pruning schedule, masks that hold, gradient regrowth, density
guidance, and the learned activation mixture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ribbed.nn.activations import MIXTURE_FUNCTIONS, ActivationMixture
from ribbed.nn.cnn import CNN1d
from ribbed.nn.mlp import MLP
from ribbed.nn.registry import ModelError
from ribbed.plugins.structure import adapt_layer, cubic_sparsity, mixture_summary, neuron_rank
from ribbed.train import build_run, train

pytestmark = pytest.mark.usefixtures("one_thread")

STRUCTURE = {"name": "ribbed-structure", "options": {
    "final_sparsity": 0.7, "start_fraction": 0.1, "end_fraction": 0.6, "update_every": 5, "regrow_fraction": 0.1}}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- pruning and regrowth


def test_cubic_schedule_endpoints_and_monotonicity():
    values = [cubic_sparsity(t, 0.8, 10, 60) for t in range(0, 80)]
    assert values[10] == 0.0 and values[60] == pytest.approx(0.8) and values[79] == pytest.approx(0.8)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[35] == pytest.approx(0.8 * (1 - 0.5 ** 3))


def test_regrowth_picks_the_largest_gradient_inactive_connections():
    weight = torch.randn(6, 10, generator=_generator())
    grad = torch.randn(6, 10, generator=_generator(1))
    mask = (torch.rand(6, 10, generator=_generator(2)) > 0.5).float()
    weight *= mask
    live = int(mask.sum())
    new, pruned, regrown = adapt_layer(weight, grad, mask, torch.zeros(6), keep=live,
                                       regrow_fraction=0.2, density_weight=0.0)
    assert pruned == 0 and regrown == int(0.2 * live) and int(new.sum()) == live
    live_positions = [i for i in range(60) if mask.view(-1)[i] > 0]
    dropped = sorted(live_positions, key=lambda i: float(weight.abs().view(-1)[i]))[:regrown]
    candidates = [i for i in range(60) if i not in live_positions or i in dropped]
    grown = sorted(candidates, key=lambda i: -float(grad.abs().view(-1)[i]))[:regrown]
    expected = torch.zeros(60)
    expected[[i for i in live_positions if i not in dropped] + grown] = 1.0
    assert torch.equal(new.view(-1), expected)


def test_pruning_prefers_neurons_of_low_density():
    weight = torch.ones(4, 8)
    rank = neuron_rank(torch.tensor([0.9, 0.1, float("nan"), 0.5]))
    assert rank.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 2 / 3])
    new, pruned, _ = adapt_layer(weight, None, torch.ones(4, 8), rank, keep=16, regrow_fraction=0.0,
                                 density_weight=1.0)
    assert pruned == 16
    assert new.sum(1).tolist() == [8, 0, 0, 8], "rows of the two least informative neurons go first"


def _structure_run(tiny_config, **options):
    plugin = {"name": "ribbed-structure", "options": {**STRUCTURE["options"], **options}}
    config = tiny_config(optimizer={"name": "adamw", "lr": 0.01, "options": {"weight_decay": 0.1}},
                         train={"steps": 80, "eval_every": 40, "plugins": [plugin]})
    return build_run(config)


def test_sparsity_follows_the_schedule_and_pruned_weights_stay_zero(tiny_config):
    parts = _structure_run(tiny_config)
    plugin = parts.plugins[0]
    result = train(parts)
    assert plugin.start == 8 and plugin.end == 48
    steps = sorted({event["step"] for event in plugin.events})
    assert steps == list(range(8, 49, 5))
    for event in plugin.events:
        size = dict(zip(plugin.masks.module_names, plugin.masks.sizes, strict=True))[event["layer"]]
        expected = max(1, round((1 - cubic_sparsity(event["step"], 0.7, 8, 48)) * size))
        assert event["live"] == expected
    assert plugin.masks.sparsity() == pytest.approx(0.7, abs=0.01)
    for param, mask in zip(plugin.masks.params, plugin.masks.masks, strict=True):
        assert (param[mask == 0] == 0).all()
    assert plugin.regrown > 0 and plugin.pruned > 0
    assert result.history[-1]["weight_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert result.history[-1]["structure_events"] == len(plugin.events)
    assert result.history[-1]["val_acc"] > 0.85, "a 70%-sparse MLP still learns digits"


def test_magnitude_guide_needs_no_density_and_resumes_from_state(tiny_config):
    parts = _structure_run(tiny_config, guide="magnitude")
    train(parts)
    plugin = parts.plugins[0]
    assert plugin.probe is None
    copy = _structure_run(tiny_config, guide="magnitude").plugins[0]
    copy.load_state_dict(plugin.state_dict())
    assert copy.events == plugin.events and copy.masks.sparsity() == plugin.masks.sparsity()


@pytest.mark.parametrize(("options", "field"), [
    ({"final_sparsity": 1.0}, "final_sparsity"),
    ({"final_sparsity": -0.1}, "final_sparsity"),
    ({"start_fraction": 0.7, "end_fraction": 0.5}, "end_fraction"),
    ({"guide": "oracle"}, "guide"),
    ({"update_every": 0}, "update_every"),
    ({"density_weight": -1}, "density_weight"),
    ({"bins": 0}, "bins"),
])
def test_bad_structure_options_name_the_field(tiny_config, options, field):
    with pytest.raises(ValueError, match=field):
        _structure_run(tiny_config, **options)


# ---------------------------------------------------------------- activation mixture


@pytest.mark.parametrize("name", ["relu", "tanh", "gelu", "identity"])
def test_one_hot_mixture_is_the_pure_activation(name):
    mixture = ActivationMixture(5)
    with torch.no_grad():
        mixture.logits.fill_(-torch.inf)
        mixture.logits[:, mixture.functions.index(name)] = 0.0
    x = torch.randn(7, 5, generator=_generator())
    assert torch.equal(mixture(x), MIXTURE_FUNCTIONS[name](x))
    assert mixture.preferred() == [name] * 5


def test_mixture_weights_are_per_unit_and_follow_the_channel_dimension():
    mixture = ActivationMixture(3, functions=("relu", "identity"), unit_dim=1)
    with torch.no_grad():
        mixture.logits.copy_(torch.tensor([[0.0, -torch.inf], [-torch.inf, 0.0], [0.0, 0.0]]))
    x = torch.randn(2, 3, 4, generator=_generator())
    expected = torch.stack([F.relu(x[:, 0]), x[:, 1], 0.5 * F.relu(x[:, 2]) + 0.5 * x[:, 2]], 1)
    torch.testing.assert_close(mixture(x), expected)


def test_gradients_reach_the_mixture_logits():
    mixture = ActivationMixture(4)
    x = torch.randn(16, 4, generator=_generator())
    (mixture(x) * torch.randn(16, 4, generator=_generator(1))).sum().backward()
    assert mixture.logits.grad is not None and (mixture.logits.grad.abs().sum(1) > 0).all()
    assert torch.autograd.gradcheck(lambda logits: _mix_with(logits, x.double()),
                                    (torch.randn(4, 4, dtype=torch.float64, requires_grad=True),))


def _mix_with(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    mixture = ActivationMixture(4).double()
    del mixture.logits
    mixture.logits = logits
    return mixture(x)


def test_models_accept_a_mixture_and_keep_their_defaults():
    assert isinstance(MLP((8,), 3, hidden=(5,), activation="mixture").blocks[0][1], ActivationMixture)
    assert isinstance(MLP((8,), 3, hidden=(5,)).blocks[0][1], nn.ReLU)
    cnn = CNN1d((40,), 10, channels=6, activation="mixture")
    assert cnn.blocks[0][1].unit_dim == 1 and cnn(torch.randn(2, 40)).shape == (2, 10)
    assert isinstance(CNN1d((40,), 10).blocks[0][1], nn.ReLU)
    with pytest.raises(ModelError, match="activation"):
        MLP((8,), 3, activation="softplus")
    with pytest.raises(ValueError, match="functions"):
        ActivationMixture(3, functions=("relu", "swish"))


def test_a_tiny_mixture_model_trains_and_logs_its_choices(tiny_config):
    config = tiny_config(model={"name": "mlp", "options": {"hidden": [32, 32], "activation": "mixture"}},
                         train={"steps": 80, "eval_every": 40, "plugins": [STRUCTURE]})
    parts = build_run(config)
    before = [m.logits.detach().clone() for m in parts.model.modules() if isinstance(m, ActivationMixture)]
    result = train(parts)
    after = [m.logits for m in parts.model.modules() if isinstance(m, ActivationMixture)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    row = result.history[-1]
    assert row["val_acc"] > 0.85
    shares = [row[f"structure_mixture_{name}"] for name in ("relu", "tanh", "gelu", "identity")]
    assert sum(shares) == pytest.approx(1.0)
    assert row["structure_mixture_entropy"] < torch.log(torch.tensor(4.0)).item()
    assert mixture_summary(nn.Linear(2, 2)) == {}
