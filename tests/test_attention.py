"""Attention variants of the small GPT: parity with softmax attention where they should be
exact, with explicit reference formulas where they are approximations or restrictions, and
the memory each keeps for backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ribbed.memory import track_saved_tensors
from ribbed.nn import ModelError, build_model
from ribbed.nn.attention import (
    PerformerAttention,
    causal_linear_attention,
    sliding_window_attention,
)
from ribbed.nn.gpt import ATTENTION, NaiveAttention

LM = "language-modeling"
WIDTH, HEADS = 16, 2


def qkv(batch=2, heads=HEADS, steps=13, dim=WIDTH // HEADS, dtype=torch.float32, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, steps, dim, generator=generator, dtype=dtype) * scale)
            .requires_grad_() for _ in range(3)]


def layer(name: str, steps: int = 64, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return ATTENTION[name](WIDTH, HEADS, steps, 0.0, True, **options)


def banded_softmax_attention(q, k, v, window: int) -> torch.Tensor:
    """Reference: explicit ``softmax(q k^T / sqrt(d))`` with keys ``0 <= i - j < window``."""
    steps = q.shape[-2]
    distance = torch.arange(steps)[:, None] - torch.arange(steps)[None, :]
    allowed = (distance >= 0) & (distance < window)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def forward_and_grads(fn, inputs):
    out = fn(*inputs)
    weights = torch.randn_like(out, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    return out, grads


def assert_same_attention(fn, reference, inputs, atol):
    out, grads = forward_and_grads(fn, inputs)
    expected, expected_grads = forward_and_grads(reference, inputs)
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    for grad, expected_grad, name in zip(grads, expected_grads, "qkv", strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=atol, msg=f"d/d{name}")


@pytest.mark.parametrize("steps", [1, 13, 64])
def test_sdpa_and_naive_attention_agree_in_fp32(steps):
    inputs = qkv(steps=steps)
    assert_same_attention(layer("sdpa").attend, layer("naive").attend, inputs, atol=1e-5)


@pytest.mark.parametrize("window", [13, 14, 100])
def test_local_attention_with_a_covering_window_is_full_causal_attention(window):
    inputs = qkv(steps=13)
    assert_same_attention(layer("local", window=window).attend, layer("sdpa").attend, inputs, atol=1e-5)


@pytest.mark.parametrize("window, steps", [(1, 13), (4, 12), (4, 13), (5, 13), (12, 13)])
def test_sliding_window_matches_a_banded_mask(window, steps):
    inputs = qkv(steps=steps, dtype=torch.float64)
    assert_same_attention(lambda q, k, v: sliding_window_attention(q, k, v, window),
                          lambda q, k, v: banded_softmax_attention(q, k, v, window), inputs, atol=1e-12)


def quadratic_linear_attention(phi_q, phi_k, v, eps=1e-6):
    """Reference: the explicit ``T x T`` causal form of kernelised attention."""
    scores = (phi_q @ phi_k.transpose(-2, -1)).tril()
    return (scores @ v) / (scores.sum(dim=-1, keepdim=True) + eps)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64, None])
def test_chunked_linear_attention_equals_the_quadratic_form(chunk):
    phi_q, phi_k, v = qkv(steps=13, dtype=torch.float64)
    features = [phi_q.detach().exp().requires_grad_(), phi_k.detach().exp().requires_grad_(), v]
    assert_same_attention(lambda a, b, c: causal_linear_attention(a, b, c, chunk),
                          quadratic_linear_attention, features, atol=1e-12)


def test_linear_attention_uses_elu_plus_one_features():
    inputs = qkv(steps=13)
    assert_same_attention(
        layer("linear", chunk_size=4).attend,
        lambda q, k, v: quadratic_linear_attention(F.elu(q) + 1, F.elu(k) + 1, v), inputs, atol=1e-5)


def test_performer_approaches_softmax_attention_as_features_grow():
    q, k, v = (t.detach().double() for t in qkv(steps=16, scale=0.5))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    errors = {}
    for features in (8, 4096):
        torch.manual_seed(1)
        performer = PerformerAttention(WIDTH, HEADS, 16, 0.0, True, n_features=features).double()
        errors[features] = (performer.attend(q, k, v) - exact).pow(2).mean().sqrt().item()
    assert errors[4096] < 0.02
    assert errors[4096] < errors[8] / 4


def test_performer_features_are_orthogonal_in_blocks_positive_and_finite():
    performer = layer("performer", n_features=20)
    features = performer.features
    head_dim = WIDTH // HEADS
    block = features[:head_dim] / features[:head_dim].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(head_dim), rtol=0, atol=1e-5)
    q, k, _ = (t.detach() for t in qkv())
    assert (performer.feature_map(q, is_query=True) > 0).all()
    for huge, is_query in ((q * 1e3, True), (k * 1e3, False)):  # stabilised: exp() cannot overflow
        phi = performer.feature_map(huge, is_query=is_query)
        assert torch.isfinite(phi).all() and (phi >= 0).all() and phi.max() > 0


@pytest.mark.parametrize("name, options", [
    ("naive", {}), ("sdpa", {}), ("linear", {"chunk_size": 4}),
    ("performer", {"chunk_size": 4}), ("local", {"window": 3}),
])
def test_every_attention_keeps_the_gpt_causal(name, options):
    model = build_model("gpt", input_shape=(12,), num_classes=20, task=LM, n_layer=2, n_head=HEADS,
                        n_embd=WIDTH, attention=name, attention_options=options).eval()
    tokens = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 20
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :7], before[:, :7], rtol=0, atol=1e-5)
    assert not torch.allclose(after[:, 7], before[:, 7])


def test_every_registered_attention_is_tested():
    assert set(ATTENTION) == {"naive", "sdpa", "linear", "performer", "local"}


def saved_bytes(attention: torch.nn.Module, steps: int) -> int:
    """Bytes ``attention`` keeps for backward beyond q, k and v themselves."""
    q, k, v = qkv(batch=1, steps=steps)
    with track_saved_tensors(exclude=(q, k, v)) as saved:
        attention.attend(q, k, v)
    return saved.bytes


@pytest.mark.parametrize("name", ["sdpa", "linear"])
def test_fused_and_linear_attention_keep_a_tenth_of_naive_memory(name):
    steps = 512
    naive = saved_bytes(layer("naive", steps), steps)
    assert naive >= HEADS * steps * steps * 4  # the softmax weights, fp32
    assert saved_bytes(layer(name, steps), steps) <= 0.1 * naive


@pytest.mark.parametrize("name, options, growth", [
    ("naive", {}, (3.9, 4.1)), ("sdpa", {}, (1.9, 2.1)), ("linear", {}, (1.9, 2.1)),
    ("performer", {}, (1.9, 2.1)), ("local", {"window": 32}, (1.9, 2.1)),
])
def test_memory_kept_for_backward_grows_quadratically_only_for_naive(name, options, growth):
    low, high = growth
    ratio = saved_bytes(layer(name, 512, **options), 512) / saved_bytes(layer(name, 256, **options), 256)
    assert low <= ratio <= high


def test_naive_attention_is_the_reference_class():
    assert ATTENTION["naive"] is NaiveAttention


@pytest.mark.parametrize("options, message", [
    ({"attention": "local", "attention_options": {"window": 0}}, "window=0.*positive"),
    ({"attention": "local", "attention_options": {"size": 3}}, r"attention_options \['size'\].*'local'.*window"),
    ({"attention": "sdpa", "attention_options": {"window": 3}}, r"attention_options \['window'\].*\(none\)"),
    ({"attention": "performer", "attention_options": {"n_features": -1}}, "n_features=-1"),
    ({"attention": "linear", "attention_options": {"chunk_size": 2.5}}, "chunk_size=2.5"),
    ({"attention": "linear", "attention_options": [1]}, r"attention_options=\[1\].*mapping"),
])
def test_bad_attention_options_are_named(options, message):
    with pytest.raises(ModelError, match=message):
        build_model("gpt", input_shape=(8,), num_classes=10, task=LM, n_head=HEADS, n_embd=WIDTH, **options)
