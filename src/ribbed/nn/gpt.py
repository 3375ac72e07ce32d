"""A small GPT language model with swappable attention and feed-forward layers.

The model follows nanoGPT (Karpathy, github.com/karpathy/nanoGPT, ``model.py``), itself
GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners"):
learned position embeddings, pre-LayerNorm residual blocks, a final LayerNorm and an
LM head tied to the token embedding (Press & Wolf, 2017, arXiv:1608.05859).

Attention and feed-forward layers are looked up by name in :data:`ATTENTION` and
:data:`FEED_FORWARD`, so a variant is a registered class, not a copy of the model:

* attention: ``cls(n_embd, n_head, block_size, dropout, bias, **options)``, causal
  ``[B, T, C] -> [B, T, C]``;
* feed-forward: ``cls(n_embd, dropout, bias, **options)``, ``[B, T, C] -> [B, T, C]``.

A variant's own keyword arguments (a window size, a number of experts) are its options,
given as the model's ``attention_options`` / ``feed_forward_options`` and checked by name.

A layer that names its residual output projection ``c_proj`` gets GPT-2's scaled init.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ribbed.nn.checkpointing import run_blocks
from ribbed.nn.registry import (
    ModelError,
    check_dropout,
    check_option,
    is_positive_int,
    register_model,
)
from ribbed.registry import allowed_options

Layer = TypeVar("Layer", bound=type[nn.Module])

ATTENTION: dict[str, type[nn.Module]] = {}
FEED_FORWARD: dict[str, type[nn.Module]] = {}


def _registrar(
    registry: dict[str, type[nn.Module]], kind: str, name: str
) -> Callable[[Layer], Layer]:
    def decorate(cls: Layer) -> Layer:
        if name in registry:
            raise ModelError(f"{kind} {name!r} is already registered ({registry[name].__name__})")
        registry[name] = cls
        return cls

    return decorate


def register_attention(name: str) -> Callable[[Layer], Layer]:
    """Class decorator adding a causal self-attention layer to :data:`ATTENTION`."""
    return _registrar(ATTENTION, "attention", name)


def register_feed_forward(name: str) -> Callable[[Layer], Layer]:
    """Class decorator adding a position-wise feed-forward layer to :data:`FEED_FORWARD`."""
    return _registrar(FEED_FORWARD, "feed_forward", name)


_ATTENTION_ARGS = ("n_embd", "n_head", "block_size", "dropout", "bias")
_FEED_FORWARD_ARGS = ("n_embd", "dropout", "bias")


def _check_layer_options(
    field: str, name: str, cls: type[nn.Module], options: Any, positional: tuple[str, ...]
) -> dict:
    """``options`` as a dict after checking they are keyword arguments of ``cls``."""
    check_option(field, options, isinstance(options, dict), "a mapping of option names to values")
    allowed = allowed_options(cls.__init__, positional) or []
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ModelError(
            f"unknown {field} {unknown} for {name!r}; allowed: {', '.join(allowed) or '(none)'}"
        )
    return dict(options)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; subclasses supply :meth:`attend`.

    The projections (``c_attn`` for Q, K, V and ``c_proj`` for the output) are shared by
    all subclasses, so their state dicts are interchangeable.
    """

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of ``[B, H, T, D]`` queries over keys and values."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Widths come from the projections, not from ``x``: under tensor parallelism (Megatron
        # layout) ``c_attn`` gives only this rank's heads and ``n_head`` is the local count.
        batch, steps, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=2)
        q, k, v = (t.view(batch, steps, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = self.attend(q, k, v).transpose(1, 2).reshape(batch, steps, -1)
        return self.resid_dropout(self.c_proj(y))


@register_attention("sdpa")
class SDPAttention(CausalSelfAttention):
    """Attention through ``F.scaled_dot_product_attention``, which picks a fused kernel
    (FlashAttention, Dao et al., 2022, arXiv:2205.14135, or memory-efficient) when it can."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


@register_attention("naive")
class NaiveAttention(CausalSelfAttention):
    """Explicit ``softmax(Q K^T / sqrt(d) + causal mask) V`` (Vaswani et al., 2017,
    arXiv:1706.03762); the reference the fused path is tested against."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float, bias: bool):
        super().__init__(n_embd, n_head, block_size, dropout, bias)
        self.attn_dropout = nn.Dropout(dropout)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        steps = q.shape[-2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        future = torch.ones(steps, steps, dtype=torch.bool, device=q.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.attn_dropout(weights) @ v


@register_feed_forward("mlp")
class MLPFeedForward(nn.Module):
    """GPT-2's feed-forward layer: Linear to 4x width, GELU, Linear back, dropout."""

    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: ``x + attn(ln(x))``, then ``x + ff(ln(x))``."""

    def __init__(self, attention: nn.Module, feed_forward: nn.Module, n_embd: int, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = attention
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.ff = feed_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.ff(self.ln_2(x))


@register_model("gpt", "nanoGPT-style decoder-only transformer with swappable attention")
class GPT(nn.Module):
    """Decoder-only transformer language model; each transformer block is one of ``self.blocks``.

    Weights are drawn from N(0, 0.02), residual output projections (``c_proj``) from
    N(0, 0.02 / sqrt(2 n_layer)), biases are zero (GPT-2, as in nanoGPT).

    Args:
        input_shape: ``(block_size,)``, the longest sequence the model accepts.
        num_classes: vocabulary size.
        n_layer: number of transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: embedding width.
        dropout: dropout on embeddings, attention and residual branches.
        attention: a key of :data:`ATTENTION`.
        feed_forward: a key of :data:`FEED_FORWARD`.
        bias: whether Linear and LayerNorm layers have biases.
        attention_options: keyword options of the attention layer (e.g. ``{window: 32}``).
        feed_forward_options: keyword options of the feed-forward layer (e.g.
            ``{n_experts: 4}``).
    """

    tasks = ("language-modeling",)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        attention: str = "sdpa",
        feed_forward: str = "mlp",
        bias: bool = True,
        attention_options: dict | None = None,
        feed_forward_options: dict | None = None,
    ):
        super().__init__()
        check_option("input_shape", input_shape, len(input_shape) == 1, "(block_size,)")
        for field, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
            check_option(field, value, is_positive_int(value), "a positive integer")
        check_option("n_embd", n_embd, n_embd % n_head == 0, f"a multiple of n_head={n_head}")
        check_dropout(dropout)
        check_option("attention", attention, attention in ATTENTION, str(sorted(ATTENTION)))
        check_option(
            "feed_forward", feed_forward, feed_forward in FEED_FORWARD, str(sorted(FEED_FORWARD))
        )
        check_option("bias", bias, isinstance(bias, bool), "True or False")
        attention_options = _check_layer_options(
            "attention_options", attention, ATTENTION[attention],
            {} if attention_options is None else attention_options, _ATTENTION_ARGS,
        )
        feed_forward_options = _check_layer_options(
            "feed_forward_options", feed_forward, FEED_FORWARD[feed_forward],
            {} if feed_forward_options is None else feed_forward_options, _FEED_FORWARD_ARGS,
        )
        self.block_size = input_shape[0]
        self.wte = nn.Embedding(num_classes, n_embd)
        self.wpe = nn.Embedding(self.block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                ATTENTION[attention](
                    n_embd, n_head, self.block_size, dropout, bias, **attention_options
                ),
                FEED_FORWARD[feed_forward](n_embd, dropout, bias, **feed_forward_options),
                n_embd,
                bias,
            )
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, num_classes, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights(n_layer)
        self.checkpoint_policy = "none"

    def _init_weights(self, n_layer: int) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Map ``[B, T]`` int64 tokens, ``T <= block_size``, to ``[B, T, vocab]`` logits."""
        steps = idx.shape[1]
        if steps > self.block_size:
            raise ModelError(f"sequence length {steps} exceeds block_size={self.block_size}")
        positions = torch.arange(steps, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        x = run_blocks(self.blocks, x, self.checkpoint_policy)
        return self.lm_head(self.ln_f(x))
