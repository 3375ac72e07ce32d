"""Optimiser state dicts in torch's layout, for optimisers that keep more than per-parameter state.

``torch.optim.Optimizer.state_dict()`` returns ``{"state": {index: {...}}, "param_groups":
[...]}``, and the tools built on it read exactly those two keys: ``torch.distributed.checkpoint``'s
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (behind Lightning's and
Accelerate's sharded checkpoints) keep nothing else, renaming each ``index`` to the
parameter's name. Our wrappers (K-FAC over a base, RIBBED over a base) therefore save the
base's own state dict with what they add *inside* it:

* per-parameter state of a wrapper goes into that parameter's entry under the wrapper's key
  (``state[i]["kfac"] = {"A": ..., "G": ...}``), so it follows the parameter through any
  renaming or resharding;
* state that belongs to no parameter (RIBBED's controllers, routing, step count) goes into the
  entry of the first trainable parameter under its key, as ``torch.optim.LBFGS`` keeps its
  global state in its first parameter's state.

:func:`hooked_state_dict` and :func:`hooked_load_state_dict` run the four hooks of
``torch.optim.Optimizer`` (``register_state_dict_pre_hook`` ... ``register_load_state_dict_post_hook``)
around an optimiser's own saving and loading, as ``torch.optim.Optimizer`` runs them around its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["attach_entries", "attach_global", "detach", "detach_global", "hooked_load_state_dict", "hooked_state_dict"]

StateDict = dict[str, Any]


def hooked_state_dict(optimizer: torch.optim.Optimizer, build: Callable[[], StateDict]) -> StateDict:
    """``build()`` between ``optimizer``'s state-dict pre-hooks and post-hooks (a post-hook may
    return a replacement dict), as ``torch.optim.Optimizer.state_dict`` runs them."""
    for pre_hook in optimizer._optimizer_state_dict_pre_hooks.values():
        pre_hook(optimizer)
    state_dict = build()
    for post_hook in optimizer._optimizer_state_dict_post_hooks.values():
        result = post_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def hooked_load_state_dict(optimizer: torch.optim.Optimizer, state_dict: StateDict,
                           load: Callable[[StateDict], None]) -> None:
    """``load(state_dict)`` between ``optimizer``'s load pre-hooks (each may return a replacement
    dict) and post-hooks, on a shallow copy as ``torch.optim.Optimizer.load_state_dict`` does."""
    state_dict = dict(state_dict)
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    load(state_dict)
    for post_hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        post_hook(optimizer)


def _check_free(entry: dict, key: str, index: Any) -> None:
    if key in entry:
        raise KeyError(f"state[{index!r}] already has a {key!r} entry (two optimisers in one chain use the "
                       "same key); allowed: a key no other optimiser in the chain uses")


def attach_entries(state_dict: StateDict, key: str, entries: dict[int, dict]) -> StateDict:
    """``state_dict`` with ``entries[i]`` under ``state[i][key]`` (entries are copied, the
    base's live state is not touched)."""
    state = dict(state_dict["state"])
    for index, entry in entries.items():
        merged = dict(state.get(index, {}))
        _check_free(merged, key, index)
        merged[key] = entry
        state[index] = merged
    return {**state_dict, "state": state}


def attach_global(state_dict: StateDict, key: str, value: dict, params: list[torch.Tensor]) -> StateDict:
    """``state_dict`` with ``value`` under ``state[i][key]`` for ``i`` the first parameter
    (in ``param_groups`` order) that requires a gradient: the one whose state
    ``torch.distributed.checkpoint`` keeps (it drops the state of frozen parameters)."""
    index = next((i for i, p in enumerate(params) if p.requires_grad), 0)
    return attach_entries(state_dict, key, {index: value})


def detach(state_dict: StateDict, key: str) -> tuple[StateDict, dict[Any, Any]]:
    """Split what :func:`attach_entries` / :func:`attach_global` added: ``state_dict`` without
    ``key`` in any entry (an entry left empty is dropped), and ``{index: value}`` of what was
    there (indices as saved: integers, or parameter names after ``torch.distributed.checkpoint``)."""
    state, found = {}, {}
    for index, entry in state_dict["state"].items():
        if key in entry:
            found[index] = entry[key]
            entry = {k: v for k, v in entry.items() if k != key}
            if not entry:
                continue
        state[index] = entry
    return {**state_dict, "state": state}, found


def detach_global(state_dict: StateDict, key: str, owner: str) -> tuple[StateDict, Any]:
    """Split what :func:`attach_global` added: the base's state dict and the value under ``key``.

    Also reads the layout our wrappers saved before torch's (``{"base": <base state dict>,
    **own}``), returning that dict itself as the value; ``owner`` names the optimiser in the error
    for a state dict that holds the key in no entry or in several (one it did not save).
    """
    if "state" not in state_dict and "base" in state_dict:
        return state_dict["base"], state_dict
    base_state, found = detach(state_dict, key)
    if len(found) != 1:
        raise KeyError(f"optimizer state dict: {owner}'s own state ({key!r} in one entry of 'state') found in "
                       f"{len(found)} entries; allowed: exactly one (a state dict saved by {owner})")
    return base_state, next(iter(found.values()))
