"""Sparse training plug-ins: top-k gradients with error feedback, RigL, lottery tickets; masks
held by every optimiser, FLOPs counted, exact resume, and 2:4 semi-structured sparsity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ribbed.data import load_dataset
from ribbed.extensions import load_extensions
from ribbed.optim import list_optimizers
from ribbed.runs import create_run
from ribbed.sparse import (
    WeightMasks,
    count_training_flops,
    erk_densities,
    global_magnitude_prune,
    measure_semi_structured_linear,
    prune_2_to_4,
    topk_with_feedback,
)
from ribbed.sparse.rigl import drop_and_grow
from ribbed.train import build_run, train
from tests.conftest import StopAfter

load_extensions()
OPTIMIZERS = sorted(list_optimizers())


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def plugin(name: str, **options) -> dict:
    return {"plugins": [{"name": name, "options": options}]}


# ---------------------------------------------------------------------- top-k gradients


def test_topk_keeps_exactly_the_largest_entries():
    flat = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2, 1.0])
    sparse = topk_with_feedback(flat.clone(), 3, None)
    torch.testing.assert_close(sparse, torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0, 1.0]))


def test_error_feedback_applies_every_gradient_eventually():
    """Summed over steps, applied gradients plus the carried residual equal the dense sum."""
    generator = torch.Generator().manual_seed(0)
    residual = torch.zeros(1000, dtype=torch.float64)
    applied = torch.zeros_like(residual)
    dense = torch.zeros_like(residual)
    for _ in range(20):
        grad = torch.randn(1000, generator=generator, dtype=torch.float64)
        dense += grad
        sparse = topk_with_feedback(grad.clone(), 10, residual)
        assert int((sparse != 0).sum()) == 10
        applied += sparse
    torch.testing.assert_close(applied + residual, dense, rtol=0, atol=1e-12)


def test_zero_sparsity_leaves_training_unchanged(tiny_config, digits):
    plain = train(build_run(tiny_config(train={"steps": 5}), digits), evaluate_test=False)
    topk = train(build_run(tiny_config(train={"steps": 5, **plugin("topk-grad", sparsity=0.0)}), digits),
                 evaluate_test=False)
    for (name, a), b in zip(plain.model.state_dict().items(), topk.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_sparse_gradients_with_error_feedback_still_learn(tiny_config, digits):
    config = tiny_config(train={"steps": 80, "eval_every": 40, **plugin("topk-grad", sparsity=0.95)})
    result = train(build_run(config, digits), evaluate_test=False)
    assert result.final["val_acc"] > 0.8
    assert result.history[-1]["grad_density"] == pytest.approx(0.05, abs=1e-3)


def test_topk_really_sparsifies_the_update(tiny_config, digits):
    parts = build_run(tiny_config(optimizer={"name": "sgd", "lr": 0.1},
                                  train={"steps": 1, **plugin("topk-grad", sparsity=0.99)}), digits)
    before = [p.detach().clone() for p in parts.model.parameters()]
    train(parts, evaluate_test=False)
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(parts.model.parameters(), before, strict=True))
    total = sum(b.numel() for b in before)
    assert changed == math.ceil(0.01 * total)


# ---------------------------------------------------------------------- masks and optimisers


def masked_weights_stay_zero(parts) -> None:
    plugin = parts.plugins[0]
    for param, mask in zip(plugin.masks.params, plugin.masks.masks, strict=True):
        assert (param.detach()[mask == 0] == 0).all()
        assert (mask == 0).any()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_respects_the_masks(tiny_config, digits, optimizer):
    """Each registered optimiser with its default options, through a RigL rewiring step
    (which also resets the optimiser's state of changed connections). ``keep-batch`` is
    backprop that also keeps the batch, which loss-evaluating optimisers need."""
    config = tiny_config(optimizer={"name": optimizer, "lr": 0.01}, train={
        "steps": 6, "eval_every": 6, "gradient_method": "keep-batch",
        **plugin("rigl", sparsity=0.7, update_every=2)})
    parts = build_run(config, digits)
    train(parts, evaluate_test=False)
    assert parts.plugins[0].updates == 1
    masked_weights_stay_zero(parts)


# ---------------------------------------------------------------------- RigL


def test_erk_densities_hit_the_target_and_stay_at_most_one():
    shapes = [torch.Size([10, 4]), torch.Size([256, 256]), torch.Size([10, 256]), torch.Size([3, 3, 3, 8])]
    densities = erk_densities(shapes, 0.2)
    sizes = [math.prod(s) for s in shapes]
    assert sum(d * n for d, n in zip(densities, sizes, strict=True)) == pytest.approx(0.2 * sum(sizes))
    assert all(0 < d <= 1 for d in densities)
    assert densities[0] == 1.0  # the small layer is kept dense
    assert densities[1] < densities[2]  # a wide square layer is sparser than a thin one


def test_drop_and_grow_drops_small_weights_and_grows_large_gradients():
    weight = torch.tensor([[0.0, 3.0, -0.1, 2.0], [0.0, 0.0, 1.0, 0.0]])
    mask = (weight != 0).float()
    grad = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.1, 4.0, 0.0, 0.2]])
    new = drop_and_grow(weight, grad, mask, count=2)
    expected = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(new, expected)


def test_rigl_rewires_at_constant_density_with_fresh_connections(tiny_config, digits):
    config = tiny_config(train={"steps": 60, "eval_every": 60, **plugin("rigl", sparsity=0.6, update_every=10)})
    parts = build_run(config, digits)
    rigl = parts.plugins[0]
    counts = rigl.masks.active_counts().clone()
    initial = [mask.clone() for mask in rigl.masks.masks]
    result = train(parts, evaluate_test=False)
    torch.testing.assert_close(rigl.masks.active_counts(), counts)
    assert any(not torch.equal(a, b) for a, b in zip(initial, rigl.masks.masks, strict=True))
    assert result.history[-1]["rigl_updates"] == 4.0  # steps 10 to 40; T_end = 45
    assert result.history[-1]["weight_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert result.final["val_acc"] > 0.6
    masked_weights_stay_zero(parts)


def test_rigl_update_fraction_follows_the_cosine(tiny_config, digits):
    parts = build_run(tiny_config(train={"steps": 100, **plugin("rigl", drop_fraction=0.4, stop_fraction=0.5)}),
                      digits)
    rigl = parts.plugins[0]
    assert rigl.update_fraction(0) == pytest.approx(0.4)
    assert rigl.update_fraction(25) == pytest.approx(0.2)
    assert rigl.update_fraction(50) == pytest.approx(0.0)


def test_grown_connections_start_from_zero_weight_and_state():
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    masks = WeightMasks(model)
    new = torch.ones(3, 4)
    new[0, 0] = 0.0
    masks.update([new], optimizer)
    grown = torch.ones(3, 4)
    grown[0, 0] = 0.0
    masks.update([grown.new_ones(3, 4)], optimizer)
    assert model.weight[0, 0] == 0
    assert optimizer.state[model.weight]["exp_avg"][0, 0] == 0
    assert optimizer.state[model.weight]["exp_avg"][1, 1] != 0


# ---------------------------------------------------------------------- lottery tickets


def test_global_magnitude_pruning_removes_the_smallest_weights_over_all_layers():
    weights = [torch.tensor([[0.1, -5.0], [0.3, 0.0]]), torch.tensor([[-0.2, 4.0, 0.05]])]
    masks = [torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.ones(1, 3)]
    pruned = global_magnitude_prune(weights, masks, 0.5)
    torch.testing.assert_close(pruned[0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(pruned[1], torch.tensor([[0.0, 1.0, 0.0]]))


def test_lottery_ticket_prunes_each_round_and_rewinds_the_survivors(tiny_config, digits):
    config = tiny_config(schedule={"kind": "constant", "warmup_steps": 2},
                         train={"steps": 30, "eval_every": 10,
                                **plugin("lottery-ticket", rounds=3, prune_fraction=0.5, rewind_step=2)})
    parts = build_run(config, digits)
    ticket = parts.plugins[0]
    rewound = []
    ticket_rewind = ticket._prune_and_rewind

    def record_rewind():
        ticket_rewind()
        rewound.append([p.detach().clone() for p in parts.model.parameters()])

    ticket._prune_and_rewind = record_rewind
    result = train(parts, evaluate_test=False)
    assert len(rewound) == 2
    assert [row["ticket_round"] for row in result.history] == [1.0, 2.0, 2.0]
    assert result.history[-1]["weight_sparsity"] == pytest.approx(0.75, abs=0.01)
    assert result.history[-1]["flops_fraction"] < 0.4
    masks = dict(zip(ticket.masks.params, ticket.masks.masks, strict=True))
    for param, snapshot, state in zip(parts.model.parameters(), ticket.snapshot["params"], rewound[-1],
                                      strict=True):
        expected = snapshot * masks[param] if param in masks else snapshot
        torch.testing.assert_close(state, expected, rtol=0, atol=0)
    assert result.final["val_acc"] > 0.6
    masked_weights_stay_zero(parts)


# ---------------------------------------------------------------------- FLOPs


def test_training_flops_of_an_mlp_match_the_matmul_count():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    flops = count_training_flops(model, torch.randn(8, 10), ["0", "2"])
    first = 2 * 2 * 8 * 10 * 20  # forward and weight gradient: the input needs no gradient
    second = 3 * 2 * 8 * 20 * 5
    assert flops.total == first + second
    assert flops.per_layer.tolist() == [first, second]
    assert flops.sparse_total(torch.tensor([0.5, 1.0], dtype=torch.float64)) == first / 2 + second
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- resume


@pytest.mark.parametrize("sparse", [
    plugin("topk-grad", sparsity=0.9),
    plugin("rigl", sparsity=0.8, update_every=5),
    plugin("lottery-ticket", rounds=3, rewind_step=3),
], ids=["topk-grad", "rigl", "lottery-ticket"])
def test_sparse_runs_resume_exactly(tiny_config, digits, tmp_path, sparse):
    config = tiny_config(schedule={"kind": "constant"},
                         train={"steps": 24, "eval_every": 8, "checkpoint_every": 4, **sparse})
    straight = train(build_run(config, digits), evaluate_test=False)
    record = create_run(tmp_path, name="sparse", config=config.model_dump(mode="json"))
    with pytest.raises(KeyboardInterrupt):
        train(build_run(config, digits), record=record, callbacks=[StopAfter(10)])
    resumed = train(build_run(config, digits), record=record, resume=True, evaluate_test=False)
    assert resumed.final == straight.final
    assert [row["val_loss"] for row in resumed.history] == [row["val_loss"] for row in straight.history]


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("sparse, message", [
    (plugin("topk-grad", sparsity=1.0), r"sparsity=1.0; allowed: a number in \[0, 1\)"),
    (plugin("rigl", sparsity=0), r"sparsity=0; allowed: a number in \(0, 1\)"),
    (plugin("rigl", distribution="random"), "distribution='random'; allowed: uniform, erk"),
    (plugin("rigl", exclude=["*"]), "no prunable weights"),
    (plugin("lottery-ticket", rewind_step=50), "rewind_step=50.*below the 10 steps of a round"),
    (plugin("lottery-ticket", rounds=0), "rounds=0"),
    (plugin("topk-grad", density=0.1), r"unknown option\(s\) \['density'\].*sparsity"),
])
def test_bad_sparse_options_are_named(tiny_config, digits, sparse, message):
    with pytest.raises(ValueError, match=message):
        build_run(tiny_config(schedule={"kind": "constant"}, train={"steps": 40, **sparse}), digits)


def test_lottery_ticket_rejects_a_decaying_schedule(tiny_config, digits):
    with pytest.raises(ValueError, match="schedule.kind='cosine'.*allowed: 'constant'"):
        build_run(tiny_config(train=plugin("lottery-ticket")), digits)


# ---------------------------------------------------------------------- 2:4 sparsity


def test_two_to_four_mask_keeps_the_two_largest_of_every_four():
    weight = torch.tensor([[0.1, -4.0, 3.0, 0.2, 1.0, 2.0, -3.0, 4.0]])
    torch.testing.assert_close(prune_2_to_4(weight).float(), torch.tensor([[0, 1, 1, 0, 0, 0, 1, 1]]).float())
    mask = prune_2_to_4(torch.randn(16, 32))
    assert (mask.view(-1, 4).sum(dim=1) == 2).all()
    with pytest.raises(ValueError, match=r"weight.shape=\(3, 6\).*divisible by 4"):
        prune_2_to_4(torch.randn(3, 6))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_semi_structured_measurement_needs_cuda():
    assert measure_semi_structured_linear() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 sparse kernels need an NVIDIA GPU")
def test_semi_structured_product_matches_the_dense_one():
    result = measure_semi_structured_linear(1024, 1024, 1024, min_run_time=0.1)
    assert result["max_abs_error"] < 0.5 and result["speedup"] > 0
