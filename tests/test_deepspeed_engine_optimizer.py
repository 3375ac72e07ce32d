"""The DeepSpeed strategy's optimiser facade without DeepSpeed itself: it shows the engine's
parameter groups (schedules change them in place) and refuses to be given new ones."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ribbed.distributed.deepspeed_engine import EngineOptimizer


def test_the_facade_shows_the_engines_groups_and_refuses_new_ones():
    groups = [{"lr": 0.1, "params": []}]
    inner = SimpleNamespace(defaults={"lr": 0.1}, state={})
    facade = EngineOptimizer(SimpleNamespace(optimizer=SimpleNamespace(optimizer=inner, param_groups=groups)))
    facade.param_groups[0]["lr"] = 0.05  # what a learning-rate schedule does
    assert groups[0]["lr"] == 0.05 and facade.defaults == {"lr": 0.1}
    with pytest.raises(TypeError, match="param_groups of a DeepSpeed engine.*allowed: changing a group's entries"):
        facade.param_groups = [{"lr": 1.0, "params": []}]
    assert facade.param_groups is groups
