"""Neurons as RIBBED sees them: rows of ``Linear`` and ``Conv`` layers, and their activations.

A neuron is one output unit of a ``Linear`` layer (a weight row plus its bias) or one output
channel of a convolution. transformers' ``Conv1D`` (GPT-2's attention and MLP projections) is a
``Linear`` whose weight is stored transposed, ``[in, out]``: its neurons are weight *columns*,
and :meth:`NeuronLayer.rows` gives every per-neuron computation the neuron-major view. A weight
tied to an embedding (GPT-2's ``lm_head`` shares ``wte``) is not a layer of neurons (its rows
are the vocabulary's embeddings) and steps as the plain base. Each :class:`NeuronLayer` keeps
the layer's parameters, its place in the global neuron index (``offset``), and running
statistics of its outputs collected by a forward hook. Every per-neuron quantity is computed
for a whole layer at once on
``[n_neurons, fan_in]`` views; the only Python loop is over layers (a handful per model).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "ActivationStats", "IndexedHook", "NeuronLayer", "bin_indices", "binned_entropy", "coverage_report",
    "entropy_of_counts", "find_neuron_layers", "is_transposed_linear", "neuron_modules", "offset_counts",
    "joined", "row_blocks", "row_dot",
]

NEURON_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SMALL_COVERAGE = 0.5
"""Below this share of the optimised parameters in neuron layers, :func:`coverage_report` warns."""


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W [in, out]``,
    a ``Linear`` stored transposed (recognised by name, so transformers need not be installed)."""
    cls = type(module)
    if not (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def neuron_modules(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, transposed)`` of every ``Linear``/``Conv``/transformers ``Conv1D`` of
    ``model`` in module order, except a module whose weight is also a parameter of a module of
    another kind (a ``Linear`` head tied to an ``Embedding``: its rows are token embeddings,
    not neurons). A weight shared by two neuron modules is listed at its first module only."""
    other_kinds = {id(p) for module in model.modules()
                   if not isinstance(module, NEURON_MODULES) and not is_transposed_linear(module)
                   for p in module.parameters(recurse=False)}
    found, seen = [], set()
    for name, module in model.named_modules():
        transposed = is_transposed_linear(module)
        if not (transposed or isinstance(module, NEURON_MODULES)):
            continue
        if id(module.weight) in other_kinds or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        found.append((name, module, transposed))
    return found


def coverage_report(owner: str, covered: Sequence[torch.Tensor], params: Sequence[torch.Tensor], what: str) -> str:
    """One line saying which share of the optimised ``params`` lies in ``covered`` (the neuron
    layers' parameters); a warning when it is below :data:`SMALL_COVERAGE`, so a model whose
    layers the optimiser does not recognise does not silently get only its base."""
    total = sum(p.numel() for p in {id(p): p for p in params}.values())
    inside = sum(p.numel() for p in {id(p): p for p in covered}.values())
    share = inside / total if total else 0.0
    line = (f"{owner}: {share:.1%} of the {total:,} optimised parameters are {what}; the rest (embeddings, "
            "norms, tied heads, unrecognised layers) step as the plain base")
    if share < SMALL_COVERAGE:
        warnings.warn(f"{line}. Recognised layers: Linear, Conv1d/2d/3d and transformers' Conv1D", stacklevel=3)
    return line


ROW_BLOCK_BYTES = 256 * 1024
"""Size of one tensor's share of a row block (:func:`row_blocks`): a few such blocks of the
gradient, the weights and their references fit a core's L2 cache together."""


def row_blocks(rows: torch.Tensor) -> list[slice]:
    """Slices of ``rows [n, k]`` into blocks of about :data:`ROW_BLOCK_BYTES` each (one block
    when the whole tensor is smaller).

    Cache blocking for the per-neuron reductions of a refresh: each row reduction (a norm, an
    inner product) reads several tensors of the layer's size and writes temporaries of it (the
    last update ``w - prev``, products). Done on whole layers, every one of those passes goes to
    main memory once the layer outgrows the cache (a 1024 x 1024 layer is 4 MB a tensor); done
    block by block, each block is read from memory once and its temporaries stay in cache. A
    row's reduction is the same whichever block it is in, so the results do not change; the
    Python loop runs over blocks (a few per megabyte), not over neurons.
    """
    n = rows.shape[0]
    per_row = max(1, rows[0].numel() * rows.element_size()) if n else 1
    block = max(1, ROW_BLOCK_BYTES // per_row)
    return [slice(start, min(start + block, n)) for start in range(0, n, block)] or [slice(0, 0)]


def joined(blocks: list[torch.Tensor], dim: int = -1) -> torch.Tensor:
    """The per-block results of :func:`row_blocks` as one tensor along ``dim`` (the block itself
    when there is one: no copy for a layer that fits one block)."""
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=dim)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def row_dot(a: tuple[torch.Tensor, torch.Tensor | None], b: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """Per-neuron inner product of two (weight, bias) pairs: ``[n_neurons]``."""
    out = torch.linalg.vecdot(_rows(a[0]), _rows(b[0]))
    if a[1] is not None and b[1] is not None:
        out = out + a[1] * b[1]
    return out


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
    and max, as ``[S, n]`` ``int32`` in ``[0, bins)`` (a constant column falls in bin 0).

    ``int32``, not ``int64``: half the memory traffic in the conversion, the offsets and the
    ``bincount`` that follow (the bins are the same; a NaN sample lands in bin 0 either way)."""
    low = samples.amin(0)
    span = (samples.amax(0) - low).clamp_min_(1e-12)
    return samples.sub(low).div_(span).mul_(bins).to(torch.int32).clamp_(0, bins - 1)


def offset_counts(index: torch.Tensor, cells: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-column histograms ``[n, cells]`` of integer cells ``index [S, n]`` (values in
    ``[0, cells)``): column ``j``'s cells are shifted by ``j * cells`` so one ``bincount``
    counts every column at once (integer counts: exact, and an order of magnitude faster on
    CPU than a floating-point ``scatter_add``). The offsets keep ``index``'s integer type
    while ``n * cells`` fits it."""
    n = index.shape[1]
    offset_dtype = index.dtype if n * cells <= torch.iinfo(index.dtype).max else torch.int64
    flat = index.to(offset_dtype) + _column_offsets(n, cells, offset_dtype, index.device)
    return torch.bincount(flat.reshape(-1), minlength=n * cells).view(n, cells).to(dtype)


@functools.lru_cache(maxsize=64)
def _column_offsets(n: int, cells: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[0, cells, 2 cells, ...]`` (``n`` entries), made once per shape (only ever read)."""
    return torch.arange(0, n * cells, cells, device=device, dtype=dtype)


def entropy_of_counts(counts: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Plug-in entropy (nats) of each row of histogram ``counts [..., cells]``; ``total``: the
    count every row sums to, when the caller knows it (saves summing the rows)."""
    p = counts / (counts.sum(-1, keepdim=True).clamp_min(1) if total is None else max(total, 1))
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def binned_entropy(samples: torch.Tensor, bins: int) -> torch.Tensor:
    """Entropy (nats) of each column of ``samples [S, n]`` binned into ``bins`` equal bins
    between the column's min and max; all neurons at once with one ``bincount``."""
    dtype = torch.promote_types(samples.dtype, torch.float32)
    return entropy_of_counts(offset_counts(bin_indices(samples, bins), bins, dtype), total=samples.shape[0])


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
    handle: RemovableHandle | None = field(default=None, repr=False)
    transposed: bool = False  # transformers' Conv1D: the weight is [in, out], neurons are its columns

    @property
    def n(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    @property
    def fan_in(self) -> int:
        inputs = self.weight.shape[0] if self.transposed else math.prod(self.weight.shape[1:])
        return inputs + (1 if self.bias is not None else 0)

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A weight-shaped ``tensor`` neuron-major (one neuron per row): itself, or the
        transposed view for a ``Conv1D``."""
        return tensor.t() if self.transposed else tensor

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """Per-neuron ``values [n]`` as a view that broadcasts along each neuron of the weight."""
        if self.transposed:
            return values.view(1, -1)
        return values.view(-1, *([1] * (self.weight.dim() - 1)))

    def own_pair(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)``, neuron-major."""
        return self.rows(self.weight), self.bias

    def grad_pair(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` gradients, neuron-major (zeros where a parameter has none)."""
        def grad(p: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(p) if p.grad is None else p.grad

        return self.rows(grad(self.weight)), None if self.bias is None else grad(self.bias)

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def pair(self, tensors: dict[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight-shaped, bias-shaped)`` entries of ``tensors`` for this layer, neuron-major."""
        return self.rows(tensors[self.weight]), None if self.bias is None else tensors[self.bias]


def find_neuron_layers(model: nn.Module, params: set[nn.Parameter], *, bins: int = 16,
                       hooks: bool = True, transposed: bool = False) -> list[NeuronLayer]:
    """Every ``Linear``/``Conv`` layer of ``model`` whose weight is optimised, in module order
    (:func:`neuron_modules`: a weight tied to an embedding is no layer; one shared by two
    layers counts once, at its first module). With ``transposed``, transformers' ``Conv1D``
    layers too (for callers whose per-neuron code goes through :meth:`NeuronLayer.rows`).
    """
    layers: list[NeuronLayer] = []
    offset = 0
    for name, module, flipped in neuron_modules(model):
        # torch types a module's attributes Tensor | Module; these modules' are parameters
        weight = cast(nn.Parameter, module.weight)
        if weight not in params or (flipped and not transposed):
            continue
        bias = cast("nn.Parameter | None", module.bias)
        bias = bias if bias is not None and bias in params else None
        neuron_dim = -1 if isinstance(module, nn.Linear) or flipped else 1
        layer = NeuronLayer(name, module, weight, bias, offset, ActivationStats(
            weight.shape[1] if flipped else weight.shape[0], neuron_dim, bins=bins), transposed=flipped)
        if hooks:
            layer.handle = module.register_forward_hook(layer.stats)
        layers.append(layer)
        offset += layer.n
    return layers
