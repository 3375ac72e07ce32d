"""The process group a distributed run joins, set up from torchrun's environment.

``torchrun`` (``torch.distributed.run``, also what ``ribbed run --nproc N`` starts) gives each
worker ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous address in its environment.
:func:`join_process_group` turns that into the default process group: gloo on CPU, NCCL on
CUDA, with ``timeout_s`` bounding every collective. The timeout is what makes a stuck peer
visible: a rank that stops answering makes the others raise instead of waiting forever (a
rank that dies outright is noticed sooner, when its sockets close, and torchrun then stops
the rest).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "broadcast_path",
    "collective_device",
    "is_launched",
    "join_process_group",
    "launched_rank",
    "launched_world_size",
    "resolve_backend",
]

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_launched() -> bool:
    """True inside a worker started by torchrun (its rendezvous variables are set)."""
    return all(name in os.environ for name in _LAUNCH_VARS)


def launched_rank() -> int:
    """This worker's global rank (0 outside a launch)."""
    return int(os.environ.get("RANK", "0")) if is_launched() else 0


def launched_world_size() -> int:
    """Number of workers of the launch (1 outside a launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if is_launched() else 1


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is NCCL for CUDA and gloo otherwise; NCCL without CUDA is an error."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"train.distributed.backend: got 'nccl' with train.device {device.type!r}; "
            "allowed: nccl needs CUDA devices; use 'gloo' or 'auto' on CPU"
        )
    return backend


def join_process_group(backend: str, timeout_s: float, device: torch.device) -> None:
    """Initialise the default process group from the launch environment (once per process).

    Raises:
        ValueError: the process was not started by a launcher, or the group that exists
            uses another backend.
    """
    backend = resolve_backend(backend, device)
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise ValueError(
                f"train.distributed.backend: got {backend!r} but this process already joined a "
                f"{dist.get_backend()!r} group; allowed: {dist.get_backend()!r} or 'auto'"
            )
        return
    if not is_launched():
        raise ValueError(
            "train.distributed.strategy: a distributed strategy needs several processes; "
            "start the run with `ribbed run --nproc N ...` or `torchrun -m ribbed run ...`"
        )
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def broadcast_path(path: Path, src: int = 0) -> Path:
    """Rank ``src``'s ``path`` on every rank (as UTF-8 bytes in a tensor: nothing is pickled)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return path
    device = collective_device()
    encoded = torch.tensor(list(str(path).encode()), dtype=torch.uint8, device=device)
    length = torch.tensor([encoded.numel()], device=device)
    dist.broadcast(length, src)
    if dist.get_rank() != src:
        encoded = torch.empty(int(length), dtype=torch.uint8, device=device)
    dist.broadcast(encoded, src)
    return Path(bytes(encoded.tolist()).decode())


def collective_device() -> torch.device:
    """Where tensors for the default group must live: the current GPU for NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
