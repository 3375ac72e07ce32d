"""Recursive hierarchical grouping: flat when off, nested clusters recovered, merge/split logged,
bounded modulation that learns, persistence, and training with depth > 1."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from ribbed import RIBBED
from ribbed.core.clustering import OnlineKMeans
from ribbed.core.controllers import ControllerBank
from ribbed.core.features import FEATURE_NAMES
from ribbed.core.hierarchy import ClusterHierarchy, ModulatorBank, WeightedKMeans
from tests.ribbed_helpers import (
    assert_resume_matches_uninterrupted,
    mlp,
    random_batches,
    train_steps,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F = len(FEATURE_NAMES)
GROUPING = {"hierarchy_depth": 3, "hierarchy_branching": 2, "n_controllers": 6, "max_controllers": 8,
            "merge_distance": 1.5, "split_spread": 1.8, "feature_every": 2, "routing_every": 6}


def _blobs(centres: torch.Tensor, per: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    points = centres.repeat_interleave(per, 0) + noise * torch.randn(len(centres) * per, centres.shape[1],
                                                                     generator=generator)
    return points, torch.arange(len(centres)).repeat_interleave(per)


def _level_one(points: torch.Tensor, centroids: torch.Tensor) -> OnlineKMeans:
    """Routing over ``points`` started from given centroids (one Lloyd step), so a test sets
    up the clustering it needs instead of hoping k-means++ finds it."""
    routing = OnlineKMeans(len(centroids))
    routing.observe(points)
    routing.centroids = centroids.clone()
    routing.refresh(torch.Generator().manual_seed(0))
    return routing


def _bank(k: int) -> tuple[ControllerBank, torch.optim.Optimizer]:
    """A bank whose controllers differ in every row, with Adam moments to carry along."""
    bank = ControllerBank(k, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(bank.parameters())
    with torch.no_grad():
        for param in bank.parameters():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    sum(p.sum() for p in bank.parameters()).backward()
    optimizer.step()
    return bank, optimizer


def test_depth_one_is_flat_routing_exactly():
    batches = random_batches(40)
    runs = []
    for options in ({}, {"hierarchy_depth": 1, "hierarchy_branching": 3, "hierarchy_bound": 3.0,
                         "merge_distance": 0.0, "split_spread": None, "max_controllers": None}):
        model = mlp()
        optimizer = RIBBED(model, lr=1e-2, feature_every=2, routing_every=5, **options)
        train_steps(model, optimizer, batches)
        assert optimizer.controllers.hierarchy is None and optimizer.topology_log() == []
        assert "hierarchy" not in optimizer.state_dict()
        runs.append(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_depth_two_is_flat_until_its_higher_controllers_first_learn():
    """Factors start at exactly 1 and the hierarchy draws from its own generator, so depth 2
    takes the flat run's steps until the first controller update (step ``feature_every``)
    changes the factors; from then on it differs."""
    batches = random_batches(3)
    flat, deep = mlp(), mlp()
    flat_opt = RIBBED(flat, lr=1e-2, feature_every=2)
    deep_opt = RIBBED(deep, lr=1e-2, feature_every=2, hierarchy_depth=2, hierarchy_branching=2)
    for step, batch in enumerate(batches):
        train_steps(flat, flat_opt, [batch])
        train_steps(deep, deep_opt, [batch])
        same = all(torch.equal(a, b) for a, b in zip(flat.parameters(), deep.parameters(), strict=True))
        assert same == (step < 2), step


def _nested(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 super-groups (40 apart) x 3 groups (10 apart) of 20 points (noise 0.5), group labels."""
    supers = torch.zeros(4, F)
    supers[:, :4] = 40 * torch.eye(4)
    angles = torch.arange(3) * 2 * math.pi / 3
    offsets = torch.zeros(3, F)
    offsets[:, 4], offsets[:, 5] = 6 * torch.cos(angles), 6 * torch.sin(angles)
    return _blobs((supers[:, None] + offsets[None]).reshape(12, F), 20, 0.5, seed)


def _cluster_nested(seed: int, **rules) -> tuple[OnlineKMeans, ClusterHierarchy, torch.Tensor]:
    points, groups = _nested(seed)
    generator = torch.Generator().manual_seed(seed)
    routing = OnlineKMeans(12)
    routing.observe(points)
    hierarchy = ClusterHierarchy(F, 12, depth=2, branching=3, seed=seed, **rules)
    bank, optimizer = _bank(12)
    for step in range(4):
        routing.refresh(generator)
        hierarchy.restructure(routing, step, bank, optimizer)
    return routing, hierarchy, groups


