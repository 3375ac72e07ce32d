"""The one hook family: order, the batch hooks receive, old hooks, misnamed hooks, resume."""

from __future__ import annotations

import pytest
import torch

from ribbed.data import load_dataset
from ribbed.runs import create_run
from ribbed.train import StepBatch, TrainingHook, build_run, register_plugin, train
from ribbed.train.hooks import HOOKS, HookList
from tests.conftest import StopAfter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


class Recorder(TrainingHook):
    """Appends ``(name, hook, detail)`` for every hook it is given to a shared list."""

    def __init__(self, label: str = "callback"):
        self.label, self.events = label, []

    def _note(self, name, detail=None):
        self.events.append((name, self.label, detail))

    def attach(self, parts):
        self._note("attach")

    def before_step(self, step, batch):
        self._note("before_step", step)

    def after_step(self, step, batch):
        self._note("after_step", step)

    def on_log(self, row):
        self._note("on_log", row["step"])

    def metrics(self):
        self._note("metrics")
        return {f"{self.label}_metric": 1.0}

    def on_eval(self, row):
        self._note("on_eval", row["step"])


@register_plugin("test-hook-recorder", "records the hooks it is given (tests only)")
class RecorderPlugin(Recorder):
    def __init__(self):
        super().__init__("plugin")


@register_plugin("test-hook-counter", "counts steps and sums losses; keeps both in checkpoints (tests only)")
class Counter(TrainingHook):
    def __init__(self):
        self.steps, self.loss = 0, 0.0

    def after_step(self, step, batch):
        self.steps, self.loss = self.steps + 1, self.loss + batch.loss

    def state_dict(self):
        return {"steps": self.steps, "loss": self.loss}

    def load_state_dict(self, state):
        self.steps, self.loss = state["steps"], state["loss"]


def test_hooks_fire_in_the_documented_order(tiny_config, digits):
    """Plug-ins (config order) before callbacks (given order), at every point of the loop."""
    config = tiny_config(optimizer={"name": "sgd", "lr": 0.1}, train={
        "steps": 4, "eval_every": 2, "log_every": 2, "plugins": [{"name": "test-hook-recorder"}]})
    parts = build_run(config, digits)
    plugin, callback = parts.plugins[0], Recorder()
    assert plugin.events == [("attach", "plugin", None)]  # by build_run
    callback.events = plugin.events = []
    result = train(parts, callbacks=[callback], evaluate_test=False)
    both = lambda name, detail=None: [(name, "plugin", detail), (name, "callback", detail)]  # noqa: E731
    expected = both("attach")[1:]
    for step in range(4):
        expected += both("before_step", step) + both("after_step", step)
        if (step + 1) % 2 == 0:
            expected += both("on_log", step + 1) + both("metrics") + both("on_eval", step + 1)
    assert callback.events == expected
    assert result.history[-1]["plugin_metric"] == result.history[-1]["callback_metric"] == 1.0


def test_the_batch_a_hook_receives_is_the_batch_the_step_trained_on(tiny_config, digits):
    config = tiny_config(optimizer={"name": "sgd", "lr": 0.1}, train={"steps": 6, "eval_every": 3, "grad_accum": 2})
    parts = build_run(config, digits)
    seen: list[tuple[int, StepBatch]] = []

    class Batches(TrainingHook):
        def before_step(self, step, batch):
            seen.append((step, batch))

    trained = []
    accumulate = parts.gradient_method.accumulate
    parts.gradient_method.accumulate = (lambda model, x, y, *rest:
                                        trained.append((x, y)) or accumulate(model, x, y, *rest))
    result = train(parts, callbacks=[Batches()], evaluate_test=False)
    assert [step for step, _ in seen] == list(range(6))
    for step, batch in seen:
        x, y = parts.batches.batch(step)
        assert torch.equal(batch.x, x) and torch.equal(batch.y, y) and batch.micro_batches == 2
        assert torch.equal(torch.cat([trained[2 * step][0], trained[2 * step + 1][0]]), batch.x)
        with pytest.raises(AttributeError):
            batch.loss = 0.0  # frozen: a hook cannot change what the others see
    losses = [batch.loss for _, batch in seen]
    assert [row["train_loss"] for row in result.history] == pytest.approx([sum(losses[:3]) / 3, sum(losses[3:]) / 3])


@pytest.mark.parametrize("optimizer", [{"name": "adamw", "lr": 0.01},
                                       {"name": "ribbed", "lr": 0.01, "options": {"density_every": 2}}],
                         ids=["plugin-measures", "ribbed-measures"])
def test_density_and_structure_plugins_take_labels_from_the_batch_not_the_sampler(tiny_config, digits, optimizer):
    plugins = [{"name": "information-density", "options": {"every": 2}},
               {"name": "ribbed-structure", "options": {"final_sparsity": 0.5, "update_every": 2}}]
    parts = build_run(tiny_config(optimizer=optimizer, train={"steps": 8, "eval_every": 4, "plugins": plugins}),
                      digits)
    drawn = []
    batch = parts.batches.batch
    parts.batches.batch = lambda step: drawn.append(step) or batch(step)
    result = train(parts, evaluate_test=False)
    assert drawn == list(range(8))  # once per step, by the loop
    assert result.history[-1]["density_mutual_information"] > 0  # the labels arrived
    assert result.history[-1]["structure_events"] > 0


