"""Distributed training on PyTorch's own engines, launched by torchrun.

``ribbed run --nproc N CONFIG`` (or ``torchrun --nproc-per-node N -m ribbed run CONFIG`` on
several nodes) runs the one training loop on ``N`` processes: gloo on CPU, NCCL on GPU.
``train.distributed.strategy`` names how the run is spread out:

=========  ==============================================================================
ddp        ``DistributedDataParallel``; ``compression``: fp16, bf16, powersgd, topk
zero1      DDP + ``ZeroRedundancyOptimizer`` (optimiser state sharded)
zero2      FSDP2 ``fully_shard(reshard_after_forward=False)`` or FSDP ``SHARD_GRAD_OP``
zero3      FSDP2 ``fully_shard`` or FSDP ``FULL_SHARD`` (parameters sharded too)
deepspeed  a DeepSpeed engine, ZeRO ``stage`` 0-3 (with the ``deepspeed`` extra)
pipeline   ``torch.distributed.pipelining``: one stage per rank, ``schedule`` gpipe or 1f1b
tensor     ``torch.distributed.tensor.parallel``: the GPT's heads and MLP split Megatron-style
=========  ==============================================================================

Every strategy feeds the same global batch as a single process, reports per-rank memory of
parameters, gradients and optimiser state, step time and bytes communicated in the metrics,
and writes full single-process checkpoints (see :mod:`ribbed.distributed.strategy`).

Example (two CPU processes, ZeRO-3 on FSDP2)::

    ribbed run --nproc 2 my_run.yaml --set train.distributed.strategy=zero3
"""

from ribbed.distributed import (  # noqa: F401  (registers the strategies)
    data_parallel,
    deepspeed_engine,
    pipeline,
    sharded,
    tensor_parallel,
)
from ribbed.distributed.compression import (
    COMPRESSIONS,
    list_compressions,
    register_compression,
)
from ribbed.distributed.launch import DistributedRunError, launch
from ribbed.distributed.strategy import (
    STRATEGIES,
    Strategy,
    build_strategy,
    list_strategies,
    register_strategy,
)

__all__ = [
    "COMPRESSIONS",
    "STRATEGIES",
    "DistributedRunError",
    "Strategy",
    "build_strategy",
    "launch",
    "list_compressions",
    "list_strategies",
    "register_compression",
    "register_strategy",
]
