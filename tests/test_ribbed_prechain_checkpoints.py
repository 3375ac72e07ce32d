"""Checkpoints saved before RIBBED became a chain of transforms still load and continue exactly.

``tests/data/prechain_checkpoints.pt`` holds, for RIBBED (controllers with a two-level
hierarchy, information density, the chiral term, resets and the norm projection), continual
backprop (``Resetting``) and ``NormProjected``, the model and optimiser state dicts after 25
steps, saved with the monolithic classes (ribbed at commit 5b1af95, whose state kept every
piece's entries flat: ``bank``, ``chiral``, ``chiral_signs``, ``resets``...). Loaded into
today's chains and trained 15 more steps, each run must end bit-identical to an uninterrupted
40-step run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ribbed.core import RIBBED, NormProjected, Resetting

CHECKPOINTS = Path(__file__).parent / "data" / "prechain_checkpoints.pt"
RIBBED_OPTIONS = {"chiral_gamma": 0.05, "reset_rate": 0.02, "reset_maturity": 10, "norm_projection": "hidden",
                  "density_every": 5, "hierarchy_depth": 2, "hierarchy_branching": 2, "routing_every": 10}
BUILDERS = {
    "ribbed": lambda m: RIBBED(m, lr=1e-2, **RIBBED_OPTIONS),
    "resetting": lambda m: Resetting(m, lr=1e-2, reset_rate=0.02, reset_maturity=10),
    "norm-projected": lambda m: NormProjected(m, lr=1e-2),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batches(n: int):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (32,), generator=generator))
            for _ in range(n)]


def _train(model, optimizer, batches) -> None:
    for x, y in batches:
        if isinstance(optimizer, RIBBED):
            optimizer.observe_labels(y)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_prechain_checkpoint_resumes_exactly(name):
    saved = torch.load(CHECKPOINTS, weights_only=True)[name]
    batches = _batches(40)
    whole = _model()
    _train(whole, BUILDERS[name](whole), batches)

    torch.manual_seed(123)
    resumed = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    resumed.load_state_dict(saved["model"])
    optimizer = BUILDERS[name](resumed)
    optimizer.load_state_dict(saved["optimizer"])
    # NormProjected kept no count (it needs none)
    assert optimizer._step_count == (0 if name == "norm-projected" else 25)
    _train(resumed, optimizer, batches[25:])
    for mine, theirs in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    if name == "ribbed":
        assert optimizer.resets.total > 0 and optimizer.controllers.hierarchy is not None  # the pieces were live


def test_a_checkpoint_of_another_chain_is_refused_by_name():
    saved = torch.load(CHECKPOINTS, weights_only=True)["ribbed"]
    model = _model()
    optimizer = RIBBED(model, lr=1e-2)  # controllers only: no density, chiral, resets or projection
    with pytest.raises(ValueError,
                       match=r"saved by a chain of \['chiral', 'controllers', 'density', 'projection', 'resets'\]"):
        optimizer.load_state_dict(saved["optimizer"])
