"""torch's own tools around an optimiser, for every optimiser of the integration table.

``copy.deepcopy`` and ``pickle`` of a (model, optimiser) pair give a pair that trains exactly
like the original and copies every public attribute (PyTorch's
``test_deepcopy_copies_all_public_attrs``); ``swa_utils.AveragedModel`` copies the model
without feeding the original optimiser's hooks; ``OneCycleLR`` with its defaults (which cycle
momentum or beta1) runs; torch's global step hooks fire once per step, not once more for a
wrapped base optimiser.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.optim.swa_utils import AveragedModel

from tests.integration_table import assert_same_parameters, table
from tests.ribbed_helpers import mlp, random_batches, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _public(optimizer) -> set[str]:
    return {name for name in vars(optimizer) if not name.startswith("_")}


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@table
def test_a_copied_model_and_optimiser_train_exactly_like_the_original(case, copier):
    batches = random_batches(8)
    model = mlp(0)
    optimizer = case.build(model)
    train_steps(model, optimizer, batches[:4])
    copied_model, copied = (copy.deepcopy((model, optimizer)) if copier == "deepcopy"
                            else pickle.loads(pickle.dumps((model, optimizer))))
    assert _public(copied) == _public(optimizer)
    train_steps(copied_model, copied, batches[4:])
    train_steps(model, optimizer, batches[4:])
    assert_same_parameters(model, copied_model)
    assert all(a is not b for a, b in zip(model.parameters(), copied_model.parameters(), strict=True))


@table
def test_an_averaged_model_does_not_feed_the_original_optimisers_hooks(case):
    """``AveragedModel`` deep-copies the model with its hooks; a train-mode pass on the copy
    (as ``update_bn`` makes) must neither raise nor reach the optimiser that trains the model."""
    batches = random_batches(6)
    model = mlp(0)
    optimizer = case.build(model)
    averaged = AveragedModel(model)
    for x, y in batches:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        before = copy.deepcopy(optimizer.state_dict())
        averaged.train()
        averaged(x).sum()  # a training-mode pass with gradients on, between backward and step
        torch.testing.assert_close(optimizer.state_dict(), before, rtol=0, atol=0)
        optimizer.step()
        optimizer.zero_grad()
        averaged.update_parameters(model)
    reference = mlp(0)
    train_steps(reference, case.build(reference), batches)
    assert_same_parameters(model, reference)  # the averaged model's passes changed nothing
    assert any(not torch.equal(a, b) for a, b in zip(averaged.module.parameters(), model.parameters(), strict=True))


@table
def test_one_cycle_lr_with_its_defaults_cycles_the_momentum(case):
    model = mlp(0)
    optimizer = case.build(model)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=case.lr, total_steps=8)
    key = "betas" if "betas" in optimizer.defaults else "momentum"
    first = copy.deepcopy((optimizer.param_groups[0][key], optimizer.param_groups[0]["lr"]))
    train_steps(model, optimizer, random_batches(4), scheduler)
    assert optimizer.param_groups[0][key] != first[0] and optimizer.param_groups[0]["lr"] > first[1]


@table
def test_global_step_hooks_fire_once_per_step(case):
    calls = {"pre": [], "post": []}
    pre = register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls["pre"].append(opt))
    post = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls["post"].append(opt))
    try:
        model = mlp(0)
        optimizer = case.build(model)
        train_steps(model, optimizer, random_batches(5))
    finally:
        pre.remove()
        post.remove()
    assert calls["pre"] == [optimizer] * 5 and calls["post"] == [optimizer] * 5
