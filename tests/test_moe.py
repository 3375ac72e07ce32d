"""Mixture-of-Experts feed-forward layer: parity with the dense layer, routing and capacity
against a per-token reference, the Switch and z auxiliary losses, and per-expert load in the
run's metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ribbed.nn import ModelError, build_model, pop_aux_loss, set_checkpointing
from ribbed.nn.gpt import MLPFeedForward
from ribbed.nn.moe import MoEFeedForward, expert_capacity
from ribbed.train import build_run, train

WIDTH = 8


def moe(dtype=torch.float32, seed=0, **options) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(WIDTH, 0.0, True, **options).to(dtype)
    with torch.no_grad():  # give biases and the router some size, so mistakes show
        for param in layer.parameters():
            param.normal_(0.0, 0.5)
    return layer


def tokens(batch=3, steps=5, dtype=torch.float32, seed=1) -> torch.Tensor:
    return torch.randn(batch, steps, WIDTH, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def test_one_expert_with_room_for_every_token_is_the_dense_layer():
    dense = MLPFeedForward(WIDTH, 0.0, True).double()
    layer = moe(torch.float64, n_experts=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.c_fc.weight[0].copy_(dense.c_fc.weight.T)
        layer.c_fc.bias[0, 0].copy_(dense.c_fc.bias)
        layer.c_proj.weight[0].copy_(dense.c_proj.weight.T)
        layer.c_proj.bias[0, 0].copy_(dense.c_proj.bias)
    x = tokens(dtype=torch.float64).requires_grad_()
    out, expected = layer(x), dense(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert layer.dropped_fraction.item() == 0.0
    weights = torch.randn_like(out)
    grad_moe = torch.autograd.grad((out * weights).sum(), [x, layer.c_fc.weight, layer.c_proj.bias])
    grad_dense = torch.autograd.grad((expected * weights).sum(), [x, dense.c_fc.weight, dense.c_proj.bias])
    torch.testing.assert_close(grad_moe[0], grad_dense[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_moe[1][0], grad_dense[1].T, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_moe[2][0, 0], grad_dense[2], rtol=0, atol=1e-12)


def per_token_reference(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The routing rules spelled out one choice at a time: first choices before second
    choices, tokens in order, an expert refusing choices once it holds ``capacity``."""
    flat = x.reshape(-1, WIDTH)
    probs = F.linear(flat, layer.router.weight).softmax(dim=-1)
    gates, experts = probs.topk(layer.top_k, dim=-1)
    if layer.top_k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    capacity = expert_capacity(len(flat), layer.n_experts, layer.top_k, layer.capacity_factor)
    taken = [0] * layer.n_experts
    out = torch.zeros_like(flat)
    for choice in range(layer.top_k):
        for token in range(len(flat)):
            expert = int(experts[token, choice])
            if taken[expert] == capacity:
                continue
            taken[expert] += 1
            hidden = F.gelu(flat[token] @ layer.c_fc.weight[expert] + layer.c_fc.bias[expert, 0])
            expert_out = hidden @ layer.c_proj.weight[expert] + layer.c_proj.bias[expert, 0]
            out[token] += gates[token, choice] * expert_out
    return out.view_as(x)


@pytest.mark.parametrize("options", [
    {"n_experts": 4, "top_k": 1, "capacity_factor": 1.0},
    {"n_experts": 4, "top_k": 2, "capacity_factor": 0.5},
    {"n_experts": 3, "top_k": 2, "capacity_factor": 2.0},
    {"n_experts": 5, "top_k": 1, "capacity_factor": 0.3},
])
def test_routing_and_capacity_match_the_per_token_reference(options):
    layer = moe(torch.float64, **options)
    x = tokens(batch=4, steps=6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), per_token_reference(layer, x), rtol=0, atol=1e-12)


def test_tokens_beyond_capacity_are_dropped_and_counted():
    layer = moe(n_experts=2, top_k=1, capacity_factor=0.25)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(1.0)
    x = tokens(batch=1, steps=16).abs()  # every token prefers expert 0
    out = layer(x).reshape(16, WIDTH)
    capacity = expert_capacity(16, 2, 1, 0.25)
    assert capacity == 2
    assert (out[:capacity] != 0).all() and (out[capacity:] == 0).all()
    assert layer.dropped_fraction.item() == pytest.approx(14 / 16)
    torch.testing.assert_close(layer.expert_load, torch.tensor([1.0, 0.0]))