@pytest.mark.parametrize("seed", range(5))
def test_nested_clusters_are_recovered_at_both_levels(seed):
    routing, hierarchy, groups = _cluster_nested(seed, merge_distance=3.0, split_spread=3.0)
    assert adjusted_rand_score(groups, routing.assignment) == 1.0
    assert adjusted_rand_score(groups // 3, hierarchy.ids[1]) == 1.0
    assert hierarchy.levels[0].k == 4 and routing.k == 12


def test_merge_and_split_repair_a_local_optimum_of_online_kmeans():
    """Seed 2: online k-means alone ends with one cluster over two groups and two in one group;
    with the rules, one merge and one split later, every group has its own cluster."""
    routing, hierarchy, groups = _cluster_nested(2)
    assert adjusted_rand_score(groups, routing.assignment) < 0.95
    routing, hierarchy, groups = _cluster_nested(2, merge_distance=3.0, split_spread=3.0)
    assert adjusted_rand_score(groups, routing.assignment) == 1.0
    kinds = [event["kind"] for event in hierarchy.topology_log()]
    assert kinds.count("merge") >= 1 and kinds.count("split") >= 1


def test_merge_fires_when_two_clusters_coincide_and_controllers_follow_their_clusters():
    centres = torch.zeros(3, F)
    centres[1, 0], centres[2, 1] = 20.0, 20.0
    points, truth = _blobs(centres, 30, 0.3, seed=0)
    start = torch.stack([centres[0] - 0.2, centres[1], centres[0] + 0.2, centres[2]])  # two on blob 0
    routing = _level_one(points, start)
    before = routing.assignment.clone()
    bank, optimizer = _bank(4)
    rows = bank.w1.detach().clone()
    moments = optimizer.state[bank.w1]["exp_avg"].clone()
    hierarchy = ClusterHierarchy(F, 4, depth=1, merge_distance=2.0)
    hierarchy.restructure(routing, 7, bank, optimizer)
    merges = [event for event in hierarchy.topology_log() if event["kind"] == "merge"]
    assert len(merges) == 1 and merges[0]["step"] == 7 and merges[0]["level"] == 1
    kept, absorbed = merges[0]["clusters"]
    assert {kept, absorbed} == {0, 2} and merges[0]["neurons"] == int((before == absorbed).sum())
    assert routing.k == 3 and routing.centroids.shape == (3, F)
    assert adjusted_rand_score(truth, routing.assignment) == 1.0
    unmerged = before != absorbed
    assert torch.equal(bank.w1[routing.assignment[unmerged]], rows[before[unmerged]])
    assert torch.equal(optimizer.state[bank.w1]["exp_avg"][routing.assignment[unmerged]], moments[before[unmerged]])
    assert hierarchy.telemetry(routing)["ribbed_merges"] == 1.0
    assert hierarchy.telemetry(routing)["ribbed_membership_changes"] == merges[0]["neurons"]


def test_split_fires_when_a_cluster_is_bimodal_and_only_into_a_free_controller():
    centres = torch.zeros(3, F)
    centres[1, 0], centres[2, 1] = 20.0, 20.0
    points, truth = _blobs(centres, 30, 0.3, seed=1)
    start = torch.stack([centres[0], (centres[1] + centres[2]) / 2])  # one cluster over two blobs
    full = _level_one(points, start)
    bank, optimizer = _bank(2)
    ClusterHierarchy(F, 2, depth=1, split_spread=3.0).restructure(full, 0, bank, optimizer)
    assert full.k == 2  # no free or spare controller: the count stays within its bound

    routing = _level_one(points, start)
    bank, optimizer = _bank(3)
    hierarchy = ClusterHierarchy(F, 3, depth=1, split_spread=3.0)
    hierarchy.restructure(routing, 4, bank, optimizer)
    (split,) = [event for event in hierarchy.topology_log() if event["kind"] == "split"]
    assert split["clusters"] == [1, 2] and split["neurons"] == 30 and split["level"] == 1
    assert routing.k == 3 and adjusted_rand_score(truth, routing.assignment) == 1.0
    assert torch.equal(bank.w2[2], bank.w2[1])
    assert torch.equal(optimizer.state[bank.w2]["exp_avg_sq"][2], optimizer.state[bank.w2]["exp_avg_sq"][1])
    assert hierarchy.telemetry(routing)["ribbed_splits"] == 1.0


def test_merge_and_split_in_one_refresh_reuse_the_freed_controller():
    centres = torch.zeros(4, F)
    centres[1, 0], centres[2, 1], centres[3, 2] = 20.0, 20.0, 20.0
    points, truth = _blobs(centres, 25, 0.3, seed=2)
    start = torch.stack([centres[0] - 0.2, centres[0] + 0.2, centres[1], (centres[2] + centres[3]) / 2])
    routing = _level_one(points, start)
    bank, optimizer = _bank(4)
    hierarchy = ClusterHierarchy(F, 4, depth=1, merge_distance=2.0, split_spread=3.0)
    hierarchy.restructure(routing, 0, bank, optimizer)
    kinds = [event["kind"] for event in hierarchy.topology_log()]
    assert kinds.count("merge") == 1 and kinds.count("split") == 1
    merge, split = (next(e for e in hierarchy.topology_log() if e["kind"] == kind) for kind in ("merge", "split"))
    assert split["clusters"][1] == merge["clusters"][1]  # the split took the merged-away slot
    assert routing.k == 4 and adjusted_rand_score(truth, routing.assignment) == 1.0


def test_weighted_kmeans_matches_scikit_learn():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(60, 3, generator=generator, dtype=torch.float64) + torch.randint(
        0, 3, (60, 1), generator=generator).double() * 4
    weights = torch.rand(60, generator=generator, dtype=torch.float64) * 10
    init = points[[0, 1, 2]].clone()
    ours = WeightedKMeans(3, iterations=100)
    ours.centroids = init.clone()
    ours.fit(points, weights, generator)
    reference = KMeans(3, init=init.numpy(), n_init=1, algorithm="lloyd", tol=0, max_iter=100).fit(
        points.numpy(), sample_weight=weights.numpy())
    assert adjusted_rand_score(reference.labels_, ours.assignment) == 1.0
    labels = torch.as_tensor(reference.labels_)
    ours_of = torch.stack([ours.assignment[labels == cluster][0] for cluster in range(3)])
    torch.testing.assert_close(ours.centroids[ours_of], torch.as_tensor(reference.cluster_centers_))


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.1, 100.0), bound=st.floats(1.01, 10.0), seed=st.integers(0, 1000))
def test_modulation_stays_within_its_bound(scale, bound, seed):
    generator = torch.Generator().manual_seed(seed)
    bank = ModulatorBank(3, F + 2, hidden=8, bound=bound, generator=generator)
    summaries, parents = (torch.randn(10, F + 2, generator=generator) * scale,
                          torch.randint(0, 3, (10,), generator=generator))
    assert torch.equal(bank(summaries, parents), torch.ones(10))  # starts as the identity
    with torch.no_grad():
        for param in bank.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    factors = bank(summaries, parents)
    assert (factors >= 1 / bound * (1 - 1e-6)).all() and (factors <= bound * (1 + 1e-6)).all()


