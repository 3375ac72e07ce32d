"""Per-neuron feature vectors: what a controller reads about each neuron's learning state.

For every neuron of every layer (``[n_neurons, n_features]``, layers concatenated), with
``g`` the current gradient row, ``d`` the update the neuron received at the last step,
``w`` its weights and ``m`` the base optimiser's momentum (Adam's ``exp_avg``, SGD's
``momentum_buffer``; ``-d`` when the base keeps none):

=====================  =========================================================
``log_grad_norm``      ``log ||g||``
``log_update_ratio``   ``log ||d|| / ||w||``
``momentum_agreement`` ``cos(g, m)``: does the gradient still point where momentum goes
``hypergradient``      ``cos(g, d)``: the normalised one-step hypergradient of the
                       neuron's step size (Baydin et al. 2018, "Online learning rate
                       adaptation with hypergradient descent"); positive means the
                       last step overshot
``act_mean``           running mean of the neuron's output
``act_log_var``        log of its running variance
``act_entropy``        binned entropy of its outputs over ``log(bins)``
``surprise``           error of the controller's prediction of this step's statistics
``depth``              the layer's relative depth in the network, 0 to 1
=====================  =========================================================

Features are z-scored with running statistics (over neurons and time) before a controller
reads them, so their scales do not depend on the model (:class:`FeatureNormalizer`).
"""

from __future__ import annotations

import functools
import math

import torch

from ribbed.core.layers import NeuronLayer, joined, row_blocks

__all__ = ["FEATURE_NAMES", "FeatureNormalizer", "neuron_features"]

FEATURE_NAMES = (
    "log_grad_norm",
    "log_update_ratio",
    "momentum_agreement",
    "hypergradient",
    "act_mean",
    "act_log_var",
    "act_entropy",
    "surprise",
    "depth",
)
EPS = 1e-12