def test_auxiliary_losses_are_the_switch_and_z_losses():
    layer = moe(n_experts=4, top_k=2, balance_coef=0.1, z_loss_coef=0.01)
    x = tokens()
    layer(x)
    logits = F.linear(x.reshape(-1, WIDTH), layer.router.weight)
    chosen = logits.softmax(-1).topk(2, dim=-1).indices
    fraction = torch.bincount(chosen.flatten(), minlength=4).float() / chosen.numel()
    balance = 4 * (fraction * logits.softmax(-1).mean(0)).sum()
    z_loss = logits.logsumexp(-1).square().mean()
    torch.testing.assert_close(layer.balance_loss, balance)
    torch.testing.assert_close(layer.z_loss, z_loss)
    torch.testing.assert_close(layer.expert_load, fraction)
    torch.testing.assert_close(pop_aux_loss(layer), 0.1 * balance + 0.01 * z_loss)


def test_balance_loss_evens_out_a_skewed_router():
    layer = moe(n_experts=4, top_k=1, balance_coef=1.0, z_loss_coef=0.0)
    with torch.no_grad():
        layer.router.weight[0] = 0.5  # every token leans to expert 0 ...
    x = tokens(batch=8, steps=16) + 1.0  # ... since every token has a positive mean
    optimizer = torch.optim.SGD(layer.router.parameters(), lr=1.0)
    layer(x)
    pop_aux_loss(layer)
    skewed = layer.expert_load.max().item()
    for _ in range(60):
        optimizer.zero_grad()
        layer(x)
        pop_aux_loss(layer).backward()
        optimizer.step()
    assert skewed > 0.5
    assert layer.expert_load.max().item() < 0.35


def test_router_runs_in_float32_under_autocast():
    layer = moe(n_experts=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, gates = layer.route(tokens().reshape(-1, WIDTH))
        out = layer(tokens())
    assert logits.dtype == gates.dtype == torch.float32
    assert out.dtype == torch.float32


def gpt(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("gpt", input_shape=(12,), num_classes=20, task="language-modeling",
                       n_layer=2, n_head=2, n_embd=16, feed_forward="moe", **options)


def test_checkpointed_moe_gives_the_same_gradients_aux_loss_included():
    ids = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    for policy in ("none", "every", "selective"):
        model = set_checkpointing(gpt(feed_forward_options={"n_experts": 4, "top_k": 2}), policy)
        logits = model(ids)
        aux = pop_aux_loss(model)
        (F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux).backward()
        grads[policy] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for policy in ("every", "selective"):
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[policy][name], grad, rtol=0, atol=1e-6, msg=name)


def test_moe_gpt_trains_and_logs_per_expert_load(tiny_config):
    config = tiny_config(
        data={"name": "text-char", "batch_size": 8, "options": {"block_size": 16}},
        model={"name": "gpt", "options": {"n_layer": 1, "n_head": 2, "n_embd": 16, "feed_forward": "moe",
                                          "feed_forward_options": {"n_experts": 3, "top_k": 2}}},
        optimizer={"name": "adamw", "lr": 3e-3},
        train={"steps": 30, "eval_every": 15, "plugins": [{"name": "moe-load"}]},
    )
    parts = build_run(config)
    result = train(parts, evaluate_test=False)
    assert result.final["val_loss"] < math.log(parts.dataset.num_classes) - 0.5
    for row in result.history:
        loads = [row[f"moe_load_e{i}"] for i in range(3)]
        assert sum(loads) == pytest.approx(1.0)
        assert 1.0 <= row["moe_max_load"] <= 3.0
        assert 0.0 <= row["moe_dropped"] < 1.0
        assert row["moe_balance_loss"] > 0 and row["moe_z_loss"] > 0


@pytest.mark.parametrize("options, message", [
    ({"top_k": 5}, "top_k=5.*1 to n_experts=4"),
    ({"n_experts": 0}, "n_experts=0"),
    ({"capacity_factor": 0}, "capacity_factor=0.*> 0"),
    ({"balance_coef": -1}, "balance_coef=-1"),
    ({"experts": 2}, r"feed_forward_options \['experts'\].*n_experts"),
])
def test_bad_moe_options_are_named(options, message):
    with pytest.raises(ModelError, match=message):
        gpt(feed_forward_options=options)


def test_moe_load_needs_an_moe_model(tiny_config):
    with pytest.raises(ValueError, match="moe-load.*no MoE layer.*feed_forward: moe"):
        build_run(tiny_config(train={"plugins": [{"name": "moe-load"}]}))
