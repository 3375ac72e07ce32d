"""Training FLOPs of a model whose weights are partly masked, counted by PyTorch.

``torch.utils.flop_counter.FlopCounterMode`` counts the floating-point operations of every
matmul and convolution in one forward and backward pass and attributes them to modules.
A layer with weight density ``d`` needs ``d`` of its dense FLOPs in all three products
(forward ``x W``, input gradient ``g W^T``, weight gradient restricted to live connections),
so the sparse count is ``total - sum_layers flops_l (1 - d_l)``: the figure Evci et al.
(2020, RigL) report, with kernels that exploit the sparsity assumed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ribbed.nn.auxiliary import pop_aux_loss

__all__ = ["TrainingFlops", "count_training_flops"]


class TrainingFlops:
    """Dense FLOPs of one training pass and the share of each masked layer."""

    def __init__(self, total: int, per_layer: Sequence[int]):
        self.total = total
        self.per_layer = torch.tensor(per_layer, dtype=torch.float64)

    def sparse_total(self, densities: torch.Tensor) -> float:
        """FLOPs when each counted layer keeps ``densities`` of its weights."""
        return self.total - float((self.per_layer * (1.0 - densities)).sum())


def count_training_flops(model: nn.Module, inputs: torch.Tensor, layers: Sequence[str]) -> TrainingFlops:
    """Count one forward and backward pass of ``model`` on ``inputs``.

    ``layers`` are module names (as in ``named_modules``) whose FLOPs are reported
    separately. The model runs in evaluation mode (no dropout, no batch-norm statistics
    update) and gradients are taken with ``torch.autograd.grad``, so nothing in the model or
    its ``.grad`` fields changes.
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        with FlopCounterMode(display=False) as counter:
            output = model(inputs)
            torch.autograd.grad(output.float().sum(), params, allow_unused=True)
        pop_aux_loss(model)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_layer = [sum(counts.get(f"{root}.{name}", {}).values()) for name in layers]
    return TrainingFlops(counter.get_total_flops(), per_layer)
