"""Model-state memory per rank: the bytes of parameters, gradients and optimiser state it holds.

ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", arXiv:1910.02054) is judged by how much of the model state each rank keeps. This
module measures it directly instead of quoting the paper's formula: it walks the tensors a
rank holds (local shards of DTensors, FSDP's flat parameters, DDP's gradient buckets, the
optimiser's state) and adds up the bytes of their distinct storages, so views and shared
buffers are counted once. On CPU there is no allocator counter to read, and the storages are
exactly what the engines keep alive between steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

__all__ = ["ModelStateBytes", "local_tensor", "storage_bytes"]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank stores (a DTensor's local shard)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (``None`` and empty tensors skipped)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        tensor = local_tensor(tensor)
        if tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor in ``optimizer.state`` (moments, step counters)."""
    return [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]


@dataclass
class ModelStateBytes:
    """Peak bytes per category seen by :meth:`observe` calls."""

    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0

    def observe(self, parameters: int, gradients: int, optimizer: int) -> None:
        self.parameters = max(self.parameters, parameters)
        self.gradients = max(self.gradients, gradients)
        self.optimizer = max(self.optimizer, optimizer)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    def as_metrics(self) -> dict[str, float]:
        return {
            "mem_params_mb": self.parameters / 2**20,
            "mem_grads_mb": self.gradients / 2**20,
            "mem_optim_mb": self.optimizer / 2**20,
            "mem_model_state_mb": self.total / 2**20,
        }
