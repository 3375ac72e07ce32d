"""Gradient compression for data parallelism, as DDP communication hooks.

DDP all-reduces gradients in buckets; a communication hook decides what is sent for each
bucket. Named here (``train.distributed.compression``, options in ``compression_options``):

* ``fp16`` / ``bf16``: cast each bucket to half precision for the all-reduce (PyTorch's
  ``fp16_compress_hook`` / ``bf16_compress_hook``). DDP refuses to register the bf16 hook
  unless NCCL is in use, but gloo reduces bf16 correctly, so it is registered through a thin
  function of our own that calls PyTorch's hook unchanged;
* ``powersgd``: PyTorch's PowerSGD hook (Vogels et al. 2019, "PowerSGD: Practical Low-Rank
  Gradient Compression for Distributed Optimization", arXiv:1905.13727), rank-``r``
  factors with error feedback and warm start;
* ``topk``: top-k sparsification with error feedback (Stich et al. 2018, "Sparsified SGD
  with Memory", arXiv:1809.07599; Lin et al. 2018, "Deep Gradient Compression",
  arXiv:1712.01887). PyTorch ships no top-k hook, so :func:`topk_hook` is ours: each rank
  adds its residual to the bucket, sends its ``k`` largest-magnitude entries (values and
  int32 indices, by all-gather), keeps the rest as the next residual, and every rank sums
  the gathered entries into a dense average.

Hooks carry real (not postponed) annotations: DDP checks them when a hook is registered.
The bytes each choice really sends are measured by
:class:`ribbed.distributed.communication.CommunicationCounter`.
"""


import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from ribbed.registry import Registry

__all__ = [
    "COMPRESSIONS",
    "TopKState",
    "attach_compression",
    "list_compressions",
    "register_compression",
    "sparsify",
    "topk_hook",
]

Hook = tuple[Any, Callable[..., Any]]  # (state, hook) as DistributedDataParallel.register_comm_hook takes

COMPRESSIONS: Registry[Hook | None] = Registry("gradient compression", "train.distributed.compression")


def register_compression(name: str, description: str):
    """Register ``factory(**options) -> (state, hook) | None`` (``None``: plain all-reduce)."""
    return COMPRESSIONS.register(name, description)


def list_compressions() -> dict[str, str]:
    return COMPRESSIONS.describe()


def attach_compression(model: DistributedDataParallel, name: str, options: dict) -> None:
    """Register compression ``name`` (with ``options``) on a DDP model."""
    hook = COMPRESSIONS.build(name, **options)
    if hook is not None:
        model.register_comm_hook(*hook)


@register_compression("none", "plain fp32 all-reduce of each gradient bucket (DDP's default)")
def no_compression() -> Hook | None:
    return None


@register_compression("fp16", "all-reduce buckets cast to float16 (torch fp16_compress_hook)")
def fp16_compression() -> Hook:
    return None, default_hooks.fp16_compress_hook


def bf16_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """PyTorch's ``bf16_compress_hook``, callable on gloo (see the module docstring)."""
    return default_hooks.bf16_compress_hook(state, bucket)


@register_compression("bf16", "all-reduce buckets cast to bfloat16 (torch bf16_compress_hook)")
def bf16_compression() -> Hook:
    return None, bf16_hook


@register_compression("powersgd", "low-rank PowerSGD with error feedback (torch powerSGD_hook)")
def powersgd_compression(
    rank: int = 1,
    start_iter: int = 2,
    min_compression_rate: float = 2.0,
    warm_start: bool = True,
    seed: int = 0,
) -> Hook:
    """``rank``: rank of the factors; ``start_iter``: plain all-reduce before this iteration
    (PyTorch requires at least 2 with error feedback); tensors compressing less than
    ``min_compression_rate`` are sent uncompressed."""
    if rank < 1:
        raise ValueError(f"train.distributed.compression_options.rank: got {rank}; allowed: >= 1")
    state = powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=rank,
        start_powerSGD_iter=start_iter,
        min_compression_rate=min_compression_rate,
        use_error_feedback=True,
        warm_start=warm_start,
        random_seed=seed,
    )
    return state, powerSGD_hook.powerSGD_hook


def sparsify(tensor: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest-magnitude entries of a flat tensor: ``(indices, values, rest)``.

    ``rest`` is ``tensor`` with those entries zeroed, so ``rest.index_add(0, indices, values)``
    is ``tensor`` again: nothing is lost, only delayed (the error-feedback invariant).
    """
    indices = tensor.abs().topk(k, sorted=False).indices
    return indices, tensor[indices], tensor.index_fill(0, indices, 0)


@dataclass
class TopKState:
    """Top-k hook settings and the per-bucket residuals (error feedback) of this rank."""

    ratio: float
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket over ranks from each rank's top-k entries (after error feedback)."""
    buffer = bucket.buffer()
    residual = state.residuals.get(bucket.index())
    if residual is not None and residual.shape == buffer.shape:  # buckets are rebuilt once
        buffer = buffer + residual
    k = max(1, math.ceil(state.ratio * buffer.numel()))
    indices, values, state.residuals[bucket.index()] = sparsify(buffer, k)
    world = dist.get_world_size()
    all_values = values.new_empty(world * k)
    all_indices = torch.empty(world * k, dtype=torch.int32, device=buffer.device)
    dist.all_gather_into_tensor(all_values, values.contiguous())
    dist.all_gather_into_tensor(all_indices, indices.to(torch.int32))
    dense = torch.zeros_like(buffer).index_add_(0, all_indices.long(), all_values).div_(world)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(dense)
    return future


@register_compression("topk", "top-k sparsification with error feedback (Stich et al. 2018)")
def topk_compression(ratio: float = 0.01) -> Hook:
    """``ratio``: fraction of each bucket's entries every rank sends per step."""
    if not 0 < ratio <= 1:
        raise ValueError(f"train.distributed.compression_options.ratio: got {ratio}; allowed: 0 < ratio <= 1")
    return TopKState(ratio), topk_hook