def test_modulation_follows_its_training_signal():
    """Positive hypergradient (overshooting) shrinks a cluster's factor, negative grows it,
    never past the bound."""
    generator = torch.Generator().manual_seed(0)
    bank = ModulatorBank(2, F + 2, hidden=8, bound=2.0, generator=generator)
    optimizer = torch.optim.Adam(bank.parameters(), lr=0.05)
    summaries = torch.randn(6, F + 2, generator=generator)
    parents = torch.tensor([0, 0, 0, 1, 1, 1])
    signal = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    for _ in range(200):
        optimizer.zero_grad()
        (signal * bank(summaries, parents)).mean().backward()
        optimizer.step()
    factors = bank(summaries, parents).detach()
    assert (factors[:3] < 0.6).all() and (factors[:3] >= 0.5).all()
    assert (factors[3:] > 1.6).all() and (factors[3:] <= 2.0).all()


def test_state_dict_round_trip_continues_bit_for_bit():
    uninterrupted, optimizer = assert_resume_matches_uninterrupted(
        mlp, lambda model: RIBBED(model, lr=1e-2, **GROUPING), train_steps, random_batches(50), split=27)
    kinds = {event["kind"] for event in uninterrupted.topology_log()}
    assert {"merge", "split", "move"} <= kinds  # the run really evolves its topology
    assert optimizer.topology_log() == uninterrupted.topology_log()
    assert optimizer.telemetry() == uninterrupted.telemetry()


def test_depth_three_trains_a_tiny_mlp_within_the_multiplier_bound():
    x, y = random_batches(1)[0]
    model = mlp()
    optimizer = RIBBED(model, lr=1e-2, **GROUPING)
    initial = [p.detach().clone() for p in optimizer.controllers.hierarchy.parameters()]
    losses = train_steps(model, optimizer, [(x, y)] * 120)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert any(not torch.equal(a, b)
               for a, b in zip(initial, optimizer.controllers.hierarchy.parameters(), strict=True))
    factor = optimizer.controllers.hierarchy.modulation()
    assert not torch.equal(factor, torch.ones_like(factor))
    bound = 4.0 * 2.0 ** 2  # max_multiplier * hierarchy_bound ** (depth - 1)
    multiplier = optimizer.neuron_state()["multiplier"]
    assert (multiplier <= bound).all() and (multiplier >= 1 / bound).all()
    telemetry = optimizer.telemetry()
    assert {"ribbed_merges", "ribbed_splits", "ribbed_membership_changes", "ribbed_clusters"} <= telemetry.keys()
    assert 1 <= telemetry["ribbed_clusters"] <= GROUPING["max_controllers"]
    levels = {event["level"] for event in optimizer.topology_log()}
    assert levels <= {1, 2, 3} and 3 in levels


def test_bad_settings_name_the_field():
    model = mlp()
    for kwargs, field in [({"hierarchy_depth": 0}, "hierarchy_depth"),
                          ({"hierarchy_branching": 1}, "hierarchy_branching"),
                          ({"hierarchy_bound": 1.0}, "hierarchy_bound"), ({"merge_distance": -1.0}, "merge_distance"),
                          ({"split_spread": 0.0}, "split_spread"), ({"max_controllers": 2}, "max_controllers"),
                          ({"hierarchy_depth": 2, "routing": "topk-attention"}, "routing")]:
        with pytest.raises(ValueError, match=field):
            RIBBED(model, lr=1e-3, **kwargs)
