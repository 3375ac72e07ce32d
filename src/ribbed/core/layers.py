"""Neurons as RIBBED sees them: rows of ``Linear`` and ``Conv`` layers, and their activations.

A neuron is one output unit of a ``Linear`` layer (a weight row plus its bias) or one output
channel of a convolution. Each :class:`NeuronLayer` keeps the layer's parameters, its place in
the global neuron index (``offset``), and running statistics of its outputs collected by a
forward hook. Every per-neuron quantity is computed for a whole layer at once on
``[n_neurons, fan_in]`` views; the only Python loop is over layers (a handful per model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ActivationStats", "IndexedHook", "NeuronLayer", "bin_indices", "binned_entropy", "entropy_of_counts",
    "find_neuron_layers", "offset_counts", "row_dot", "row_sq_norm",
]

NEURON_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def row_dot(a: tuple[torch.Tensor, torch.Tensor | None], b: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """Per-neuron inner product of two (weight, bias) pairs: ``[n_neurons]``."""
    out = torch.linalg.vecdot(_rows(a[0]), _rows(b[0]))
    if a[1] is not None and b[1] is not None:
        out = out + a[1] * b[1]
    return out


def row_sq_norm(a: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """Per-neuron squared norm of a (weight, bias) pair."""
    return row_dot(a, a)


class ActivationStats:
    """Running mean, variance and binned entropy of each neuron's output, from a forward hook.

    Statistics are taken only while :attr:`recording` is on (RIBBED turns it on for the
    steps that refresh features) and the module is training (evaluation passes are not
    learning signals), as exponential moving averages with ``momentum``. The
    entropy of a neuron is that of its outputs in the batch binned into ``bins`` equal bins
    spanning mean ± 3 standard deviations (running values), in nats; a constant output has
    entropy 0 and a uniform spread over the bins has ``log(bins)``.
    """

    def __init__(self, n_neurons: int, neuron_dim: int, *, bins: int = 16, momentum: float = 0.9):
        self.neuron_dim, self.bins, self.momentum = neuron_dim, bins, momentum
        self.mean = torch.zeros(n_neurons)
        self.var = torch.ones(n_neurons)
        self.entropy = torch.zeros(n_neurons)
        self.recording = False
        self.seen = False
        self.passes = 0  # training forward passes recorded since the owner last reset it

    def samples(self, output: torch.Tensor) -> torch.Tensor:
        """The output as ``[samples, n_neurons]`` (batch and spatial/time positions as samples)."""
        return output.detach().movedim(self.neuron_dim, -1).reshape(-1, output.shape[self.neuron_dim])

    def neuron_major(self, output: torch.Tensor) -> torch.Tensor:
        """The samples of :meth:`samples` as ``[n_neurons, samples]``, one contiguous row per
        neuron (one copy). Per-neuron reductions then run along memory: over the columns of a
        tall, narrow ``[samples, n]`` matrix (a convolution's ``batch * length`` positions of a
        few channels) torch's CPU ``amin``/``var`` are ten to forty times slower."""
        n = output.shape[self.neuron_dim]
        return output.detach().movedim(self.neuron_dim, 0).reshape(n, -1).contiguous()

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if not self.recording or not module.training:
            return
        self.passes += 1
        x = self.neuron_major(output).float().t()
        if self.mean.device != x.device:
            self.mean, self.var, self.entropy = (t.to(x.device) for t in (self.mean, self.var, self.entropy))
        # Two-pass variance: torch's single-pass (Welford) ``var`` is ~20x slower on CPU here, and
        # the two-pass sum is as accurate in float32 (both within 2e-7 of float64).
        mean = x.mean(0)
        var = (x - mean).square_().mean(0)
        entropy = binned_entropy(x, self.bins)
        running = [self.mean, self.var, self.entropy]
        if not self.seen:
            torch._foreach_copy_(running, [mean, var, entropy])
            self.seen = True
        else:
            torch._foreach_lerp_(running, [mean, var, entropy], 1 - self.momentum)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "entropy": self.entropy, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.entropy = state["mean"].clone(), state["var"].clone(), state["entropy"].clone()
        self.seen = state["seen"]


def bin_indices(samples: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin of every entry of ``samples [S, n]``: ``bins`` equal bins between each column's min
    and max, as ``[S, n]`` integers in ``[0, bins)`` (a constant column falls in bin 0)."""
    low = samples.amin(0)
    span = (samples.amax(0) - low).clamp_min_(1e-12)
    return samples.sub(low).div_(span).mul_(bins).long().clamp_(0, bins - 1)


def offset_counts(index: torch.Tensor, cells: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-column histograms ``[n, cells]`` of integer cells ``index [S, n]`` (values in
    ``[0, cells)``): column ``j``'s cells are shifted by ``j * cells`` so one ``bincount``
    counts every column at once (integer counts: exact, and an order of magnitude faster on
    CPU than a floating-point ``scatter_add``)."""
    n = index.shape[1]
    flat = index + torch.arange(n, device=index.device) * cells
    return torch.bincount(flat.reshape(-1), minlength=n * cells).view(n, cells).to(dtype)


def entropy_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """Plug-in entropy (nats) of each row of histogram ``counts [..., cells]``."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def binned_entropy(samples: torch.Tensor, bins: int) -> torch.Tensor:
    """Entropy (nats) of each column of ``samples [S, n]`` binned into ``bins`` equal bins
    between the column's min and max; all neurons at once with one ``bincount``."""
    dtype = torch.promote_types(samples.dtype, torch.float32)
    return entropy_of_counts(offset_counts(bin_indices(samples, bins), bins, dtype))


@dataclass
class IndexedHook:
    """A module hook that calls ``owner.<method>(index, *hook_args)``. Unlike a closure (which
    ``copy.deepcopy`` and ``pickle`` keep as the same object, or refuse), it is copied with its
    owner, so the hooks of a copied model feed the copied optimiser, not the original."""

    owner: object
    method: str
    index: int

    def __call__(self, *args):
        return getattr(self.owner, self.method)(self.index, *args)


@dataclass
class NeuronLayer:
    """One layer's neurons: its parameters, global index range, and activation statistics."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None
    offset: int
    stats: ActivationStats
    handle: object = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight.shape[1:]) + (1 if self.bias is not None else 0)

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def pair(self, tensors: dict[nn.Parameter, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight-shaped, bias-shaped)`` entries of ``tensors`` for this layer."""
        return tensors[self.weight], None if self.bias is None else tensors[self.bias]


def find_neuron_layers(model: nn.Module, params: set[nn.Parameter], *, bins: int = 16,
                       hooks: bool = True) -> list[NeuronLayer]:
    """Every ``Linear``/``Conv`` layer of ``model`` whose weight is optimised, in module order.

    A weight shared by two modules (tied embeddings) is counted once, at its first module.
    """
    layers: list[NeuronLayer] = []
    seen: set[int] = set()
    offset = 0
    for name, module in model.named_modules():
        if not isinstance(module, NEURON_MODULES) or module.weight not in params or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        bias = module.bias if module.bias is not None and module.bias in params else None
        neuron_dim = -1 if isinstance(module, nn.Linear) else 1
        layer = NeuronLayer(name, module, module.weight, bias, offset,
                            ActivationStats(module.weight.shape[0], neuron_dim, bins=bins))
        if hooks:
            layer.handle = module.register_forward_hook(layer.stats)
        layers.append(layer)
        offset += layer.n
    return layers
