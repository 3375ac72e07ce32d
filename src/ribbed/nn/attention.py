"""Causal attention variants for the small GPT: linear (Katharopoulos), Performer, sliding window.

Softmax attention costs ``O(T^2)`` time and keeps ``O(T^2)`` scores per head for backward
unless a fused kernel recomputes them (``sdpa`` in :mod:`ribbed.nn.gpt`). The layers here
change the computation itself:

* ``linear``: Katharopoulos et al., 2020, "Transformers are RNNs" (arXiv:2006.16236).
  ``softmax(q k^T)`` is replaced by the kernel ``phi(q) phi(k)^T`` with ``phi = elu + 1``,
  so causal attention is ``phi(q_i) S_i / phi(q_i) z_i`` with running sums
  ``S_i = sum_{j<=i} phi(k_j) v_j^T`` and ``z_i = sum_{j<=i} phi(k_j)``.
* ``performer``: Choromanski et al., 2021, "Rethinking Attention with Performers"
  (arXiv:2009.14794), FAVOR+: positive orthogonal random features
  ``phi(x) = exp(w^T x - |x|^2 / 2) / sqrt(m)`` give an unbiased estimate of the softmax
  kernel ``exp(q^T k / sqrt(d))``. The features are drawn once, when the layer is built
  (a persistent buffer), and never redrawn: recomputation under activation checkpointing
  then sees the same features, and a resumed run the same model.
* ``local``: sliding-window attention (Beltagy et al., 2020, "Longformer",
  arXiv:2004.05150; Child et al., 2019): query ``i`` attends to keys ``i - window < j <= i``.

Both linear kernels share :func:`causal_linear_attention`, which runs the prefix sums chunk
by chunk (the chunkwise form of Yang et al., 2024, "Gated Linear Attention Transformers",
arXiv:2312.06635): exact masked products inside each chunk of ``C`` positions, running
``[F, D]`` states between chunks, so what is kept for backward is ``O(T C + T F D / C)``
instead of the ``O(T F D)`` of a cumulative sum over every position. Sliding windows use the
same idea with PyTorch's fused ``scaled_dot_product_attention`` on blocks of ``window``
queries against the ``2 * window`` keys they can see, so memory and time are ``O(T window)``.

Why our own code: PyTorch ships neither linear attention nor FAVOR+; the packages that do
(``performer-pytorch``, ``pytorch-fast-transformers``) are unmaintained since 2021-2022 and
bring CUDA extensions or extra dependencies for a few lines of tensor algebra. PyTorch's
``flex_attention`` can express sliding windows but is only efficient under ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ribbed.nn.gpt import CausalSelfAttention, register_attention
from ribbed.nn.registry import check_option, is_positive_int

__all__ = [
    "LinearAttention",
    "LocalAttention",
    "PerformerAttention",
    "causal_linear_attention",
    "memory_optimal_chunk",
    "orthogonal_random_features",
    "sliding_window_attention",
]

def _pad_to_multiple(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., T, D]`` padded with zero positions to a multiple of ``size`` (no copy if it is one)."""
    missing = -x.shape[-2] % size
    return F.pad(x, (0, 0, 0, missing)) if missing else x


def memory_optimal_chunk(n_features: int, head_dim: int) -> int:
    """``ceil(sqrt(F D))``: the chunk size minimising ``T C + T F D / C``, the per-chunk scores
    plus the running states that :func:`causal_linear_attention` keeps for backward."""
    return math.ceil(math.sqrt(n_features * head_dim))


def causal_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Causal kernelised attention ``y_i = sum_{j<=i} (phi_q_i . phi_k_j) v_j / sum_{j<=i} phi_q_i . phi_k_j``.

    Args:
        phi_q, phi_k: non-negative features ``[..., T, F]`` of queries and keys.
        v: values ``[..., T, D]``.
        chunk_size: positions per chunk; larger chunks keep more per-chunk scores and fewer
            running states (default: :func:`memory_optimal_chunk`).
        eps: added to the normaliser (positive features make it positive already).

    Returns:
        ``[..., T, D]``.
    """
    steps = v.shape[-2]
    if chunk_size is None:
        chunk_size = memory_optimal_chunk(phi_q.shape[-1], v.shape[-1])
    size = min(chunk_size, steps)
    q, k, values = (_pad_to_multiple(t, size) for t in (phi_q, phi_k, v))
    chunks = q.shape[-2] // size
    q, k, values = (t.unflatten(-2, (chunks, size)) for t in (q, k, values))
    within = (q @ k.transpose(-2, -1)).tril()
    states = k.transpose(-2, -1) @ values
    key_sums = k.sum(dim=-2, keepdim=True)
    earlier_states = states.cumsum(dim=-3) - states
    earlier_key_sums = key_sums.cumsum(dim=-3) - key_sums
    numerator = within @ values + q @ earlier_states
    denominator = within.sum(dim=-1, keepdim=True) + q @ earlier_key_sums.transpose(-2, -1)
    out = numerator / (denominator + eps)
    return out.flatten(-3, -2)[..., :steps, :]


def _check_chunk(chunk_size: int | None) -> None:
    check_option("chunk_size", chunk_size, chunk_size is None or is_positive_int(chunk_size),
                 "a positive integer, or null for the memory-optimal size")


@register_attention("linear")
class LinearAttention(CausalSelfAttention):
    """Causal linear attention with ``phi(x) = elu(x) + 1`` (Katharopoulos et al., 2020).

    ``dropout`` applies to the residual output only: there is no attention matrix to drop.

    Args:
        chunk_size: positions per chunk of :func:`causal_linear_attention` (default:
            memory-optimal).
    """

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float, bias: bool,
                 chunk_size: int | None = None):
        super().__init__(n_embd, n_head, block_size, dropout, bias)
        _check_chunk(chunk_size)
        self.chunk_size = chunk_size

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_linear_attention(F.elu(q) + 1, F.elu(k) + 1, v, self.chunk_size)


def orthogonal_random_features(
    n_features: int, dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[n_features, dim]`` Gaussian directions, orthogonal within each block of ``dim`` rows.

    Rows are orthonormalised by QR in blocks of ``dim`` and rescaled to the norms of
    independent Gaussian vectors (chi-distributed), as FAVOR+ prescribes: the estimate stays
    unbiased and its variance drops (Choromanski et al., 2021, section 2.4).
    """
    blocks = []
    for start in range(0, n_features, dim):
        gaussian = torch.randn(dim, dim, generator=generator)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T[: min(dim, n_features - start)])
    norms = torch.randn(n_features, dim, generator=generator).norm(dim=1, keepdim=True)
    return torch.cat(blocks) * norms


