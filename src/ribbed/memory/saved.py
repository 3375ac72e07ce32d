"""Bytes that autograd keeps for the backward pass: the activation memory of training.

Every tensor an operation saves for its backward goes through
``torch.autograd.graph.saved_tensors_hooks``; :func:`track_saved_tensors` installs a pack
hook that records each saved tensor's storage once. Counting storages rather than tensors
matters: a ReLU's output and the next ``Linear``'s input are one storage, saved twice, held
once. Parameters (a ``Linear`` saves its weight) are not activations and are excluded by
passing them in ``exclude``.

Activation checkpointing keeps a segment's input through the same hooks, and its selective
variant keeps matmul outputs in a cache of its own, reported by
:func:`ribbed.nn.checkpointing.observe_selective_saves`; both are counted. What is counted
is what stays alive from the forward pass until backward (deterministic, device-independent);
the transient memory of recomputation during backward shows in the peak memory
(:mod:`ribbed.memory.peak`), not here.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(8, 8)
    >>> x = torch.randn(4, 8)
    >>> with track_saved_tensors(exclude=layer.parameters()) as saved:
    ...     loss = torch.relu(layer(x)).sum()
    >>> saved.bytes == 2 * 4 * 8 * 4  # x (saved by the matmul) and the ReLU output
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ribbed.nn.checkpointing import observe_selective_saves

__all__ = ["SavedTensors", "storage_key", "track_saved_tensors"]


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    """Identity of the memory behind ``tensor``: its device and storage address."""
    return str(tensor.device), tensor.untyped_storage().data_ptr()


@dataclass
class SavedTensors:
    """Unique storages saved for backward while tracking: their total bytes and number."""

    bytes: int = 0
    count: int = 0
    _seen: set[tuple[str, int]] = field(default_factory=set, init=False, repr=False)

    def ignore(self, tensors: Iterable[torch.Tensor]) -> None:
        """Never count the storages of ``tensors``."""
        self._seen.update(storage_key(tensor) for tensor in tensors)

    def record(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage unless it was counted (or excluded) already."""
        key = storage_key(tensor)
        if key in self._seen:
            return
        self._seen.add(key)
        self.bytes += tensor.untyped_storage().nbytes()
        self.count += 1


@contextlib.contextmanager
def track_saved_tensors(exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedTensors]:
    """Count the storages saved for backward inside the ``with`` block.

    Args:
        exclude: tensors whose storages are not counted (parameters, or the inputs of the
            piece being measured, such as attention's q, k and v).

    Yields:
        A :class:`SavedTensors` that fills in as operations save tensors.
    """
    saved = SavedTensors()
    saved.ignore(exclude)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.record(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            observe_selective_saves(saved.record):
        yield saved