def _cos(dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    return dot / (sq_a * sq_b).sqrt().clamp_min(EPS)


@functools.lru_cache(maxsize=32)
def _depth_column(sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Each neuron's relative layer depth ``[N]`` (0 to 1), built once per network shape (never
    modified in place: it is only read into the feature matrix)."""
    depth_scale = max(1, len(sizes) - 1)
    return torch.cat([torch.full((n,), index / depth_scale, dtype=dtype, device=device)
                      for index, n in enumerate(sizes)])


def neuron_features(
    layers: list[NeuronLayer],
    prev: dict[torch.Tensor, torch.Tensor],
    momentum: dict[torch.Tensor, torch.Tensor],
    surprise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features ``[N, len(FEATURE_NAMES)]`` and the per-neuron hypergradient cosine ``[N]``.

    ``prev`` holds each parameter's value before the last step; ``momentum`` the base
    optimiser's momentum buffers where it has them. Only the row reductions (norms and inner
    products, :func:`_row_sums`) run per layer; every other operation (cosines, logs, the
    activation, surprise and depth columns) runs once on all neurons, so a refresh costs a
    fixed number of small ops beyond them. Elementwise ops give the same values whether they
    run per layer or on the concatenation.
    """
    sums = torch.cat([_row_sums(layer, prev, momentum) for layer in layers], dim=1)
    g_sq, d_sq, w_sq, m_sq, g_d, g_m, has_momentum = sums.unbind(0)
    hyper = _cos(g_d, g_sq, d_sq)
    agreement = _cos(g_m, g_sq, m_sq)
    if not bool(has_momentum.all()):  # a base without momentum buffers: the last step's direction is -d
        agreement = torch.where(has_momentum.bool(), agreement, -hyper)
    device = sums.device
    mean = torch.cat([layer.stats.mean.to(device) for layer in layers])
    var = torch.cat([layer.stats.var.to(device) for layer in layers])
    entropy = torch.cat([layer.stats.entropy.to(device) / math.log(layer.stats.bins) for layer in layers])
    depth = _depth_column(tuple(layer.n for layer in layers), mean.dtype, mean.device)
    features = torch.stack([
        0.5 * torch.log(g_sq + EPS), 0.5 * torch.log((d_sq + EPS) / (w_sq + EPS)), agreement, hyper,
        mean, torch.log(var + 1e-8), entropy, surprise.to(device), depth,
    ], dim=1).float()
    return features, features[:, FEATURE_NAMES.index("hypergradient")].clone()


def _row_sums(layer: NeuronLayer, prev: dict[torch.Tensor, torch.Tensor],
              momentum: dict[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One layer's per-neuron reductions ``[7, n]``: the squared norms of the gradient ``g``, the
    last update ``d``, the weights ``w`` and the momentum ``m``, the inner products ``<g, d>`` and
    ``<g, m>`` (weight row plus bias), and 1 where the layer has momentum (else the ``m`` rows
    are 0 and unused).

    The squared norms take ``vector_norm`` (one read of the rows; a dot product of the rows with
    themselves also writes and re-reads their product), the weight rows are reduced block by
    block (:func:`~ribbed.core.layers.row_blocks`: a large layer's tensors are read from memory
    once instead of once per reduction), and the bias terms go through one stacked op each."""
    grad_w, grad_b = layer.grad_pair()
    weight_w, weight_b = layer.own_pair()
    prev_w, prev_b = layer.pair(prev)
    n = grad_w.shape[0]
    flat_g, flat_w, flat_prev = (t.reshape(n, -1) for t in (grad_w, weight_w, prev_w))
    mom_w = momentum.get(layer.weight)
    mom_rows = layer.rows(mom_w).reshape(n, -1) if mom_w is not None else None
    norm_blocks, dot_blocks = [], []
    for block in row_blocks(flat_g):  # cache blocking: each block of every tensor is read from memory once
        g = flat_g[block]
        rows = [g, flat_w[block] - flat_prev[block], flat_w[block]]
        if mom_rows is not None:
            rows.append(mom_rows[block])
        norm_blocks.append(torch.stack([torch.linalg.vector_norm(t, dim=1) for t in rows]))
        dot_blocks.append(torch.stack([torch.linalg.vecdot(g, t) for t in rows[1::2]]))  # <g, d> and <g, m>
    norms, dots = joined(norm_blocks).square(), joined(dot_blocks)
    if grad_b is not None and weight_b is not None and prev_b is not None:
        mom_b = momentum.get(layer.bias) if mom_w is not None and layer.bias is not None else None
        bias = torch.stack([grad_b, weight_b - prev_b, weight_b] + ([mom_b] if mom_b is not None else []))
        if len(bias) == len(norms):
            norms = norms + bias.square()
            dots = dots + bias[0] * bias[1::2]
        else:  # the weight has momentum but the bias none yet: its momentum terms have no bias part
            norms = torch.cat([norms[:3] + bias.square(), norms[3:]])
            dots = torch.cat([dots[:1] + bias[0] * bias[1], dots[1:]])
    if mom_w is None:  # no momentum: zero rows for |m|^2 and <g, m>, flagged unused
        zero = norms.new_zeros(1, n)
        norms, dots = torch.cat([norms, zero]), torch.cat([dots, zero])
    return torch.cat([norms, dots, norms.new_full((1, n), float(mom_w is not None))])


class FeatureNormalizer:
    """Z-scores features with running statistics over neurons *and* time.

    Standardising across the neurons of one step alone would erase everything when there is
    one neuron (or when all neurons agree); running means and variances, updated with each
    refresh (EMA with ``momentum``), keep a neuron's features informative relative to the
    history of the whole network.
    """

    def __init__(self, momentum: float = 0.95):
        self.momentum = momentum
        self.mean: torch.Tensor | None = None
        self.sq_mean: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        mean, sq_mean = features.mean(0), features.pow(2).mean(0)
        if self.mean is None or self.sq_mean is None:
            self.mean, self.sq_mean = mean, sq_mean
        else:
            self.mean = self.mean.lerp(mean, 1 - self.momentum)
            self.sq_mean = self.sq_mean.lerp(sq_mean, 1 - self.momentum)

    def __call__(self, features: torch.Tensor, columns: list[int] | None = None) -> torch.Tensor:
        """The z-scored ``features`` (or of the given ``columns`` of the statistics)."""
        assert self.mean is not None and self.sq_mean is not None, "update() gives the statistics first"
        mean, sq_mean = (self.mean, self.sq_mean) if columns is None else (self.mean[columns], self.sq_mean[columns])
        std = (sq_mean - mean.pow(2)).clamp_min(0).sqrt()
        return (features - mean) / std.clamp_min(1e-3)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "sq_mean": self.sq_mean}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.sq_mean = state["mean"], state["sq_mean"]
