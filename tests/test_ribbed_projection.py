"""Neuron norm projection (``ribbed.core.projection``): each neuron's incoming-weight norm held
at its starting value, against a float64 reference step by step; scopes; refusals; resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from ribbed.core import RIBBED, NormProjected
from ribbed.core.layers import find_neuron_layers
from ribbed.core.projection import NeuronNormProjection

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(),
                         nn.Linear(5, 3)).to(dtype)


def batch(step: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=generator, dtype=dtype)
    return x, torch.randint(0, 3, (16,), generator=generator)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step, next(model.parameters()).dtype)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().flatten(1).norm(dim=1)


def test_sgd_then_projection_matches_a_float64_reference_step_by_step():
    model, reference = mlp(), mlp()
    optimizer = NormProjected(model, 0.1, base="sgd", base_options={"momentum": 0.0, "weight_decay": 0.0})
    hidden = [reference[0].weight, reference[2].weight]
    targets = [row_norms(w).unsqueeze(1) for w in hidden]
    for step in range(10):
        train(model, optimizer, range(step, step + 1))
        x, y = batch(step)
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.1 * p.grad
            for w, target in zip(hidden, targets, strict=True):
                w *= target / w.norm(dim=1, keepdim=True)
        for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scope, held", [("hidden", [0, 2]), ("all", [0, 2, 4])])
def test_scope_decides_which_layers_keep_their_norms_and_biases_stay_free(scope, held):
    model = mlp()
    start = {i: row_norms(model[i].weight) for i in (0, 2, 4)}
    biases = {i: model[i].bias.detach().clone() for i in (0, 2, 4)}
    train(model, NormProjected(model, 0.05, scope=scope, base_options={"weight_decay": 0.0}), range(30))
    for i in (0, 2, 4):
        close = torch.allclose(row_norms(model[i].weight), start[i], rtol=1e-10, atol=0)
        assert close == (i in held), f"layer {i}: norms {'moved' if i in held else 'held'} under scope {scope}"
        assert not torch.equal(model[i].bias, biases[i])


def test_without_projection_the_same_training_moves_the_norms():
    """The property above could fail: plain AdamW at this rate changes every layer's norms."""
    model = mlp()
    start = row_norms(model[0].weight)
    train(model, torch.optim.AdamW(model.parameters(), 0.05, weight_decay=0.0), range(30))
    assert (row_norms(model[0].weight) - start).abs().max() > 1e-2


def test_conv_layers_project_per_output_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3))
    start = row_norms(model[0].weight)
    optimizer = NormProjected(model, 0.05, base_options={"weight_decay": 0.0})
    for step in range(5):
        optimizer.zero_grad()
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 2, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.testing.assert_close(row_norms(model[0].weight), start, rtol=1e-5, atol=0)


def test_state_dict_resumes_exactly_in_torchs_layout():
    model, other = mlp(), mlp()
    optimizer = NormProjected(model, 0.01)
    train(model, optimizer, range(5))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    assert set(optimizer.state_dict()) == {"state", "param_groups"}
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    with torch.no_grad():
        other[0].weight.mul_(2.0)  # a resumed optimiser must take the saved targets, not these norms
    other.load_state_dict(saved["model"])
    resumed = NormProjected(other, 0.01)
    resumed.load_state_dict(saved["optimizer"])
    train(model, optimizer, range(5, 10))
    train(other, resumed, range(5, 10))
    for mine, theirs in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_ribbed_with_projection_holds_hidden_norms_and_resumes_exactly():
    model, other = mlp(), mlp()
    options = {"norm_projection": "hidden", "base_options": {"weight_decay": 0.0}, "feature_every": 2,
               "reset_rate": 0.05, "reset_maturity": 2}
    start = [row_norms(model[i].weight) for i in (0, 2)]
    optimizer = RIBBED(model, 0.01, **options)
    train(model, optimizer, range(6))
    assert optimizer.resets.total > 0, "the resets this test relies on never happened"
    for i, norms in zip((0, 2), start, strict=True):
        torch.testing.assert_close(row_norms(model[i].weight), norms, rtol=1e-10, atol=0)
    saved = copy.deepcopy(optimizer.state_dict())  # torch's state dict holds the live moment tensors
    other.load_state_dict(model.state_dict())
    resumed = RIBBED(other, 0.01, **options)
    resumed.load_state_dict(saved)
    train(model, optimizer, range(6, 12))
    train(other, resumed, range(6, 12))
    for mine, theirs in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("build, message", [
    (lambda m: NormProjected(m, 0.01, scope="rows"), "norm_projection: got 'rows'; allowed: 'hidden', 'all'"),
    (lambda m: NormProjected(list(m.parameters()), 0.01), "model: got list; allowed: the torch.nn.Module"),
    (lambda m: NormProjected(m[4], 0.01), "scope 'hidden' selects no layer"),
    (lambda m: RIBBED(m, 0.01, norm_projection="rows"), "norm_projection: got 'rows'"),
    (lambda m: RIBBED(m[4], 0.01, norm_projection="hidden"), "scope 'hidden' selects no layer"),
])
def test_bad_input_is_refused_with_the_field_and_what_is_allowed(build, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        build(mlp())


def test_a_neuron_with_all_zero_weights_is_refused():
    model = mlp()
    with torch.no_grad():
        model[0].weight[3].zero_()
    layers = find_neuron_layers(model, set(model.parameters()), hooks=False)
    with pytest.raises(ValueError, match=r"layers \['0'\] have a neuron whose incoming weights are all zero"):
        NeuronNormProjection(layers)


def test_global_step_hooks_fire_once_per_step_for_the_wrapper():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append(type(opt).__name__))
    try:
        model = mlp()
        train(model, NormProjected(model, 0.01), range(3))
    finally:
        handle.remove()
    assert seen == ["NormProjected"] * 3
