"""Sparse and modular training: sparse backprop, dynamic sparse training, lottery tickets,
MoE load logging, and 2:4 semi-structured sparsity.

Training plug-ins (name them in ``train.plugins``):

* ``topk-grad``: keep the top-k gradient entries each step, with error feedback;
* ``rigl``: RigL dynamic sparse training (drop by magnitude, grow by gradient);
* ``lottery-ticket``: iterative magnitude pruning with weight rewinding;
* ``moe-load``: per-expert load and router losses of MoE layers in the metrics rows.

Masks are applied to gradients before and to weights after every optimiser step, so every
optimiser respects them; the masked plug-ins report ``weight_sparsity`` and training FLOPs
(``flops_fraction``, counted with ``torch.utils.flop_counter``).
"""

from ribbed.sparse.flops import TrainingFlops, count_training_flops
from ribbed.sparse.lottery import LotteryTicket, global_magnitude_prune
from ribbed.sparse.masks import WeightMasks, reset_optimizer_state
from ribbed.sparse.moe_load import MoELoad
from ribbed.sparse.rigl import RigL, erk_densities, random_masks
from ribbed.sparse.semi_structured import measure_semi_structured_linear, prune_2_to_4
from ribbed.sparse.topk import TopKGradients, topk_with_feedback

__all__ = [
    "LotteryTicket",
    "MoELoad",
    "RigL",
    "TopKGradients",
    "TrainingFlops",
    "WeightMasks",
    "count_training_flops",
    "erk_densities",
    "global_magnitude_prune",
    "measure_semi_structured_linear",
    "prune_2_to_4",
    "random_masks",
    "reset_optimizer_state",
    "topk_with_feedback",
]
