"""Training checkpoints that resume exactly and load safely.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers (model,
optimiser, scheduler and scaler states, RNG state, loop counters, metric history), so it
loads with ``weights_only=True``: no arbitrary code runs when a checkpoint is opened. It is
written atomically (``ribbed.runs.atomic``), so a process killed mid-write leaves the
previous checkpoint intact, never a corrupt one. Final weights are also
written as safetensors for use outside ribbed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ribbed.runs.atomic import atomic_write_bytes, atomic_writer

__all__ = ["save_checkpoint", "load_checkpoint", "save_weights", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or unreadable."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (tensors and plain Python containers only) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(f"cannot load checkpoint {str(path)!r}: {exc}") from None


def save_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Write the model's tensors as safetensors (tied weights stored once, contiguous)."""
    seen: dict[int, str] = {}
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    atomic_write_bytes(path, safetensors_bytes(tensors))
