"""Utility-driven neuron resets (``ribbed.core.resets``): what is replaced, when, and how."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ribbed import RIBBED
from ribbed.core import Resetting
from ribbed.core.layers import find_neuron_layers
from ribbed.core.resets import NeuronResets
from ribbed.optim import build_optimizer
from tests.ribbed_helpers import assert_resume_matches_uninterrupted, random_batches, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def relu_mlp(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))


def _kill(layer: nn.Linear, neurons: list[int]) -> None:
    """Make ``neurons`` dead: zero incoming weights and a negative bias (ReLU output always 0)."""
    with torch.no_grad():
        layer.weight[neurons] = 0.0
        layer.bias[neurons] = -1.0


def test_a_dead_neuron_is_replaced_without_changing_the_function():
    model = relu_mlp()
    _kill(model[0], [3, 7])
    optimizer = Resetting(model, lr=1e-3, reset_rate=0.0, reset_threshold=0.0, reset_maturity=0, reset_every=5,
                          utility="activity")
    batches = random_batches(4)
    train_steps(model, optimizer, batches)  # 4 steps: utilities recorded, no check yet
    assert optimizer.resets.total == 0
    x = batches[0][0]
    old_rows = model[0].weight.detach().clone()
    loss = nn.functional.cross_entropy(model(x), batches[0][1])
    loss.backward()
    optimizer.step()  # step 5: the check replaces the dead neurons after the base step
    optimizer.zero_grad()
    assert optimizer.resets.total == 2 and optimizer.telemetry()["reset_count"] == 2.0
    replaced = optimizer.resets.replaced[0][1].tolist()
    assert sorted(replaced) == [3, 7]
    bound = 1 / 8 ** 0.5
    rows = model[0].weight[[3, 7]]
    assert rows.abs().max() <= bound and rows.abs().min() > 0 and (model[0].bias[[3, 7]] == 0).all()
    assert (model[2].weight[:, [3, 7]] == 0).all(), "outgoing weights start at zero"
    others = [i for i in range(16) if i not in (3, 7)]
    assert not torch.equal(model[0].weight[others], old_rows[others]), "the others took their AdamW step"
    # optimiser state of the changed entries: first moment zero, second moment the tensor's mean of the rest
    state = optimizer.state[model[0].weight]
    assert (state["exp_avg"][[3, 7]] == 0).all()
    kept = state["exp_avg_sq"][others]
    assert torch.allclose(state["exp_avg_sq"][[3, 7]], kept.mean().expand(2, 8))
    assert (optimizer.state[model[2].weight]["exp_avg"][:, [3, 7]] == 0).all()


def test_the_reset_itself_leaves_the_function_unchanged():
    model = relu_mlp()
    _kill(model[0], [1, 2])
    layers = find_neuron_layers(model, set(model.parameters()), hooks=False)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    resets = NeuronResets(layers, base, reset_rate=0.0, reset_threshold=0.0, reset_maturity=0, utility="activity")
    x, y = random_batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()  # records activity
    before = model(x).detach().clone()
    resets.step(1, torch.Generator().manual_seed(0))
    assert resets.total == 2
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=0)


def test_the_rate_accumulates_and_the_lowest_utility_goes_first():
    """reset_rate 0.01 of 16 neurons per step: 0.16 a step, so exactly 8 replacements per layer
    in 50 steps (two layers with consumers), each time the lowest-utility mature neuron."""
    model = relu_mlp()
    optimizer = Resetting(model, lr=1e-3, reset_rate=0.01, reset_maturity=0)
    counts = []
    for x, y in random_batches(50):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        for layer, neurons in optimizer.resets.replaced:
            utility = optimizer.resets.utility[0 if layer.module is model[0] else 1]  # as taken at the check
            kept = torch.ones_like(utility, dtype=torch.bool)
            kept[neurons] = False
            assert utility[neurons].max() <= utility[kept].min()
            counts.append(neurons.numel())
    assert optimizer.resets.total == 16 and sum(counts) == 16


def test_maturity_protects_young_neurons():
    model = relu_mlp()
    optimizer = Resetting(model, lr=1e-3, reset_rate=0.5, reset_maturity=30)
    train_steps(model, optimizer, random_batches(29))
    assert optimizer.resets.total == 0
    train_steps(model, optimizer, random_batches(1))
    assert optimizer.resets.total > 0


def test_conv_to_conv_and_flattened_conv_to_linear_pairs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Conv1d(4, 5, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 6, 3))
    layers = find_neuron_layers(model, set(model.parameters()), hooks=False)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    resets = NeuronResets(layers, base, reset_rate=0.0, reset_threshold=10.0, reset_maturity=0)
    x = torch.randn(8, 1, 10)
    model(x).sum().backward()
    base.step()
    assert [(p.name, c.name, k) for p, c, k in resets.pairs] == [("0", "2", 1), ("2", "5", 6)]
    before = model(x).detach().clone()
    resets.step(1, torch.Generator().manual_seed(0))  # threshold 10: every neuron is replaced
    assert resets.total == 4 + 5
    # layer 2 lost its inputs (zero columns) and was itself re-initialised: fresh rows, zero bias
    assert model[2].weight.abs().max() <= 1 / 12 ** 0.5 and (model[2].bias == 0).all()
    assert (model[5].weight == 0).all()
    torch.testing.assert_close(model(x).detach(), model[5].bias.detach().expand_as(before))
    assert (base.state[model[5].weight]["momentum_buffer"] == 0).all()


def test_layers_that_are_not_a_chain_are_named_in_a_warning():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(torch.relu(self.a(x)))

    model = Branches()
    with pytest.warns(UserWarning, match=r"\['a'\]"):
        resets = NeuronResets(find_neuron_layers(model, set(model.parameters()), hooks=False),
                              torch.optim.SGD(model.parameters(), lr=0.1))
    assert [(p.name, c.name) for p, c, _ in resets.pairs] == [("b", "head")]
    single = nn.Linear(4, 2)
    with pytest.warns(UserWarning, match="no neuron can ever be reset"):
        Resetting(single, lr=1e-3)


@pytest.mark.parametrize("options, field", [
    ({"reset_rate": 1.5}, "reset_rate"), ({"reset_rate": -0.1}, "reset_rate"),
    ({"reset_threshold": -1.0}, "reset_threshold"), ({"reset_maturity": -1}, "reset_maturity"),
    ({"reset_every": 0}, "reset_every"), ({"utility_decay": 1.0}, "utility_decay"),
    ({"utility": "magic"}, "utility"), ({"reset_rate": 0.0}, "reset_rate and reset_threshold"),
])
def test_bad_reset_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        Resetting(relu_mlp(), lr=1e-3, **options)


def test_registry_names_build_continual_backprop_and_redo():
    model = relu_mlp()
    cbp = build_optimizer("continual-backprop", model, lr=1e-3)
    redo = build_optimizer("redo", model, lr=1e-3)
    assert cbp.resets.rate == 1e-4 and cbp.resets.threshold is None
    assert redo.resets.rate == 0.0 and redo.resets.threshold == 0.1 and redo.resets.every == 1000
    for optimizer in (cbp, redo):
        optimizer.resets.remove()


def test_resets_revive_a_network_with_many_dead_units():
    """Half the hidden units dead from the start: AdamW can never use them; continual backprop
    replaces them and ends with fewer dead units and a lower loss on a fixed regression."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = torch.sin(x @ torch.randn(8, 3, generator=generator))
    results = {}
    for name in ("adamw", "resets"):
        model = relu_mlp(width=32)
        _kill(model[0], list(range(16)))
        _kill(model[2], list(range(16)))
        optimizer = (torch.optim.AdamW(model.parameters(), lr=3e-3) if name == "adamw" else
                     Resetting(model, lr=3e-3, reset_rate=0.0, reset_threshold=0.0, reset_maturity=50,
                               reset_every=50, utility="activity"))
        for _ in range(600):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        hidden = torch.relu(model[0](x))
        results[name] = (float(loss), int((hidden.amax(0) == 0).sum()))
    assert results["adamw"][1] == 16
    assert results["resets"][1] < 4 and results["resets"][0] < 0.8 * results["adamw"][0], results


