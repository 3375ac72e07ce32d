"""Tensor parallelism (``tensor``) on ``torch.distributed.tensor.parallel``, for the GPT.

Megatron-LM's layout (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism", arXiv:1909.08053): in every transformer block the
first linear layer of attention (``c_attn``) and of the feed-forward (``c_fc``) is split by
output rows (``ColwiseParallel``) and the second (``c_proj``) by input columns
(``RowwiseParallel``), so each rank computes its heads and its part of the hidden layer on
its own and one all-reduce per sub-layer sums the partial outputs, forward and backward.
Embeddings (tied with the LM head), LayerNorms and biases of ``c_proj`` stay replicated:
every rank sees the whole batch and computes them identically. They become replicated
DTensors (:func:`replicate_other_parameters`), so an optimiser sees one kind of tensor.

``c_attn`` packs the queries, keys and values of all heads as rows ``[q; k; v]``; cut into
contiguous row blocks as it is, rank 0 would get all of ``q`` and half of ``k``. The rows are
therefore reordered head-major before the layer is split — rank ``r``'s block is the ``q``,
``k`` and ``v`` rows of its heads, ``[q_r; k_r; v_r]`` — and each attention layer computes
on ``n_head / world`` heads (:func:`head_major_rows`). The reordering is internal:
checkpoints and weights are gathered and put back in the single-process order (and the
optimiser's per-row state with them), so a tensor-parallel checkpoint resumes in a single
process and the other way round.

Limits, checked when the run is built: the ``gpt`` model with the base attention forward
(``sdpa``, ``naive``) and the ``mlp`` feed-forward, ``n_head`` divisible by the number of
ranks, fp32, the ``backprop`` gradient method, not RIBBED.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

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
    require_backprop_fp32,
    require_whole_neurons,
)
from ribbed.nn.gpt import GPT, CausalSelfAttention, MLPFeedForward

__all__ = ["TensorParallel", "head_major_rows"]

BLOCK_PLAN = {
    "attn.c_attn": ColwiseParallel(),
    "attn.c_proj": RowwiseParallel(),
    "ff.c_fc": ColwiseParallel(),
    "ff.c_proj": RowwiseParallel(),
}
PACKED = ("attn.c_attn.weight", "attn.c_attn.bias")


def head_major_rows(n_embd: int, shards: int) -> torch.Tensor:
    """The permutation of ``c_attn``'s ``3 n_embd`` rows that gives shard ``r`` ``[q_r; k_r; v_r]``.

    Heads are contiguous row blocks of each of q, k and v, so with ``n_head`` a multiple of
    ``shards`` the ``r``-th ``n_embd / shards`` rows of each are whole heads.
    ``rows[head_major_rows(...)]`` is the tensor-parallel order; ``argsort`` of it undoes it.
    """
    per_shard = n_embd // shards
    return torch.cat([
        torch.arange(part * n_embd + shard * per_shard, part * n_embd + (shard + 1) * per_shard)
        for shard in range(shards) for part in range(3)
    ])


def replicate_other_parameters(model: nn.Module, mesh) -> None:
    """Make every parameter outside the parallel layers a replicated DTensor.

    Optimisers run ``torch._foreach_*`` kernels over all parameters, which refuse a mix of
    DTensors and plain tensors; with every parameter a DTensor any optimiser works. Each
    module holding such parameters (embeddings, LayerNorms, the LM head) takes and returns
    plain tensors, so the model's own forward is unchanged. Tied weights stay tied.
    """
    replicated: dict[nn.Parameter, nn.Parameter] = {}
    for module in list(model.modules()):
        direct = dict(module.named_parameters(recurse=False))
        if all(isinstance(parameter, DTensor) for parameter in direct.values()):
            continue
        for name, parameter in direct.items():
            if parameter in replicated:  # the other end of a tied weight, replicated already
                setattr(module, name, replicated[parameter])
        before = {name: parameter for name, parameter in direct.items() if parameter not in replicated}
        # torch annotates input_fn as returning None, but a forward pre-hook's result replaces the inputs
        distribute_module(module, mesh, input_fn=_replicated_inputs, output_fn=_local_outputs)  # type: ignore[arg-type]
        for name, parameter in before.items():
            replicated[parameter] = getattr(module, name)


def _replicated_inputs(module: nn.Module, inputs: tuple, mesh) -> tuple:
    return tuple(DTensor.from_local(x, mesh, [Replicate()]) if isinstance(x, torch.Tensor) else x
                 for x in inputs)


def _local_outputs(module: nn.Module, output: Any, mesh) -> Any:
    return output.to_local() if isinstance(output, DTensor) else output


def check_parallelisable(model: nn.Module, shards: int) -> None:
    """The model must be a GPT whose attention and feed-forward layers this plan knows."""
    if not isinstance(model, GPT):
        raise ValueError(f"model.name: got {type(model).__name__}; allowed with strategy 'tensor': gpt")
    for index, block in enumerate(model.blocks):
        attention, feed_forward = block.attn, block.ff
        if not isinstance(attention, CausalSelfAttention) or type(attention).forward is not CausalSelfAttention.forward:
            raise ValueError(
                f"model.options.attention: block {index} has {type(attention).__name__}; allowed "
                "with strategy 'tensor': attention with the packed q, k, v forward (sdpa, naive)"
            )
        if type(feed_forward) is not MLPFeedForward:
            raise ValueError(
                f"model.options.feed_forward: block {index} has {type(feed_forward).__name__}; "
                "allowed with strategy 'tensor': mlp"
            )
        if attention.n_head % shards:
            raise ValueError(
                f"model.options.n_head: got {attention.n_head}; allowed with strategy 'tensor' on "
                f"{shards} ranks: a multiple of {shards} (each rank computes whole heads)"
            )


@register_strategy("tensor", "tensor parallelism (torch.distributed.tensor.parallel) of the GPT's attention and MLP")
class TensorParallel(Strategy):
    """Megatron-style tensor parallelism over all ranks: heads and hidden units split, batch shared."""

    name = "tensor"

    def batch_shards(self) -> int:
        return 1  # every rank computes its part of every row

    def prepare(self, config, model, make_optimizer, gradient_method, precision, device):
        require_backprop_fp32(config, self.name)
        self.join(config, device)
        check_parallelisable(model, self.world_size)
        mesh = init_device_mesh(device.type, (self.world_size,))
        self.rows = head_major_rows(model.wte.embedding_dim, self.world_size).to(device)
        self.original_rows = torch.argsort(self.rows)
        for block in model.blocks:
            attention = block.attn
            with torch.no_grad():
                for parameter in (attention.c_attn.weight, attention.c_attn.bias):
                    if parameter is not None:
                        parameter.copy_(parameter[self.rows])
            parallelize_module(block, mesh, BLOCK_PLAN)
            attention.n_head //= self.world_size  # the forward takes its widths from c_attn
        replicate_other_parameters(model, mesh)
        optimizer = make_optimizer(model)
        require_whole_neurons(optimizer, config.optimizer.name, self.name)
        return model, optimizer, gradient_method

    # ------------------------------------------------------------------ single-process order

    def _reorder(self, state: dict[str, torch.Tensor], order: torch.Tensor) -> dict[str, torch.Tensor]:
        """``state`` with the packed q, k, v rows of every block put in ``order``."""
        return {key: value[order.to(value.device)] if key.endswith(PACKED) else value
                for key, value in state.items()}

    def _reorder_optimizer(self, model: nn.Module, optimizer, state: dict[str, Any],
                           order: torch.Tensor) -> dict[str, Any]:
        """An index-form optimiser ``state`` whose per-row tensors of ``c_attn`` are put in ``order``."""
        names = {parameter: name for name, parameter in model.named_parameters()}
        packed = {index for index, parameter in
                  enumerate(p for group in optimizer.param_groups for p in group["params"])
                  if names[parameter].endswith(PACKED)}
        reordered = {
            index: {key: value[order.to(value.device)] if index in packed and value.dim() > 0 else value
                    for key, value in entry.items()}
            for index, entry in state["state"].items()
        }
        return {**state, "state": reordered}

    def weights(self, model):
        return FullState(self.model_state_dict(model))

    def model_state_dict(self, model):
        return self._reorder(full_model_state(model), self.original_rows)

    def load_model_state_dict(self, model, state):
        load_full_model_state(model, self._reorder(state, self.rows))

    def optimizer_state_dict(self, model, optimizer):
        return self._reorder_optimizer(model, optimizer, full_optimizer_state(model, optimizer),
                                       self.original_rows)

    def load_optimizer_state_dict(self, model, optimizer, state):
        load_full_optimizer_state(model, optimizer, self._reorder_optimizer(model, optimizer, state, self.rows))
