"""Activation checkpointing as a policy over a model's repeated blocks.

Checkpointing a block keeps only its input during the forward pass and recomputes its
internal activations during backward, trading compute for memory (Chen et al., 2016,
"Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174). Every model keeps its
repeated blocks in ``model.blocks`` and runs them through :func:`run_blocks`; the policy in
``model.checkpoint_policy`` decides which blocks are checkpointed.

A policy is a function from the number of blocks to one flag per block, so adding a
policy is one function and one entry in ``_POLICIES``.

Example:
    >>> import torch
    >>> from ribbed.nn import build_model, set_checkpointing
    >>> model = set_checkpointing(build_model("mlp", input_shape=(8,), num_classes=2), "every")
    >>> model(torch.randn(4, 8)).sum().backward()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ribbed.nn.registry import ModelError

Model = TypeVar("Model", bound=nn.Module)


def _checkpoint_none(n_blocks: int) -> list[bool]:
    """Store every activation: fastest, most memory."""
    return [False] * n_blocks


def _checkpoint_every(n_blocks: int) -> list[bool]:
    """Store only block inputs and recompute each block in backward: about one extra forward."""
    return [True] * n_blocks


_POLICIES: dict[str, Callable[[int], list[bool]]] = {
    "none": _checkpoint_none,
    "every": _checkpoint_every,
}

CHECKPOINT_POLICIES: tuple[str, ...] = tuple(_POLICIES)


def _check_policy(policy: str) -> None:
    if policy not in _POLICIES:
        raise ModelError(f"unknown checkpoint policy {policy!r}; allowed: {CHECKPOINT_POLICIES}")


def checkpointed_blocks(policy: str, n_blocks: int) -> list[bool]:
    """Return, for each of ``n_blocks`` blocks, whether ``policy`` checkpoints it."""
    _check_policy(policy)
    return _POLICIES[policy](n_blocks)


def set_checkpointing(model: Model, policy: str) -> Model:
    """Set ``model.checkpoint_policy`` to ``policy`` (one of :data:`CHECKPOINT_POLICIES`).

    Returns the model, so the call can wrap ``build_model``.

    Raises:
        ModelError: for an unknown policy or a model without ``blocks``.
    """
    _check_policy(policy)
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise ModelError(f"{type(model).__name__} has no `blocks` ModuleList to checkpoint")
    model.checkpoint_policy = policy
    return model


def run_blocks(blocks: nn.ModuleList, x: Any, policy: str) -> Any:
    """Apply ``blocks`` in order to ``x``, checkpointing the blocks that ``policy`` selects.

    ``x`` is whatever the blocks pass along: a tensor, or a tuple such as a recurrent
    layer's ``(sequence, hidden)``. Checkpointing only happens while training with grad
    enabled; in evaluation or under ``torch.no_grad`` nothing is saved for backward anyway.
    """
    flags = checkpointed_blocks(policy, len(blocks))
    active = blocks.training and torch.is_grad_enabled()
    for block, flag in zip(blocks, flags, strict=True):
        x = checkpoint(block, x, use_reentrant=False) if flag and active else block(x)
    return x
