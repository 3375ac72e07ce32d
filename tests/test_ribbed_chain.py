"""The chain of neuron transforms (``ribbed.core.chain``): what it promises besides the
trajectories (``tests/test_ribbed_trajectories.py``).

A chain built from the transforms' constructors is RIBBED built from flat options, bit for bit;
a transform written outside the package joins a chain, its state and its telemetry with no
change to the chain; the chain refuses what it cannot run and names the field.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from ribbed.core import RIBBED
from ribbed.core.chain import NeuronChain, NeuronTransform, StepContext, TransformSpec
from ribbed.core.optimizer import continual, meta_bp
from ribbed.core.transforms import chiral_term, controllers, neuron_resets, norm_projection
from tests.ribbed_helpers import (
    assert_resume_matches_uninterrupted,
    mlp,
    random_batches,
    train_steps,
)


def _final(build) -> list[torch.Tensor]:
    model = mlp()
    train_steps(model, build(model), random_batches(30))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("flat, chain", [
    ({}, [controllers()]),
    ({"norm_projection": "hidden", "chiral_gamma": 0.05, "reset_rate": 0.05, "reset_maturity": 5},
     [controllers(), chiral_term(0.05), neuron_resets(reset_rate=0.05, reset_maturity=5), norm_projection("hidden")]),
    ({"controllers": False, "reset_rate": 0.05, "reset_maturity": 5},
     [neuron_resets(reset_rate=0.05, reset_maturity=5)]),
])
def test_a_chain_of_constructors_is_ribbed_from_flat_options_bit_for_bit(flat, chain):
    ours = _final(lambda m: NeuronChain(m, lr=1e-2, transforms=chain))
    theirs = _final(lambda m: RIBBED(m, lr=1e-2, **flat))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_named_constructors_are_the_published_configurations():
    assert all(torch.equal(a, b) for a, b in zip(_final(lambda m: meta_bp(m, lr=1e-2)),
                                                 _final(lambda m: RIBBED(m, lr=1e-2, objective="linear")), strict=True))
    made = continual(mlp(), lr=1e-2)
    assert made.projection is not None and made.base.param_groups[0]["weight_decay"] == 0.0
    assert made.controllers.bank.objective == "residual"


class NeuronClip(NeuronTransform):
    """A transform from outside the package: clips each neuron's gradient row to a norm and
    counts the clipped rows."""

    name = "clip"

    def __init__(self, chain: NeuronChain, limit: float):
        self.layers, self.limit, self.clipped = chain.layers, limit, 0

    def before_update(self, ctx: StepContext) -> None:
        for layer in self.layers:
            grad = layer.weight.grad
            norms = grad.flatten(1).norm(dim=1)
            scale = (self.limit / norms.clamp_min(1e-12)).clamp(max=1.0)
            grad.mul_(scale.view(-1, *([1] * (grad.dim() - 1))))
            self.clipped += int((scale < 1).sum())

    def telemetry(self) -> dict[str, float]:
        return {"clipped_rows": float(self.clipped)}

    def state_dict(self) -> dict[str, Any]:
        return {"clipped": self.clipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped = state["clipped"]


def clip(limit: float) -> TransformSpec:
    return TransformSpec("clip", lambda chain: NeuronClip(chain, limit))


def test_a_new_transform_joins_the_step_the_state_and_the_telemetry():
    model = mlp()
    optimizer = NeuronChain(model, lr=1e-2, transforms=[clip(1e-3)])
    train_steps(model, optimizer, random_batches(3))
    assert optimizer.clip.clipped > 0 and optimizer.telemetry() == {"clipped_rows": float(optimizer.clip.clipped)}
    assert optimizer.state_dict()["state"][0]["ribbed"]["transforms"] == {"clip": {"clipped": optimizer.clip.clipped}}
    # clipping changes the run (the check could fail), and a resumed run equals an uninterrupted one
    plain = _final(lambda m: NeuronChain(m, lr=1e-2))
    assert not all(torch.equal(a, b) for a, b in zip(_final(lambda m: NeuronChain(m, lr=1e-2, transforms=[clip(1e-3)])),
                                                     plain, strict=True))
    assert_resume_matches_uninterrupted(mlp, lambda m: NeuronChain(m, lr=1e-2, transforms=[clip(1e-3), controllers()]),
                                        train_steps, random_batches(24), split=13)


def test_an_empty_chain_is_its_base_bit_for_bit():
    ours = _final(lambda m: NeuronChain(m, lr=1e-2))
    theirs = _final(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_profiled_times_each_transform_and_nothing_outside():
    model = mlp()
    optimizer = NeuronChain(model, lr=1e-2, transforms=[controllers(feature_every=2), norm_projection()])
    with optimizer.profiled() as timings:
        train_steps(model, optimizer, random_batches(4))
    assert set(timings) == {f"{name}.{hook}" for name in ("controllers", "projection")
                            for hook in ("before_update", "after_update")} | {"controllers.update"}
    assert all(seconds > 0 for seconds in timings.values())
    train_steps(model, optimizer, random_batches(2))
    assert optimizer.__dict__["_timings"] is None


def test_refusals_name_the_field_and_what_is_allowed():
    model = mlp()
    with pytest.raises(ValueError, match=r"transforms: got \['clip', 'clip'\]; allowed: each transform at most once"):
        NeuronChain(model, transforms=[clip(1.0), clip(2.0)])

    class Other(NeuronClip):
        name, modulates = "other", True

    with pytest.raises(ValueError, match=r"transforms: got \['controllers', 'other'\].*allowed: at most one"):
        NeuronChain(model, transforms=[controllers(), TransformSpec("other", lambda chain: Other(chain, 1.0))])
    with pytest.raises(ValueError, match="feature_every: got 0; allowed: an integer >= 1"):
        controllers(feature_every=0)
    with pytest.raises(ValueError, match="chiral_gamma: got 0; allowed: a number != 0"):
        chiral_term(0)
    optimizer = RIBBED(model)
    assert optimizer.resets is None and optimizer.projection is None and optimizer.controllers is not None
    with pytest.raises(AttributeError, match="'RIBBED' object has no attribute 'resest'"):
        optimizer.resest  # noqa: B018


def test_a_deep_copy_keeps_every_transform_working():
    model = mlp()
    optimizer = NeuronChain(model, lr=1e-2, transforms=[controllers(feature_every=2), clip(1e-3)])
    train_steps(model, optimizer, random_batches(3))
    model_copy, copied = copy.deepcopy((model, optimizer))
    assert copied.clip is not optimizer.clip and copied.controllers.layers[0].module is model_copy[0]
    train_steps(model, optimizer, random_batches(3, seed=5))
    train_steps(model_copy, copied, random_batches(3, seed=5))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model_copy.parameters(), strict=True))
