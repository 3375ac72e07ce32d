"""Every alternative to backprop trains through the one loop, and the gradient-cosine plug-in
measures what it should without changing the run."""

from __future__ import annotations

import pytest
import torch

from ribbed.alternatives import gradient_cosine
from ribbed.data import load_dataset
from ribbed.train import build_run, train
from tests.conftest import StopAfter

# (gradient method, its options, model, model options, learning rate)
METHODS = {
    "backprop": ("backprop", {}, "mlp", {}, 0.01),
    "feedback-alignment": ("feedback-alignment", {}, "mlp", {}, 0.01),
    "direct-feedback-alignment": ("direct-feedback-alignment", {}, "mlp", {}, 0.01),
    "synthetic-gradients": ("synthetic-gradients", {}, "mlp", {}, 0.01),
    "forward-gradient": ("forward-gradient", {"tangents": 4}, "mlp", {}, 0.01),
    "hebbian-oja": ("hebbian", {"rule": "oja"}, "mlp", {}, 0.01),
    "hebbian-softhebb": ("hebbian", {"rule": "softhebb"}, "mlp", {}, 0.003),
    "forward-forward": ("forward-forward", {}, "forward-forward", {"hidden": [32, 32]}, 0.01),
    "reinforce": ("reinforce", {}, "hard-attention", {"hidden": [32], "segments": 8, "glimpses": 4}, 0.01),
    "straight-through": ("gumbel-softmax", {"hard": True}, "hard-attention",
                         {"hidden": [32], "segments": 8, "glimpses": 4}, 0.01),
    "implicit": ("implicit", {}, "deq", {"width": 32}, 0.01),
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _config(tiny_config, name, steps=150, every=10):
    method, options, model, model_options, lr = METHODS[name]
    model_options = {"hidden": [32, 32], **model_options} if model == "mlp" else model_options
    return tiny_config(
        model={"name": model, "options": model_options},
        optimizer={"name": "adamw", "lr": lr},
        train={"steps": steps, "eval_every": steps // 2, "gradient_method": method, "gradient_options": options,
               "plugins": [{"name": "gradient-cosine", "options": {"every": every}}]},
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_beats_chance_on_digits(tiny_config, digits, name):
    result = train(build_run(_config(tiny_config, name), digits))
    assert result.status == "completed"
    assert result.final["test_acc"] > 0.3, f"{name}: {result.final['test_acc']:.3f} (chance is 0.1)"
    last = result.history[-1]
    assert -1.0 <= last["grad_cosine_hidden"] <= 1.0 and -1.0 <= last["grad_cosine"] <= 1.0


@pytest.mark.parametrize("name", ["feedback-alignment", "direct-feedback-alignment", "synthetic-gradients"])
def test_the_update_aligns_with_the_true_gradient_during_training(tiny_config, digits, name):
    """Feedback alignment's signature: the angle to the true gradient falls below 90 degrees,
    in the hidden layers (the head gets the true gradient anyway)."""
    result = train(build_run(_config(tiny_config, name, steps=100, every=5), digits))
    late = result.history[-1]["grad_cosine_hidden"]
    assert late > 0.1, f"{name}: hidden-layer cosine {late:.3f}"


def test_backprop_is_perfectly_aligned_and_measuring_does_not_change_the_run(tiny_config, digits):
    measured = build_run(_config(tiny_config, "backprop"), digits)
    result = train(measured, evaluate_test=False)
    assert all(row["grad_cosine"] == pytest.approx(1.0, abs=1e-5) for row in result.history)
    plain_config = _config(tiny_config, "backprop")
    plain_config.train.plugins = []
    plain = train(build_run(plain_config, digits), evaluate_test=False)
    for a, b in zip(measured.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_gradient_cosine_counts_a_missing_gradient_as_zero():
    a = [torch.tensor([1.0, 0.0]), None, torch.tensor([2.0])]
    b = [torch.tensor([1.0, 0.0]), torch.tensor([3.0]), torch.tensor([2.0])]
    assert gradient_cosine(a, b) == pytest.approx(5 / (5**0.5 * 14**0.5))
    assert gradient_cosine([torch.zeros(2)], [torch.ones(2)]) == 0.0
    assert gradient_cosine(b, [-t for t in b]) == pytest.approx(-1.0)


def test_unknown_options_and_models_are_rejected_when_the_run_is_built(tiny_config, digits):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['tangent'\] for 'forward-gradient'"):
        build_run(tiny_config(train={"gradient_method": "forward-gradient",
                                     "gradient_options": {"tangent": 3}}), digits)
    with pytest.raises(ValueError, match="needs model 'forward-forward'"):
        build_run(tiny_config(train={"gradient_method": "forward-forward"}), digits)
    with pytest.raises(ValueError, match=r"train.plugins: unknown option\(s\) \['often'\]"):
        build_run(tiny_config(train={"plugins": [{"name": "gradient-cosine", "options": {"often": 1}}]}), digits)


@pytest.mark.parametrize("preset", ["bp-alternatives", "bp-alternatives-tbptt"])
def test_every_method_of_the_presets_builds(preset, digits):
    from ribbed.config import DatasetEntry, load_config
    from ribbed.experiments.harness import method_run_config
    from ribbed.experiments.presets import preset_path

    comparison = load_config(preset_path(preset))
    entry = comparison.dataset_entries[0]
    if entry.data.name != "text-char":  # the classification presets: check on the small digits set
        entry = DatasetEntry(data=entry.data.model_copy(update={"name": "digits", "options": {}}),
                             model=entry.model)
    dataset = digits if entry.data.name == "digits" else None
    for name in comparison.methods:
        parts = build_run(method_run_config(comparison, name, entry, seed=0), dataset)
        assert [type(p).__name__ for p in parts.plugins] == ["GradientCosine"], name


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_resumes_from_a_checkpoint_exactly(tiny_config, digits, tmp_path, name):
    """Whatever a gradient method learns on the side (synthetic-gradient predictors, REINFORCE
    baselines...) is in the checkpoint: a resumed run equals an uninterrupted one."""
    from ribbed.runs import create_run

    config = _config(tiny_config, name, steps=30, every=10)
    config.train.checkpoint_every = 10
    straight = train(build_run(config, digits), evaluate_test=False)
    record = create_run(tmp_path, name=name, config=config.model_dump(mode="json"))
    with pytest.raises(KeyboardInterrupt):
        train(build_run(config, digits), record=record, callbacks=[StopAfter(20)], evaluate_test=False)
    resumed = train(build_run(config, digits), record=record, resume=True, evaluate_test=False)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name
