"""Data parallelism: DDP (``ddp``) and DDP with a sharded optimiser (``zero1``).

``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training", arXiv:2006.15704): every
rank holds the whole model and optimiser, gradients are averaged in buckets during backward
(optionally compressed, see :mod:`ribbed.distributed.compression`).

``zero1``: the same, with ``torch.distributed.optim.ZeroRedundancyOptimizer``, which gives
each rank the optimiser state of a disjoint part of the parameters and broadcasts the
updated parameters after the step (ZeRO stage 1, Rajbhandari et al. 2020). The optimiser
is the run's own: the one ``ribbed.optim.build_optimizer`` made, rebuilt per shard from its
class and parameter groups.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from ribbed.distributed.compression import attach_compression
from ribbed.distributed.memory import optimizer_state_tensors, storage_bytes
from ribbed.distributed.strategy import Strategy, register_strategy
from ribbed.registry import allowed_options

__all__ = ["DataParallel", "ZeroStage1"]


@register_strategy("ddp", "DistributedDataParallel: full replicas, gradients all-reduced in buckets")
class DataParallel(Strategy):
    """Full model and optimiser on every rank; bucketed gradient all-reduce during backward.

    Args:
        bucket_cap_mb: size of DDP's gradient buckets.
    """

    name = "ddp"
    supports_compression = True

    def __init__(self, distributed, bucket_cap_mb: float = 25.0):
        super().__init__(distributed)
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb: got {bucket_cap_mb}; allowed: > 0")
        self.bucket_cap_mb = bucket_cap_mb

    def prepare(self, config, model, make_optimizer, gradient_method, precision, device):
        self.join(config, device)
        wrapped = DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            bucket_cap_mb=self.bucket_cap_mb,
            gradient_as_bucket_view=True,
        )
        attach_compression(wrapped, self.distributed.compression, self.distributed.compression_options)
        return wrapped, self.build_optimizer(model, make_optimizer), gradient_method

    def build_optimizer(self, model: nn.Module, make_optimizer) -> torch.optim.Optimizer:
        return make_optimizer(model)

    def no_sync(self, model, last_micro_batch):
        return super().no_sync(model, True) if last_micro_batch else model.no_sync()

    def evaluation_model(self, model):
        return model.module

    def model_state_dict(self, model):
        return model.module.state_dict()

    def load_model_state_dict(self, model, state):
        model.module.load_state_dict(state)


@register_strategy("zero1", "ZeRO stage 1: DDP with ZeroRedundancyOptimizer (sharded optimiser state)")
class ZeroStage1(DataParallel):
    """DDP whose optimiser state is partitioned over ranks (``ZeroRedundancyOptimizer``)."""

    name = "zero1"

    def build_optimizer(self, model, make_optimizer):
        template = make_optimizer(model)
        accepted = allowed_options(type(template))
        defaults = {key: value for key, value in template.defaults.items()
                    if accepted is None or key in accepted}
        try:
            return ZeroRedundancyOptimizer(
                [dict(group) for group in template.param_groups], optimizer_class=type(template),
                **defaults,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"optimizer.name: {type(template).__name__} cannot be rebuilt per shard from its "
                f"parameter groups ({exc}); allowed with zero1: optimisers constructed as "
                "cls(params, **defaults), e.g. the torch.optim ones"
            ) from None

    def model_state_bytes(self, model, optimizer):
        parameters = list(model.parameters())
        return (
            storage_bytes(parameters),
            storage_bytes(p.grad for p in parameters),
            storage_bytes(optimizer_state_tensors(optimizer.optim)),
        )

    def optimizer_state_dict(self, model, optimizer) -> dict[str, Any]:
        """Consolidated on rank 0 only (other ranks return an empty dict: theirs is never kept)."""
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if self.is_main else {}
