"""Full state dicts in the single-process format, whatever holds the model.

``torch.distributed.checkpoint.state_dict`` gathers full model and optimiser states from
FSDP, FSDP2 and DTensor-parallel models. Its optimiser state is keyed by parameter name;
a single process's ``optimizer.state_dict()`` is keyed by parameter index (the order of
``param_groups``). Checkpoints use the index form, so these two functions convert: the
names of a distributed optimiser's groups come in the same order as the indices of the
same optimiser built on the unwrapped model.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = [
    "by_index",
    "by_name",
    "full_model_state",
    "full_optimizer_state",
    "load_full_model_state",
    "load_full_optimizer_state",
]

FULL = StateDictOptions(full_state_dict=True)


def by_index(named: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimiser state as ``optimizer.state_dict()`` gives it (index-keyed)."""
    index: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        params = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": params})
    return {"state": {index[name]: value for name, value in named["state"].items()},
            "param_groups": groups}


def by_name(indexed: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """An index-keyed optimiser state keyed by the parameter ``names`` of each group instead."""
    if [len(group) for group in names] != [len(g["params"]) for g in indexed["param_groups"]]:
        raise ValueError(
            "optimizer state: the checkpoint's parameter groups have "
            f"{[len(g['params']) for g in indexed['param_groups']]} parameters, this optimiser's "
            f"{[len(group) for group in names]}; allowed: a checkpoint of the same model and optimiser"
        )
    name_of = {
        index: name
        for group, group_names in zip(indexed["param_groups"], names, strict=True)
        for index, name in zip(group["params"], group_names, strict=True)
    }
    groups = [
        {**group, "params": group_names}
        for group, group_names in zip(indexed["param_groups"], names, strict=True)
    ]
    return {"state": {name_of[index]: value for index, value in indexed["state"].items()},
            "param_groups": groups}


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unwrapped model state dict of a sharded model (a collective)."""
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=FULL))  # a model's: tensors


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, cast(dict[str, Any], state), options=FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimiser state in index form (a collective)."""
    return by_index(get_optimizer_state_dict(model, optimizer, options=FULL))


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an index-form full optimiser state into a sharded model's optimiser."""
    full = cast(dict[str, Any], get_optimizer_state_dict(model, optimizer, options=FULL))
    names = [group["params"] for group in full["param_groups"]]
    set_optimizer_state_dict(model, optimizer, by_name(state, names), options=FULL)