def test_old_callbacks_and_old_plugin_signatures_still_work(tiny_config, digits, tmp_path):
    config = tiny_config(optimizer={"name": "sgd", "lr": 0.1}, train={"steps": 6, "eval_every": 3, "log_every": 3})

    class OldCallback:  # the old Callback protocol: on_step gets the steps done and the loss
        def __init__(self):
            self.steps, self.evals, self.logs, self.messages = [], [], [], []

        def on_step(self, step, loss):
            self.steps.append((step, loss))

        def on_eval(self, row):
            self.evals.append(row["step"])

        def on_log(self, row):
            self.logs.append(row["step"])

        def on_message(self, text):
            self.messages.append(text)

    class OldPlugin(TrainingHook):
        def __init__(self):
            self.before, self.after = [], []

        def before_step(self, step):
            self.before.append(step)

        def after_step(self, step):
            self.after.append(step)

    old, plugin, new = OldCallback(), OldPlugin(), Counter()
    record = create_run(tmp_path, name="old", config=config.model_dump(mode="json"))
    with pytest.warns(DeprecationWarning, match="on_step") as warned:
        train(build_run(config, digits), record=record, callbacks=[old, plugin, new], resume=True)
    for old_hook in ("OldCallback.on_step(step, loss)", "OldPlugin.before_step(step)", "OldPlugin.after_step(step)"):
        assert any(old_hook in str(warning.message) for warning in warned), old_hook
    assert [step for step, _ in old.steps] == [1, 2, 3, 4, 5, 6]
    assert sum(loss for _, loss in old.steps) == pytest.approx(new.loss)
    assert old.evals == old.logs == [3, 6]
    assert plugin.before == plugin.after == list(range(6))
    assert old.messages and old.messages[0].startswith("no checkpoint")


def test_misnamed_hooks_are_refused_with_the_allowed_names(tiny_config, digits):
    class Typo:
        def on_steps(self, step, loss): ...

    parts = build_run(tiny_config(train={"steps": 2, "eval_every": 2}), digits)
    before = {name: value.clone() for name, value in parts.model.state_dict().items()}
    with pytest.raises(TypeError, match=r"Typo: method 'on_steps' is not a training hook \(did you mean 'on_step'\?\); "
                                        r"allowed: attach, before_step, after_step"):
        train(parts, callbacks=[Typo()])
    assert all(torch.equal(value, before[name]) for name, value in parts.model.state_dict().items())  # no step

    with pytest.raises(TypeError, match="class .*Late: method 'after_stepp' is not a training hook.*'after_step'"):
        class Late(TrainingHook):
            def after_stepp(self, step, batch): ...

    with pytest.raises(TypeError, match="Nothing: has none of the training hooks; allowed: " + ", ".join(HOOKS)):
        HookList(callbacks=[type("Nothing", (), {})()])
    with pytest.raises(TypeError, match=r"before_step\(step, a, b\): allowed: before_step\(step, batch\)"):
        HookList(callbacks=[type("Three", (TrainingHook,), {"before_step": lambda self, step, a, b: None})()])
    with pytest.raises(TypeError, match="both after_step and the old on_step"):
        HookList(callbacks=[type("Both", (), {"on_step": lambda self, s, loss: None,
                                              "after_step": lambda self, s, b: None})()])
    with pytest.raises(ValueError, match="distinct keys .*Counter"):
        HookList(callbacks=[Counter(), Counter()])


def test_hook_state_survives_a_checkpoint_resume(tiny_config, digits, tmp_path):
    """A plug-in's and a callback's state_dict go into checkpoints; a resumed run ends where an
    uninterrupted one does, hooks included."""
    config = tiny_config(schedule={"kind": "constant"}, train={
        "steps": 16, "eval_every": 8, "checkpoint_every": 4, "plugins": [{"name": "test-hook-counter"}]})
    straight_parts, straight = build_run(config, digits), Counter()
    result = train(straight_parts, callbacks=[straight], evaluate_test=False)
    record = create_run(tmp_path, name="hooks", config=config.model_dump(mode="json"))
    with pytest.raises(KeyboardInterrupt):
        train(build_run(config, digits), record=record, callbacks=[Counter(), StopAfter(10)])
    parts, resumed = build_run(config, digits), Counter()
    again = train(parts, record=record, callbacks=[resumed], resume=True, evaluate_test=False)
    assert again.final == result.final
    for plugin, callback in ((parts.plugins[0], resumed), (straight_parts.plugins[0], straight)):
        assert (plugin.steps, callback.steps) == (16, 16)
        assert plugin.loss == pytest.approx(callback.loss, rel=1e-12)
    assert resumed.state_dict() == straight.state_dict()
