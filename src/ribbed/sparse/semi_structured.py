"""2:4 semi-structured sparsity: PyTorch's sparse kernel for NVIDIA GPUs (Ampere and later).

In every group of four consecutive weights along the input dimension, two are zero; sparse
tensor cores then multiply at up to twice the dense rate (Mishra et al., 2021, "Accelerating
Sparse Deep Neural Networks", arXiv:2104.08378). :func:`prune_2_to_4` makes such a mask by
magnitude (any device); :func:`measure_semi_structured_linear` times
``torch.sparse.to_sparse_semi_structured`` against the dense product and needs CUDA: without
it there is no kernel to measure and it returns ``None``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils import benchmark

__all__ = ["measure_semi_structured_linear", "prune_2_to_4"]


def prune_2_to_4(weight: torch.Tensor) -> torch.Tensor:
    """A boolean mask keeping the two largest-magnitude weights of every 4 along the last dim."""
    if weight.shape[-1] % 4:
        raise ValueError(f"weight.shape={tuple(weight.shape)}; allowed: a last dimension divisible by 4")
    groups = weight.detach().abs().reshape(-1, 4)
    keep = groups.topk(2, dim=1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True).view_as(weight)


def measure_semi_structured_linear(out_features: int = 4096, in_features: int = 4096,
                                   batch: int = 4096, dtype: torch.dtype = torch.float16,
                                   min_run_time: float = 0.5) -> dict[str, float] | None:
    """Median time of ``x @ W^T`` with ``W`` 2:4-sparse, dense against semi-structured.

    Returns ``None`` without CUDA; otherwise ``dense_ms``, ``sparse_ms``, ``speedup`` and the
    largest absolute difference of the two products.
    """
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda")
    weight = torch.randn(out_features, in_features, dtype=dtype, device=device)
    weight = weight * prune_2_to_4(weight)
    x = torch.randn(batch, in_features, dtype=dtype, device=device)
    sparse = torch.sparse.to_sparse_semi_structured(weight)
    times = {
        name: benchmark.Timer("F.linear(x, w)", globals={"F": F, "x": x, "w": w})
        .blocked_autorange(min_run_time=min_run_time).median * 1e3
        for name, w in (("dense_ms", weight), ("sparse_ms", sparse))
    }
    error = (F.linear(x, sparse) - F.linear(x, weight)).abs().max().item()
    return {**times, "speedup": times["dense_ms"] / times["sparse_ms"], "max_abs_error": error}
