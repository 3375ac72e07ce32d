"""torch's checkpoint contract, for every optimiser of the integration table.

``state_dict()`` is in torch's layout (``state`` by parameter index, ``param_groups``), the four
``torch.optim.Optimizer`` state-dict hooks fire, ``torch.distributed.checkpoint``'s
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (what Lightning's
ModelParallelStrategy, Accelerate's FSDP and transformers' sharded checkpoints call) round-trip
exactly, and state dicts saved in the layout of earlier versions still load.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from tests.integration_table import CASES, assert_same_parameters, table
from tests.ribbed_helpers import mlp, random_batches, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _through_disk(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resume_check(case, save, load) -> None:
    """Train 4 steps, ``save(model, opt)``, train 4 more; a fresh pair given ``load(model, opt,
    saved)`` trains the same 4 to the same weights (and the weights did move)."""
    batches = random_batches(8)
    model = mlp(0)
    optimizer = case.build(model)
    train_steps(model, optimizer, batches[:4])
    saved_model, saved = copy.deepcopy(model.state_dict()), _through_disk(save(model, optimizer))
    train_steps(model, optimizer, batches[4:])
    resumed_model = mlp(5)
    resumed_model.load_state_dict(saved_model)
    resumed = case.build(resumed_model)
    load(resumed_model, resumed, saved)
    train_steps(resumed_model, resumed, batches[4:])
    assert_same_parameters(model, resumed_model)
    assert any(not torch.equal(value, saved_model[name]) for name, value in model.state_dict().items())


@table
def test_the_state_dict_is_in_torchs_layout(case):
    model = mlp(0)
    optimizer = case.build(model)
    train_steps(model, optimizer, random_batches(3))
    state = optimizer.state_dict()
    assert {"state", "param_groups"} <= state.keys()
    n = len(list(model.parameters()))
    assert sorted(i for group in state["param_groups"] for i in group["params"]) == list(range(n))
    assert set(state["state"]) <= set(range(n))
    assert all(group["lr"] == case.lr for group in state["param_groups"])
    assert all(isinstance(entry, dict) for entry in state["state"].values())


@table
def test_the_four_state_dict_hooks_fire_and_may_replace_the_dict(case):
    model = mlp(0)
    optimizer = case.build(model)
    train_steps(model, optimizer, random_batches(2))
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append(("save-pre", opt)))
    optimizer.register_state_dict_post_hook(lambda opt, sd: {**sd, "tag": 7})
    optimizer.register_load_state_dict_pre_hook(
        lambda opt, sd: calls.append(("load-pre", sd.get("tag"))) or {k: v for k, v in sd.items() if k != "tag"})
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append(("load-post", opt)))
    saved = optimizer.state_dict()
    assert saved["tag"] == 7 and calls == [("save-pre", optimizer)]
    optimizer.load_state_dict(saved)
    assert calls[1:] == [("load-pre", 7), ("load-post", optimizer)]


@table
def test_a_state_dict_round_trip_continues_exactly(case):
    _resume_check(case, lambda model, opt: opt.state_dict(), lambda model, opt, saved: opt.load_state_dict(saved))


@table
def test_distributed_checkpoint_get_and_set_round_trip_exactly(case):
    """Without a process group (one process), as the API allows; parameters are named by FQN."""

    def save(model, optimizer):
        state = get_optimizer_state_dict(model, optimizer)
        assert set(state) == {"state", "param_groups"}
        assert set(state["state"]) <= {name for name, _ in model.named_parameters()}
        return state

    _resume_check(case, save, lambda model, opt, saved: set_optimizer_state_dict(model, opt, saved))


SAVED_BEFORE = Path(__file__).parent / "data" / "state_dicts_before_torch_layout.pt"
"""Written by ``ribbed`` at commit 891b043 (the layout before torch's): per case, the model and
optimiser after 4 steps of ``random_batches(8)`` and the model after the other 4."""


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("ribbed", "ribbed-sgd", "kfac")], ids=str)
def test_a_checkpoint_written_by_the_earlier_version_resumes_exactly(case):
    saved = torch.load(SAVED_BEFORE, weights_only=True)[case.id]
    assert "state" not in saved["optimizer"] and "base" in saved["optimizer"]
    model = mlp(5)
    model.load_state_dict(saved["model"])
    optimizer = case.build(model)
    optimizer.load_state_dict(saved["optimizer"])
    train_steps(model, optimizer, random_batches(8)[4:])
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["final"][name]), name


def test_ribbeds_own_state_missing_from_a_state_dict_is_an_error():
    """A plain AdamW state dict given to RIBBED would silently drop the controllers' state."""
    model = mlp(0)
    optimizer = CASES[0].build(model)
    train_steps(model, optimizer, random_batches(2))
    with pytest.raises(KeyError, match="RIBBED's own state"):
        optimizer.load_state_dict(optimizer.base.state_dict())
