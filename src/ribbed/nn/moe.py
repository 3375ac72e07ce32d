"""Mixture-of-Experts feed-forward layer for the small GPT (registered as ``moe``).

Each token is routed to ``top_k`` of ``n_experts`` feed-forward networks (GPT-2's
Linear-GELU-Linear, one per expert) and their outputs are mixed by the router's gate values
(Shazeer et al., 2017, arXiv:1701.06538; GShard, Lepikhin et al., 2020, arXiv:2006.16668;
Switch Transformer, Fedus et al., 2022, arXiv:2101.03961):

* **router**: a bias-free linear map to ``n_experts`` logits, computed in float32 even under
  autocast (Switch's selective precision); gates are the softmax probabilities of the chosen
  experts, renormalised over the ``top_k`` choices when ``top_k > 1``.
* **capacity**: each expert takes at most ``ceil(capacity_factor * top_k * tokens /
  n_experts)`` tokens per batch. Choices are served first choice first, then in token
  order; a choice beyond its expert's capacity is dropped, and a token all of whose choices
  are dropped passes through the block's residual connection unchanged.
* **auxiliary losses** (added with :func:`ribbed.nn.add_aux_loss`): Switch's load-balancing
  loss ``n_experts * sum_e f_e P_e`` (``f_e`` the fraction of routing choices that picked
  expert ``e``, ``P_e`` its mean router probability; 1 when perfectly balanced) times
  ``balance_coef``, plus the router z-loss ``mean(logsumexp(logits)^2)`` of ST-MoE (Zoph et
  al., 2022, arXiv:2202.08906) times ``z_loss_coef``.
* **logging**: after each forward pass the layer keeps, detached, the fraction of routing
  choices each expert received (``expert_load``), the fraction dropped for capacity
  (``dropped_fraction``) and both auxiliary losses; the ``moe-load`` training plug-in
  (``ribbed.sparse``) puts them in the run's metrics.

Experts run together as batched matrix products over an ``[n_experts, capacity, width]``
buffer (no loop over experts); tokens are placed and gathered with index operations.

Why our own code: PyTorch has no MoE layer; the maintained libraries (DeepSpeed-MoE,
Tutel, MegaBlocks) target multi-GPU expert parallelism and CUDA kernels, and cannot run on
a CPU-only machine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ribbed.nn.auxiliary import add_aux_loss
from ribbed.nn.gpt import register_feed_forward
from ribbed.nn.registry import check_option, is_positive_int

__all__ = ["ExpertLinear", "MoEFeedForward", "expert_capacity"]


def expert_capacity(tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens each expert takes per batch: ``ceil(capacity_factor * top_k * tokens / n_experts)``."""
    return max(1, math.ceil(capacity_factor * top_k * tokens / n_experts))


class ExpertLinear(nn.Module):
    """``n_experts`` independent linear maps applied as one batched product.

    Input ``[n_experts, rows, in_features]``, output ``[n_experts, rows, out_features]``;
    weights ``[n_experts, in_features, out_features]`` drawn from N(0, 0.02) as GPT-2's.
    """

    def __init__(self, n_experts: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(n_experts, 1, out_features)) if bias else None
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


@register_feed_forward("moe")
class MoEFeedForward(nn.Module):
    """Top-k routed Mixture-of-Experts feed-forward layer, ``[B, T, C] -> [B, T, C]``.

    Args:
        n_embd: model width.
        dropout: dropout on the layer's output.
        bias: whether the experts' linear maps have biases.
        n_experts: number of experts.
        top_k: experts per token.
        capacity_factor: expert capacity relative to a perfectly even split (> 0).
        balance_coef: weight of the load-balancing loss (Switch uses 0.01).
        z_loss_coef: weight of the router z-loss (ST-MoE uses 0.001).
        hidden_mult: each expert's hidden width as a multiple of ``n_embd``.
    """

    def __init__(self, n_embd: int, dropout: float, bias: bool, n_experts: int = 4,
                 top_k: int = 1, capacity_factor: float = 1.25, balance_coef: float = 0.01,
                 z_loss_coef: float = 0.001, hidden_mult: int = 4):
        super().__init__()
        check_option("n_experts", n_experts, is_positive_int(n_experts), "a positive integer")
        check_option("top_k", top_k, is_positive_int(top_k) and top_k <= n_experts,
                     f"an integer from 1 to n_experts={n_experts}")
        for field, value, low_ok in (("capacity_factor", capacity_factor, False),
                                     ("balance_coef", balance_coef, True),
                                     ("z_loss_coef", z_loss_coef, True)):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            check_option(field, value, number and (value >= 0 if low_ok else value > 0),
                         "a number >= 0" if low_ok else "a number > 0")
        check_option("hidden_mult", hidden_mult, is_positive_int(hidden_mult), "a positive integer")
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor = capacity_factor
        self.balance_coef, self.z_loss_coef = balance_coef, z_loss_coef
        self.router = nn.Linear(n_embd, n_experts, bias=False)
        self.c_fc = ExpertLinear(n_experts, n_embd, hidden_mult * n_embd, bias)
        self.gelu = nn.GELU()
        self.c_proj = ExpertLinear(n_experts, hidden_mult * n_embd, n_embd, bias)
        self.dropout = nn.Dropout(dropout)
        self.expert_load = torch.zeros(n_experts)
        self.dropped_fraction = torch.zeros(())
        self.balance_loss = torch.zeros(())
        self.z_loss = torch.zeros(())

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits ``[N, E]`` (at least float32), and the chosen experts and gates ``[N, top_k]``."""
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        with torch.autocast(tokens.device.type, enabled=False):
            logits = F.linear(tokens.to(dtype), self.router.weight.to(dtype))
        probs = logits.softmax(dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, experts, gates

    def _record_aux_losses(self, logits: torch.Tensor, experts: torch.Tensor) -> None:
        choices = F.one_hot(experts.flatten(), self.n_experts).float()
        fraction = choices.mean(dim=0)
        mean_prob = logits.softmax(dim=-1).mean(dim=0)
        balance = self.n_experts * (fraction * mean_prob).sum()
        z_loss = logits.logsumexp(dim=-1).square().mean()
        add_aux_loss(self, self.balance_coef * balance + self.z_loss_coef * z_loss)
        self.expert_load = fraction.detach()
        self.balance_loss, self.z_loss = balance.detach(), z_loss.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        n_tokens, width = tokens.shape
        logits, experts, gates = self.route(tokens)
        self._record_aux_losses(logits, experts)

        # Choices in priority order: every token's first choice, then second choices, ...
        expert_of = experts.T.reshape(-1)
        token_of = torch.arange(n_tokens, device=x.device).repeat(self.top_k)
        gate_of = gates.T.reshape(-1)
        one_hot = F.one_hot(expert_of, self.n_experts)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
        capacity = expert_capacity(n_tokens, self.n_experts, self.top_k, self.capacity_factor)
        kept = position < capacity
        self.dropped_fraction = 1.0 - kept.float().mean()

        slot = (expert_of * capacity + position)[kept]
        token_of, gate_of = token_of[kept], gate_of[kept]
        buffer = tokens.new_zeros(self.n_experts * capacity, width).index_copy(
            0, slot, tokens[token_of])
        hidden = self.gelu(self.c_fc(buffer.view(self.n_experts, capacity, width)))
        expert_out = self.c_proj(hidden).reshape(self.n_experts * capacity, width)
        weighted = expert_out[slot] * gate_of[:, None].to(expert_out.dtype)
        mixed = weighted.new_zeros(n_tokens, width).index_add(0, token_of, weighted)
        return self.dropout(mixed.to(x.dtype).view_as(x))
