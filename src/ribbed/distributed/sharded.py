"""Fully sharded data parallelism: ZeRO stages 2 (``zero2``) and 3 (``zero3``) on FSDP.

ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054) shards optimiser state (stage 1), then
gradients (2), then parameters (3) over the data-parallel ranks. PyTorch's FSDP (Zhao et
al. 2023, "PyTorch FSDP", arXiv:2304.11277) implements stages 2 and 3 as sharding
strategies; which engine runs them is the ``engine`` option:

* ``fsdp2`` (default): ``torch.distributed.fsdp.fully_shard``, parameters as DTensors;
  ``zero2`` keeps the gathered parameters from forward to backward
  (``reshard_after_forward=False``), ``zero3`` frees them after forward;
* ``fsdp``: the classic ``FullyShardedDataParallel`` wrapper, ``SHARD_GRAD_OP`` for
  ``zero2`` and ``FULL_SHARD`` for ``zero3``.

Each module of ``model.blocks`` is its own sharding unit, the rest of the model the root
unit, so at most one block's parameters are gathered at a time under ``zero3``.
"""

from __future__ import annotations

import contextlib
import functools

from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

from ribbed.distributed.state import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
)
from ribbed.distributed.strategy import (
    FullState,
    Strategy,
    register_strategy,
    require_whole_neurons,
)

__all__ = ["FullySharded", "ZeroStage2", "ZeroStage3"]

ENGINES = ("fsdp2", "fsdp")


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded on their own: the model's repeated ``blocks`` (if it has them)."""
    return list(getattr(model, "blocks", []))


class FullySharded(Strategy):
    """FSDP with parameters resharded after forward (``zero3``) or kept until backward (``zero2``).

    Args:
        engine: ``fsdp2`` (``fully_shard``) or ``fsdp`` (``FullyShardedDataParallel``).
    """

    reshard_after_forward = True

    def __init__(self, distributed, engine: str = "fsdp2"):
        super().__init__(distributed)
        if engine not in ENGINES:
            raise ValueError(f"engine: got {engine!r}; allowed: {', '.join(ENGINES)}")
        self.engine = engine

    def prepare(self, config, model, make_optimizer, gradient_method, precision, device):
        self.join(config, device)
        if self.engine == "fsdp2":
            for unit in sharding_units(model):
                fully_shard(unit, reshard_after_forward=self.reshard_after_forward)
            fully_shard(model, reshard_after_forward=self.reshard_after_forward)
        else:
            units = set(sharding_units(model))
            model = FullyShardedDataParallel(
                model,
                sharding_strategy=(ShardingStrategy.FULL_SHARD if self.reshard_after_forward
                                   else ShardingStrategy.SHARD_GRAD_OP),
                auto_wrap_policy=functools.partial(
                    lambda_auto_wrap_policy, lambda_fn=lambda module: module in units
                ),
                use_orig_params=True,
                device_id=device,
            )
        if precision.scaler is not None:  # fp16: unscale and check sharded gradients on all ranks
            precision.scaler = ShardedGradScaler(device.type)
        optimizer = make_optimizer(model)
        require_whole_neurons(optimizer, config.optimizer.name, self.name)
        return model, optimizer, gradient_method

    def no_sync(self, model, last_micro_batch):
        if self.engine == "fsdp":
            return contextlib.nullcontext() if last_micro_batch else model.no_sync()
        model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, model, max_norm):
        if self.engine == "fsdp":
            model.clip_grad_norm_(max_norm)
        else:
            super().clip_grad_norm_(model, max_norm)

    def weights(self, model):
        return FullState(full_model_state(model))

    def model_state_dict(self, model):
        return full_model_state(model)

    def load_model_state_dict(self, model, state):
        load_full_model_state(model, state)

    def optimizer_state_dict(self, model, optimizer):
        return full_optimizer_state(model, optimizer)

    def load_optimizer_state_dict(self, model, optimizer, state):
        load_full_optimizer_state(model, optimizer, state)


@register_strategy("zero2", "ZeRO stage 2 on FSDP: sharded gradients and optimiser state")
class ZeroStage2(FullySharded):
    name = "zero2"
    reshard_after_forward = False


@register_strategy("zero3", "ZeRO stage 3 on FSDP: sharded parameters, gradients and optimiser state")
class ZeroStage3(FullySharded):
    name = "zero3"
    reshard_after_forward = True
