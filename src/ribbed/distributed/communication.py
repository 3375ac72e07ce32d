"""Bytes communicated, measured at the collective calls themselves.

Every collective of ``torch.distributed`` (whoever issues it: DDP's reducer, a compression
hook, ZeroRedundancyOptimizer, FSDP, the pipeline schedules, DTensor) reaches the dispatcher
as a ``c10d::`` operator (DTensor's and the functional collectives as
``_c10d_functional::`` ones). :class:`CommunicationCounter` is a ``TorchDispatchMode`` that sees
those operators and adds up the bytes of the tensors this rank hands over to be sent, so one
counter measures every strategy the same way, including what a compression hook really
sends (fp16 buckets, PowerSGD's low-rank factors, top-k values and indices).

What is counted, per call: all-reduce and reduce: the buffer; all-gather: this rank's
input; reduce-scatter and all-to-all: the input; broadcast and scatter: the buffer at the
root only; send: the tensor; receives and barriers: nothing. This is the payload each rank
contributes, not the wire traffic of a particular algorithm (a ring all-reduce of ``N``
bytes moves ``2 (W-1)/W N`` per rank).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CommunicationCounter"]

_SENT_ARGUMENTS = {"tensors", "input_tensor", "input_tensors", "inputs", "input", "input_list"}
_NOTHING_SENT = {"recv_", "recv_any_source_", "barrier", "monitored_barrier_", "wait_tensor",
                 "_wrap_tensor_autograd"}  # the last two wait on or wrap a result, sending nothing
_ROOT_ONLY = {"broadcast_", "scatter_", "broadcast"}
_NAMESPACES = {"c10d", "_c10d_functional"}


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _is_root(bound: dict) -> bool:
    """Whether this rank is the source of a broadcast or scatter (functional ones name a global rank)."""
    if "root_rank" in bound:
        return bound["root_rank"] == torch.distributed.ProcessGroup.unbox(bound["process_group"]).rank()
    return bound["src"] == torch.distributed.get_rank()


def sent_bytes(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> int:
    """Bytes this rank contributes to one ``c10d`` collective call (see the module docstring)."""
    name = op._schema.name.split("::")[-1]
    if name in _NOTHING_SENT:
        return 0
    bound = dict(zip((a.name for a in op._schema.arguments), args, strict=False)) | kwargs
    if name in _ROOT_ONLY and not _is_root(bound):
        return 0
    return sum(_tensor_bytes(value) for key, value in bound.items() if key in _SENT_ARGUMENTS)


class CommunicationCounter(TorchDispatchMode):
    """Counts calls and bytes sent per ``c10d`` collective while active.

    Example:
        >>> counter = CommunicationCounter()
        >>> with counter:
        ...     loss.backward()          # doctest: +SKIP
        >>> counter.total_bytes          # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in _NAMESPACES:
            name = func._schema.name.split("::")[-1]
            self.calls[name] += 1
            self.bytes[name] += sent_bytes(func, args, kwargs)
        return func(*args, **kwargs)
