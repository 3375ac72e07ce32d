"""Activation checkpointing as a policy over a model's repeated blocks.

Checkpointing a stretch of blocks keeps only its input during the forward pass and
recomputes its internal activations during backward, trading compute for memory (Chen et
al., 2016, "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174). Every model
keeps its repeated blocks in ``model.blocks`` and runs them through :func:`run_blocks`; the
policy in ``model.checkpoint_policy`` decides how the blocks are grouped into segments and
which segments are recomputed.

Policies (``train.checkpointing`` in a config):

* ``none``: store every activation: fastest, most memory.
* ``every``: each block is its own checkpointed segment: only block inputs are stored,
  about one extra forward pass in backward. A block whose only stored tensor is its input
  (a ``Linear`` + ReLU MLP layer) saves nothing this way; segments do.
* ``every-<k>`` (e.g. ``every-4``): segments of ``k`` consecutive blocks, as
  ``torch.utils.checkpoint.checkpoint_sequential``: the input of every ``k``-th block is
  stored, and one segment's activations live at a time during backward.
* ``sqrt``: ``every-<ceil(sqrt(L))>`` for ``L`` blocks, Chen et al.'s ``O(sqrt(L))`` memory.
* ``selective``: every block checkpointed with PyTorch's selective activation checkpointing
  (``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the outputs of matrix
  multiplications, convolutions and fused attention are saved, the cheap element-wise ops
  (activations, norms, softmax, dropout) are recomputed (Korthikanti et al., 2022,
  "Reducing Activation Recomputation in Large Transformer Models", arXiv:2205.05198).

Selective checkpointing keeps the saved outputs in the checkpoint's own cache, out of sight
of ``torch.autograd.graph.saved_tensors_hooks``; :func:`observe_selective_saves` lets a
memory measurement (``ribbed.memory``) see them.

Example:
    >>> import torch
    >>> from ribbed.nn import build_model, set_checkpointing
    >>> model = set_checkpointing(build_model("mlp", input_shape=(8,), num_classes=2), "sqrt")
    >>> model(torch.randn(4, 8)).sum().backward()
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from ribbed.nn.registry import ModelError

Model = TypeVar("Model", bound=nn.Module)

__all__ = [
    "CHECKPOINT_POLICIES",
    "SELECTIVE_SAVE_OPS",
    "Segment",
    "checkpoint_segments",
    "observe_selective_saves",
    "run_blocks",
    "set_checkpointing",
]

CHECKPOINT_POLICIES: tuple[str, ...] = ("none", "every", "sqrt", "selective")
_EVERY_K = "every-"
_ALLOWED = f"{', '.join(CHECKPOINT_POLICIES)}, or every-<k> with k a positive integer"

_aten = torch.ops.aten
SELECTIVE_SAVE_OPS: frozenset = frozenset(
    op
    for op in (
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten.convolution.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
    )
)
"""Ops whose outputs the ``selective`` policy saves; everything else is recomputed."""


@dataclass(frozen=True)
class Segment:
    """Blocks ``start`` to ``stop - 1``, run as one unit; recomputed in backward if ``checkpointed``."""

    start: int
    stop: int
    checkpointed: bool


def _segments_of(n_blocks: int, size: int) -> list[Segment]:
    return [Segment(start, min(start + size, n_blocks), True) for start in range(0, n_blocks, size)]


def _parse(policy: str) -> tuple[str, int]:
    """``(kind, segment size)`` of a policy name, or :class:`ModelError` naming what is allowed."""
    if policy in CHECKPOINT_POLICIES:
        return policy, 1
    if isinstance(policy, str) and policy.startswith(_EVERY_K):
        size = policy[len(_EVERY_K):]
        if size.isdigit() and int(size) > 0:
            return "every", int(size)
    raise ModelError(f"unknown checkpoint policy {policy!r}; allowed: {_ALLOWED}")


def checkpoint_segments(policy: str, n_blocks: int) -> list[Segment]:
    """How ``policy`` groups ``n_blocks`` blocks into segments, in order."""
    kind, size = _parse(policy)
    if kind == "none" or n_blocks == 0:
        return [Segment(0, n_blocks, False)]
    if kind == "sqrt":
        size = math.ceil(math.sqrt(n_blocks))
    return _segments_of(n_blocks, size)


def set_checkpointing(model: Model, policy: str) -> Model:
    """Set ``model.checkpoint_policy`` to ``policy`` (see the module docstring).

    Returns the model, so the call can wrap ``build_model``.

    Raises:
        ModelError: for an unknown policy or a model without ``blocks``.
    """
    _parse(policy)
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList):
        raise ModelError(f"{type(model).__name__} has no `blocks` ModuleList to checkpoint")
    model.checkpoint_policy = policy  # type: ignore[assignment]  # torch's stub allows only tensors and modules
    return model


_selective_observers: list[Callable[[torch.Tensor], None]] = []


@contextlib.contextmanager
def observe_selective_saves(observer: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``observer(tensor)`` for each output the ``selective`` policy saves while active."""
    _selective_observers.append(observer)
    try:
        yield
    finally:
        _selective_observers.remove(observer)


def _save_matmul_outputs(ctx: SelectiveCheckpointContext, op, *args, **kwargs) -> CheckpointPolicy:
    if op not in SELECTIVE_SAVE_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if not ctx.is_recompute:
        outputs = ctx.op_output if isinstance(ctx.op_output, tuple | list) else (ctx.op_output,)
        for observer in _selective_observers:
            for output in outputs:
                if isinstance(output, torch.Tensor):
                    observer(output)
    return CheckpointPolicy.MUST_SAVE


_SELECTIVE_CONTEXT = functools.partial(create_selective_checkpoint_contexts, _save_matmul_outputs)


def _run_sequence(blocks: Iterable[nn.Module], x: Any) -> Any:
    for block in blocks:
        x = block(x)
    return x


def run_blocks(blocks: nn.ModuleList, x: Any, policy: str) -> Any:
    """Apply ``blocks`` in order to ``x``, checkpointing the segments that ``policy`` selects.

    ``x`` is whatever the blocks pass along: a tensor, or a tuple such as a recurrent
    layer's ``(sequence, hidden)``. Checkpointing only happens while training with grad
    enabled; in evaluation or under ``torch.no_grad`` nothing is saved for backward anyway.
    """
    if not (blocks.training and torch.is_grad_enabled()):
        return _run_sequence(blocks, x)
    extra: dict[str, Any] = {"context_fn": _SELECTIVE_CONTEXT} if policy == "selective" else {}
    for segment in checkpoint_segments(policy, len(blocks)):
        members = blocks[segment.start : segment.stop]
        if segment.checkpointed:
            x = checkpoint(_run_sequence, members, x, use_reentrant=False, **extra)
        else:
            x = _run_sequence(members, x)
    return x