@pytest.mark.parametrize("signal", ["trace", "one-step"])
def test_ribbed_with_resets_resumes_bit_for_bit(signal):
    def make(model):
        return RIBBED(model, lr=1e-2, feature_every=3, reset_rate=0.02, reset_maturity=5, signal=signal)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a chain MLP: no layer is left out
        uninterrupted, resumed = assert_resume_matches_uninterrupted(
            relu_mlp, make, train_steps, random_batches(40), split=17)
    assert uninterrupted.resets.total > 5 and resumed.resets.total == uninterrupted.resets.total


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_a_copied_model_and_ribbed_train_exactly_like_the_original(copier):
    """``copy.deepcopy((model, opt))`` and a pickle round trip give a working pair whose hooks
    (activation statistics, resets' activity, information density) feed the copy, not the
    original: both continue to the same weights, and the original is untouched by the copy."""
    import copy
    import pickle

    model = relu_mlp()
    optimizer = RIBBED(model, lr=1e-2, feature_every=2, reset_rate=0.05, reset_maturity=3, density_every=4)
    batches = random_batches(30)
    train_steps(model, optimizer, batches[:10])
    pair = copy.deepcopy((model, optimizer)) if copier == "deepcopy" else pickle.loads(pickle.dumps((model, optimizer)))
    copied_model, copied = pair
    assert copied.needs_batch is False and copied is not optimizer and copied.resets is not optimizer.resets
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(copied_model, copied, batches[10:])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), "the original moved"
    assert copied.resets.activity[0] is not optimizer.resets.activity[0]
    train_steps(model, optimizer, batches[10:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copied_model.parameters(), strict=True))
    assert copied.resets.total == optimizer.resets.total > 0
    assert copied.telemetry() == optimizer.telemetry()


def test_resets_without_recorded_activity_warn_and_replace_nothing():
    """A model trained in eval mode never feeds the activity hook: every utility would read 0 and
    ReDo's test would call every neuron dormant. The resets say so and replace nothing."""
    model = relu_mlp()
    optimizer = Resetting(model, lr=1e-3, reset_rate=0.0, reset_threshold=0.1, reset_maturity=0, reset_every=2)
    model.eval()
    with pytest.warns(UserWarning, match="recorded no training forward pass"):
        train_steps(model, optimizer, random_batches(4))
    assert optimizer.resets.total == 0
    model.train()
    train_steps(model, optimizer, random_batches(2))  # recorded again: the checks run
    assert optimizer.resets.recorded == [0, 0]