@register_attention("performer")
class PerformerAttention(CausalSelfAttention):
    """Causal Performer attention, FAVOR+ positive orthogonal random features.

    With ``q' = q / d^{1/4}`` and ``k' = k / d^{1/4}``, ``exp(q'.k')`` is the softmax kernel of
    scaled dot-product attention; ``phi(x) = exp(W x - |x|^2 / 2 - c) / sqrt(m)`` estimates
    it without bias. The stabiliser ``c`` (a per-query maximum for queries, one maximum per
    batch and head for keys, both detached) cancels between numerator and normaliser.

    Args:
        n_features: random features ``m`` per head (default: ``4 * head_dim``).
        chunk_size: positions per chunk of :func:`causal_linear_attention` (default:
            memory-optimal).
    """

    features: torch.Tensor  # the random features [m, head_dim], a buffer

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float, bias: bool,
                 n_features: int | None = None, chunk_size: int | None = None):
        super().__init__(n_embd, n_head, block_size, dropout, bias)
        head_dim = n_embd // n_head
        n_features = 4 * head_dim if n_features is None else n_features
        check_option("n_features", n_features, is_positive_int(n_features), "a positive integer")
        _check_chunk(chunk_size)
        self.chunk_size = chunk_size
        self.register_buffer("features", orthogonal_random_features(n_features, head_dim))

    def feature_map(self, x: torch.Tensor, *, is_query: bool) -> torch.Tensor:
        """FAVOR+ features ``[..., T, m]`` of queries or keys ``[..., T, d]``."""
        x = x * x.shape[-1] ** -0.25
        projected = x @ self.features.T.to(x.dtype)
        log_phi = projected - x.square().sum(dim=-1, keepdim=True) / 2
        dims = (-1,) if is_query else (-2, -1)
        stabiliser = log_phi.detach().amax(dim=dims, keepdim=True)
        return (log_phi - stabiliser - 0.5 * math.log(self.features.shape[0])).exp()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_linear_attention(
            self.feature_map(q, is_query=True), self.feature_map(k, is_query=False), v,
            self.chunk_size,
        )


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal attention of ``[B, H, T, D]`` queries over the ``window`` most recent keys.

    Positions are cut into blocks of ``C = min(window, T)`` queries; each block attends to
    its own keys and the previous block's through ``scaled_dot_product_attention`` with a
    boolean mask allowing key ``j`` for query ``i`` when ``0 <= i - j < window``.
    """
    batch, heads, steps, dim = q.shape
    size = min(window, steps)
    q, k, v = (_pad_to_multiple(t, size) for t in (q, k, v))
    chunks = q.shape[-2] // size
    q, k, v = (t.unflatten(-2, (chunks, size)) for t in (q, k, v))
    k, v = (torch.cat([F.pad(t, (0, 0, 0, 0, 1, 0))[..., :-1, :, :], t], dim=-2) for t in (k, v))
    query = torch.arange(size, device=q.device)[:, None]
    key = torch.arange(2 * size, device=q.device)[None, :]
    distance = size + query - key
    chunk = torch.arange(chunks, device=q.device)[:, None, None]
    mask = (distance >= 0) & (distance < window) & ((chunk > 0) | (key >= size))
    out = F.scaled_dot_product_attention(
        q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2), attn_mask=mask.repeat(heads, 1, 1),
        dropout_p=dropout_p,
    )
    return out.unflatten(1, (heads, chunks)).flatten(2, 3)[:, :, :steps]


@register_attention("local")
class LocalAttention(CausalSelfAttention):
    """Sliding-window causal attention: each position sees itself and ``window - 1`` earlier ones.

    Args:
        window: positions each query attends to (default 64); a window of at least the
            sequence length is full causal attention.
    """

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float, bias: bool,
                 window: int = 64):
        super().__init__(n_embd, n_head, block_size, dropout, bias)
        check_option("window", window, is_positive_int(window), "a positive integer")
        self.window = window

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        return sliding_window_attention(q, k, v, self.window, dropout_p)
