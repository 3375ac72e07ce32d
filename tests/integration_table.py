"""The optimisers every integration test module runs, as one table (torch's ``optim_db`` habit).

Each :class:`Case` builds one of ribbed's optimisers through the registry, as a user of a
framework would (``build_optimizer(name, model, lr=...)``); ``adamw`` is the reference: a
check that fails on it is a wrong check, not a wrong optimiser. RIBBED refreshes its
controllers every 2 steps here (``feature_every=2``, default 10) so that a few steps of a
test already train the controllers, route neurons and apply non-unit multipliers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from ribbed.optim import build_optimizer


@dataclass(frozen=True)
class Case:
    """One row: the test id, the registry name, its lr and options."""

    id: str
    name: str
    lr: float
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(self.name, model, lr=self.lr, **copy.deepcopy(self.options))

    def __str__(self) -> str:
        return self.id


RIBBED_FAST = {"feature_every": 2, "routing_every": 4}
CASES = [
    Case("ribbed", "ribbed", 1e-2, RIBBED_FAST),
    Case("ribbed-sgd", "ribbed", 5e-2, {**RIBBED_FAST, "base": "sgd", "base_options": {"momentum": 0.9}}),
    Case("adam-hd", "adam-hd", 1e-2, {"hypergrad_lr": 1e-4}),
    Case("kfac", "kfac", 5e-2, {"base_options": {"momentum": 0.9}, "inverse_every": 2}),
    Case("adamw", "adamw", 1e-2),
]

table = pytest.mark.parametrize("case", CASES, ids=str)
"""``@table`` runs a test once per row."""


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    """Bit-identical parameters, by name."""
    other = dict(b.named_parameters())
    for name, value in a.named_parameters():
        assert torch.equal(value, other[name]), name
