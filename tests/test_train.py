"""The training loop: accumulation, precision, divergence, targets, schedules, batches."""

from __future__ import annotations

import math

import pytest
import torch

from ribbed.config import ScheduleConfig
from ribbed.data import load_dataset
from ribbed.train import TrainingPlugin, build_run, register_plugin, train
from ribbed.train.batches import BatchStream
from ribbed.train.schedule import lr_factor


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_equals_the_large_batch(tiny_config, digits):
    """Four micro-batches of 16 give the same updates as one batch of 64."""
    results = []
    for accum in (1, 4):
        config = tiny_config(
            optimizer={"name": "sgd", "lr": 0.1, "options": {"momentum": 0.9}},
            train={"steps": 8, "grad_accum": accum, "eval_every": 8},
        )
        results.append(_params(train(build_run(config, digits), evaluate_test=False).model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=0, atol=2e-6)


def test_accumulation_really_changes_the_micro_batch(tiny_config, digits):
    """Guard for the test above: the model sees micro-batches of 16 rows when accumulating."""
    config = tiny_config(train={"steps": 1, "grad_accum": 4, "eval_every": 1})
    parts = build_run(config, digits)
    sizes = []
    parts.model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    train(parts, evaluate_test=False)
    assert sizes[:4] == [16, 16, 16, 16]


@pytest.mark.parametrize("precision, dtype", [
    ("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
])
def test_each_precision_mode_trains_in_its_dtype(tiny_config, digits, precision, dtype):
    config = tiny_config(train={"steps": 30, "precision": precision, "eval_every": 30})
    parts = build_run(config, digits)
    seen = set()
    first_linear = next(m for m in parts.model.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    before = train(build_run(config.model_copy(update={"train": config.train.model_copy(
        update={"steps": 1, "eval_every": 1})}), digits), evaluate_test=False).final["val_loss"]
    result = train(parts)
    assert dtype in seen
    assert result.status == "completed"
    assert result.final["val_loss"] < before, "training in this precision did not reduce the loss"
    assert (parts.precision.scaler is not None) == (precision == "fp16")


def test_divergence_is_recorded_not_raised(tiny_config, digits):
    config = tiny_config(optimizer={"name": "sgd", "lr": 1e6}, train={"steps": 50})
    result = train(build_run(config, digits))
    assert result.status == "diverged"
    assert result.diverged_at is not None and result.diverged_at < 50
    assert result.steps == result.diverged_at
    assert result.final == {}


def test_target_is_reached_and_stops_the_run(tiny_config, digits):
    config = tiny_config(train={
        "steps": 400, "eval_every": 10, "stop_at_target": True,
        "target": {"metric": "val_acc", "value": 0.8, "mode": "max"},
    })
    result = train(build_run(config, digits))
    assert result.steps_to_target is not None
    assert result.steps == result.steps_to_target < 400
    reached = next(row for row in result.history if row["step"] == result.steps_to_target)
    assert reached["val_acc"] >= 0.8
    assert all(row["val_acc"] < 0.8 for row in result.history if row["step"] < result.steps_to_target)
    assert 0 < result.seconds_to_target <= result.train_seconds


def test_checkpointing_policy_trains_identically(tiny_config, digits):
    runs = [
        _params(train(build_run(tiny_config(train={"steps": 5, "checkpointing": policy}), digits),
                      evaluate_test=False).model)
        for policy in ("none", "every")
    ]
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=0, atol=1e-6)


def test_language_model_trains_on_text(tiny_config):
    config = tiny_config(
        data={"name": "text-char", "batch_size": 16, "options": {"block_size": 32}},
        model={"name": "gpt", "options": {"n_layer": 1, "n_head": 2, "n_embd": 32}},
        optimizer={"name": "adamw", "lr": 3e-3},
        train={"steps": 30, "eval_every": 30},
    )
    parts = build_run(config)
    vocab = parts.dataset.num_classes
    result = train(parts, evaluate_test=False)
    assert result.final["val_loss"] < math.log(vocab) - 0.5


def test_bad_settings_are_rejected_before_training(tiny_config):
    with pytest.raises(ValueError, match="grad_accum"):
        build_run(tiny_config(train={"grad_accum": 7}))
    with pytest.raises(ValueError, match="target.metric"):
        build_run(tiny_config(train={"target": {"metric": "test_acc", "value": 1}}))
    with pytest.raises(ValueError, match="batch_size"):
        build_run(tiny_config(data={"batch_size": 100_000}))
    with pytest.raises(ValueError, match="hidden_units"):
        build_run(tiny_config(model={"name": "mlp", "options": {"hidden_units": 3}}))


def test_schedule_warmup_and_cosine_endpoints():
    config = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(step, total_steps=110, config=config) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    constant = ScheduleConfig(kind="constant")
    assert {lr_factor(s, total_steps=50, config=constant) for s in range(50)} == {1.0}


def test_batches_are_a_function_of_seed_and_step(digits):
    stream = BatchStream(digits.train, batch_size=50, seed=3, device=torch.device("cpu"))
    again = BatchStream(digits.train, batch_size=50, seed=3, device=torch.device("cpu"))
    torch.testing.assert_close(stream.batch(7)[0], again.batch(7)[0])
    epoch = torch.cat([stream.batch(s)[1] for s in range(stream.steps_per_epoch)])
    rows = torch.cat([stream.batch(s)[0] for s in range(stream.steps_per_epoch)])
    assert len(torch.unique(rows, dim=0)) == len(rows) == stream.steps_per_epoch * 50
    assert epoch.shape[0] == stream.steps_per_epoch * 50
    other_epoch = stream.batch(stream.steps_per_epoch)[0]
    assert not torch.equal(other_epoch, stream.batch(0)[0])



@register_plugin("test-counter", "counts hooks and zeroes the first layer's gradient (tests only)")
class CounterPlugin(TrainingPlugin):
    def __init__(self, freeze_first: bool = False):
        self.freeze_first, self.before, self.after = freeze_first, 0, 0

    def attach(self, parts):
        self.first = next(m for m in parts.model.modules() if isinstance(m, torch.nn.Linear))

    def before_step(self, step, batch):
        assert step == self.before
        self.before += 1
        if self.freeze_first:
            self.first.weight.grad.zero_()

    def after_step(self, step, batch):
        self.after += 1

    def metrics(self):
        return {"plugin_steps": float(self.after)}

    def state_dict(self):
        return {"before": self.before, "after": self.after}

    def load_state_dict(self, state):
        self.before, self.after = state["before"], state["after"]


def test_plugins_see_every_step_and_report_metrics(tiny_config, digits):
    config = tiny_config(optimizer={"name": "sgd", "lr": 0.1}, train={
        "steps": 20, "eval_every": 10, "plugins": [{"name": "test-counter", "options": {"freeze_first": True}}]})
    parts = build_run(config, digits)
    before = parts.plugins[0].first.weight.detach().clone()
    result = train(parts, evaluate_test=False)
    assert [row["plugin_steps"] for row in result.history] == [10.0, 20.0]
    torch.testing.assert_close(parts.plugins[0].first.weight, before, rtol=0, atol=0)


def test_unknown_plugins_samplers_and_options_are_named(tiny_config, digits):
    with pytest.raises(ValueError, match="train.plugins.*'nope'.*allowed: .*test-counter"):
        build_run(tiny_config(train={"plugins": [{"name": "nope"}]}), digits)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['speed'\]"):
        build_run(tiny_config(train={"plugins": [{"name": "test-counter", "options": {"speed": 1}}]}), digits)
    with pytest.raises(ValueError, match="data.sampler.*'sorted'.*allowed: .*shuffle"):
        build_run(tiny_config(data={"sampler": {"name": "sorted"}}), digits)
    with pytest.raises(ValueError, match="train.gradient_method.*allowed: backprop"):
        build_run(tiny_config(train={"gradient_method": "magic"}), digits)


def test_auxiliary_losses_reach_the_gradient(digits):
    from ribbed.nn import add_aux_loss, pop_aux_loss
    from ribbed.train import Backprop, Precision

    class Penalised(torch.nn.Linear):
        def forward(self, x):
            add_aux_loss(self, 10.0 * self.weight.pow(2).sum())
            return super().forward(x)

    model = Penalised(64, 10)
    x, y = digits.train.x[:8].flatten(1), digits.train.y[:8]
    Backprop().accumulate(model, x, y, torch.nn.functional.cross_entropy, Precision("fp32", "cpu"), 1.0)
    expected = torch.autograd.grad(
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, model.weight, model.bias), y)
        + 10.0 * model.weight.pow(2).sum(), model.weight)[0]
    torch.testing.assert_close(model.weight.grad, expected)
    assert pop_aux_loss(model) is None
