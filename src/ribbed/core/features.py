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

import math

import torch

from ribbed.core.layers import NeuronLayer, row_dot

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


def _row_sq(pair: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """Per-neuron squared norm of a (weight, bias) pair. ``vector_norm`` reads the rows once;
    a dot product of the rows with themselves also writes and re-reads their product, and a
    refresh takes four of these norms over every weight."""
    weight, bias = pair
    sq = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1).square()
    return sq if bias is None else sq + bias.square()


def _cos(dot: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    return dot / (sq_a * sq_b).sqrt().clamp_min(EPS)


def neuron_features(
    layers: list[NeuronLayer],
    prev: dict[torch.Tensor, torch.Tensor],
    momentum: dict[torch.Tensor, torch.Tensor],
    surprise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features ``[N, len(FEATURE_NAMES)]`` and the per-neuron hypergradient cosine ``[N]``.

    ``prev`` holds each parameter's value before the last step; ``momentum`` the base
    optimiser's momentum buffers where it has them. Only the gradient columns need each layer's
    rows; the activation, surprise and depth columns are concatenated over layers once, so a
    refresh runs a fixed number of small ops beyond the per-layer row norms.
    """
    gradient_columns = [_gradient_columns(layer, prev, momentum) for layer in layers]
    device = gradient_columns[0].device
    depth_scale = max(1, len(layers) - 1)
    sizes = [layer.n for layer in layers]
    mean = torch.cat([layer.stats.mean.to(device) for layer in layers])
    var = torch.cat([layer.stats.var.to(device) for layer in layers])
    entropy = torch.cat([layer.stats.entropy.to(device) / math.log(layer.stats.bins) for layer in layers])
    depth = torch.tensor([index / depth_scale for index in range(len(layers))], dtype=mean.dtype,
                         device=device).repeat_interleave(torch.tensor(sizes, device=device))
    features = torch.cat([
        torch.cat(gradient_columns),
        torch.stack([mean, torch.log(var + 1e-8), entropy, surprise.to(device), depth], dim=1),
    ], dim=1).float()
    return features, features[:, FEATURE_NAMES.index("hypergradient")].clone()


def _gradient_columns(layer: NeuronLayer, prev: dict[torch.Tensor, torch.Tensor],
                      momentum: dict[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One layer's ``log_grad_norm``, ``log_update_ratio``, ``momentum_agreement`` and
    ``hypergradient`` columns ``[n, 4]`` (the features that read the layer's weight rows)."""
    grad = layer.grad_pair()
    weight = layer.own_pair()
    previous = layer.pair(prev)
    update = (weight[0] - previous[0], None if weight[1] is None or previous[1] is None else weight[1] - previous[1])
    g_sq, d_sq, w_sq = _row_sq(grad), _row_sq(update), _row_sq(weight)
    hyper = _cos(row_dot(grad, update), g_sq, d_sq)
    if layer.weight in momentum:
        mom = (layer.rows(momentum[layer.weight]), momentum.get(layer.bias) if layer.bias is not None else None)
        agreement = _cos(row_dot(grad, mom), g_sq, _row_sq(mom))
    else:
        agreement = -hyper
    return torch.stack([0.5 * torch.log(g_sq + EPS), 0.5 * torch.log((d_sq + EPS) / (w_sq + EPS)), agreement, hyper],
                       dim=1)


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
