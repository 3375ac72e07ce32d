"""The fast paths of a feature refresh compute what the plain definitions compute.

The controller bank (dense evaluation of every controller for a small bank, per-neuron
gather for a large one) against a loop over neurons in float64, values and gradients; the
activation hook's one-copy, two-pass statistics against the textbook mean, variance and
min/max binning of the sample-major outputs; the feature matrix against its layer-by-layer
stack, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ribbed import RIBBED
from ribbed.core import layers as layers_module
from ribbed.core.controllers import DENSE_MAX_CONTROLLERS, gathered_mlp
from ribbed.core.features import FEATURE_NAMES, neuron_features
from ribbed.core.layers import ActivationStats, bin_indices, binned_entropy, row_blocks, row_dot
from ribbed.core.signals import StepSizeSignal


def _bank(k: int, f: int = 9, h: int = 16, o: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(k)
    shapes = [(k, f, h), (k, h), (k, h, o), (k, o)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes]


def _loop_mlp(inputs, assignment, w1, b1, w2, b2) -> torch.Tensor:
    rows = [torch.tanh(x @ w1[a] + b1[a]) @ w2[a] + b2[a] for x, a in zip(inputs, assignment.tolist(), strict=True)]
    return torch.stack(rows)


@pytest.mark.parametrize("k", [1, 4, DENSE_MAX_CONTROLLERS, DENSE_MAX_CONTROLLERS + 1, 64])
def test_bank_matches_a_loop_over_neurons_with_gradients(k):
    generator = torch.Generator().manual_seed(100 + k)
    inputs = torch.randn(37, 9, generator=generator, dtype=torch.float64)
    assignment = torch.randint(0, k, (37,), generator=generator)
    bank = _bank(k)
    weights = torch.randn(37, 5, generator=generator, dtype=torch.float64)
    fast = gathered_mlp(inputs, assignment, *bank)
    fast_grads = torch.autograd.grad((fast * weights).sum(), bank)
    slow = _loop_mlp(inputs, assignment, *bank)
    slow_grads = torch.autograd.grad((slow * weights).sum(), bank)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for got, expected in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    unused = torch.ones(k, dtype=torch.bool)
    unused[assignment] = False
    assert not fast_grads[0][unused].any()  # a controller no neuron uses gets no gradient


def _reference_stats(samples: torch.Tensor, bins: int) -> tuple[torch.Tensor, ...]:
    """The statistics as first written: column mean and variance of ``[S, n]`` and bins from
    ``min``/``max``."""
    low = samples.min(0).values
    span = (samples.max(0).values - low).clamp_min(1e-12)
    index = ((samples - low) / span * bins).long().clamp_(0, bins - 1)
    return samples.mean(0), samples.var(0, unbiased=False), index


@pytest.mark.parametrize("module, shape", [(nn.Linear(6, 11), (32, 6)), (nn.Conv1d(3, 7, 3), (16, 3, 20)),
                                           (nn.Linear(6, 5), (4, 9, 6))])
def test_hook_statistics_match_the_plain_definitions(module, shape):
    stats = ActivationStats(module.out_channels if isinstance(module, nn.Conv1d) else module.out_features,
                            1 if isinstance(module, nn.Conv1d) else -1, bins=8, momentum=0.5)
    stats.recording = True
    module.register_forward_hook(stats)
    generator = torch.Generator().manual_seed(1)
    outputs = []
    for _ in range(2):
        outputs.append(module(torch.randn(shape, generator=generator) * 3 + 1).detach())
    expected = [_reference_stats(stats.samples(out), 8) for out in outputs]
    mean = expected[0][0].lerp(expected[1][0], 0.5)
    var = expected[0][1].lerp(expected[1][1], 0.5)
    entropy = binned_entropy(stats.samples(outputs[0]), 8).lerp(binned_entropy(stats.samples(outputs[1]), 8), 0.5)
    torch.testing.assert_close(stats.mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.var, var, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.entropy, entropy)  # same bins, same counts: exact
    neuron_major = stats.neuron_major(outputs[1]).t()
    assert neuron_major.is_contiguous() is False and neuron_major.t().is_contiguous()
    assert torch.equal(bin_indices(neuron_major, 8), expected[1][2])


def test_bin_indices_are_those_of_min_and_max_bit_for_bit():
    samples = torch.randn(500, 40, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 3, 40)
    samples[:, 0] = 2.0  # a constant column falls in bin 0
    assert torch.equal(bin_indices(samples, 16), _reference_stats(samples, 16)[2])
    assert torch.equal(bin_indices(samples.t().contiguous().t(), 16), _reference_stats(samples, 16)[2])


def _row_sq(pair) -> torch.Tensor:
    weight, bias = pair
    sq = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1).square()
    return sq if bias is None else sq + bias.square()


@torch.no_grad()
def _layer_by_layer_features(layers, prev, momentum, surprise) -> torch.Tensor:
    """The feature matrix as first written: all nine columns stacked layer by layer."""
    rows = []
    for index, layer in enumerate(layers):
        grad, weight, before = (layer.pair({p: p.grad for p in layer.params}), (layer.weight, layer.bias),
                                layer.pair(prev))
        update = tuple(None if w is None else w - b for w, b in zip(weight, before, strict=True))
        g_sq, d_sq, w_sq = _row_sq(grad), _row_sq(update), _row_sq(weight)
        hyper = row_dot(grad, update) / (g_sq * d_sq).sqrt().clamp_min(1e-12)
        mom = layer.pair(momentum)
        agreement = row_dot(grad, mom) / (g_sq * _row_sq(mom)).sqrt().clamp_min(1e-12)
        stats = layer.stats
        rows.append(torch.stack([
            0.5 * torch.log(g_sq + 1e-12), 0.5 * torch.log((d_sq + 1e-12) / (w_sq + 1e-12)), agreement, hyper,
            stats.mean, torch.log(stats.var + 1e-8), stats.entropy / math.log(stats.bins),
            surprise[layer.offset:layer.offset + layer.n], torch.full_like(g_sq, index / max(1, len(layers) - 1)),
        ], dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("block_bytes", [None, 64], ids=["whole layers", "blocks of a few rows"])
def test_features_equal_the_layer_by_layer_stack(block_bytes, monkeypatch):
    if block_bytes is not None:  # cache blocking must not change a bit
        monkeypatch.setattr(layers_module, "ROW_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 8, 7), nn.ReLU(), nn.Linear(7, 3))
    optimizer = RIBBED(model, lr=1e-2, feature_every=1)
    for _ in range(3):
        model(torch.randn(16, 2, 10)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model(torch.randn(16, 2, 10)).pow(2).mean().backward()
    prev = dict(zip(optimizer.neuron_params, optimizer.controllers.prev, strict=True))
    momentum, surprise = optimizer.controllers._momentum(), torch.rand(optimizer.n_neurons)
    features, hyper = neuron_features(optimizer.layers, prev, momentum, surprise)
    reference = _layer_by_layer_features(optimizer.layers, prev, momentum, surprise)
    assert torch.equal(features, reference)
    assert torch.equal(hyper, reference[:, FEATURE_NAMES.index("hypergradient")])
    assert features[:, FEATURE_NAMES.index("act_entropy")].gt(0).any()  # the hooks recorded something


@pytest.mark.parametrize("kind", ["trace", "one-step"])
def test_the_signal_and_its_trace_advance_equal_the_whole_layer_computation_in_blocks(kind, monkeypatch):
    """``StepSizeSignal.update`` reads each block of the weights once for the inner products and
    the trace's average: bit for bit the whole-layer inner products, then one lerp of the average."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4))
    layers = RIBBED(model, lr=1e-2).layers
    blocked, whole = (StepSizeSignal(layers, kind=kind, discount=0.7) for _ in range(2))
    prev = {p: p.detach() - 0.01 * torch.randn_like(p) for layer in layers for p in layer.params}
    for _ in range(3):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
        reference = dict(zip(blocked.params, blocked.average, strict=True)) if kind == "trace" else prev
        expected_raw = torch.cat([row_dot(layer.grad_pair(), tuple(
            None if w is None else w - r for w, r in zip(layer.own_pair(), layer.pair(reference), strict=True)))
            for layer in layers]).float()
        expected_average = [torch.lerp(a, p.detach(), 1 - 0.7)  # (one-step keeps no average)
                            for a, p in zip(blocked.average, blocked.params[:len(blocked.average)], strict=True)]
        monkeypatch.setattr(layers_module, "ROW_BLOCK_BYTES", 24)  # blocks of one row
        assert len(row_blocks(layers[0].weight)) == 9
        assert torch.equal(blocked.raw(prev), expected_raw)
        signal = blocked.update(prev)
        if kind == "trace":
            for got, expected in zip(blocked.average, expected_average, strict=True):
                assert torch.equal(got, expected)
        monkeypatch.setattr(layers_module, "ROW_BLOCK_BYTES", 1 << 30)
        assert torch.equal(signal, whole.update(prev))
        assert expected_raw.abs().sum() > 0  # the signal measured something
        model.zero_grad()
