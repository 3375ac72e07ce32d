"""Coupling strategies: agreement with dense routing, sampled and top-k semantics, persistence,
errors, and RIBBED training with every strategy."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from ribbed import RIBBED
from ribbed.core.clustering import OnlineKMeans
from ribbed.core.controllers import ControllerBank
from ribbed.core.features import FEATURE_NAMES
from ribbed.core.routers import ROUTERS, build_router, nearest_centroid
from tests.ribbed_helpers import assert_resume_matches_uninterrupted, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

STRATEGIES = ROUTERS.names()
OPTIONS = {"sampled": {"fraction": 0.3}, "topk-attention": {"k": 2}}


def _clusters(k: int, per: int, noise: float, seed: int = 0, features: int = len(FEATURE_NAMES)):
    generator = torch.Generator().manual_seed(seed)
    centroids = 10 * torch.randn(k, features, generator=generator)
    owner = torch.arange(k).repeat_interleave(per)
    return centroids[owner] + noise * torch.randn(k * per, features, generator=generator), centroids, owner


def _route(name, points, centroids, previous=None, seed=0, **options):
    router = build_router(name, options)
    generator = torch.Generator().manual_seed(seed)
    router.prepare(centroids, generator)
    return router, router.route(points, previous, generator)


def test_the_registry_lists_every_strategy():
    assert STRATEGIES == ["dense", "lsh", "sampled", "topk-attention", "tree"]


@pytest.mark.parametrize("k", [1, 2, 5, 16, 64, 200])
def test_tree_routes_exactly_like_dense_within_its_split_margins(k):
    """Each centroid lands in its own leaf, and so does every point closer to its centroid than
    the smallest split margin on the centroid's path (normals are unit vectors)."""
    points, centroids, owner = _clusters(k, 20, noise=1.0, seed=k)
    router, routed = _route("tree", centroids, centroids)
    assert torch.equal(routed.assignment, torch.arange(k))
    node, margin = torch.zeros(k, dtype=torch.long), torch.full((k,), float("inf"))
    for _ in range(router.depth):
        score = (centroids * router.normals[node]).sum(1) - router.thresholds[node]
        splits = router.normals[node].abs().sum(1) > 0
        margin = torch.where(splits, torch.minimum(margin, score.abs()), margin)
        node = 2 * node + 1 + (score > 0)
    offset = points - centroids[owner]
    scaled = centroids[owner] + offset / offset.norm(dim=1, keepdim=True) * 0.99 * margin[owner].unsqueeze(1).clamp(
        max=1.0)
    assert torch.equal(router.route(scaled, None, None).assignment, nearest_centroid(scaled, centroids)[0])
    assert torch.equal(router.route(scaled, None, None).assignment, owner)


@pytest.mark.parametrize("name, required", [("lsh", 1.0), ("tree", 0.99)])
@pytest.mark.parametrize("k", [4, 16, 64, 256, 1024])
def test_tree_and_lsh_agree_with_dense_on_well_separated_clusters(name, required, k):
    """Random centroids (scale 10), neurons within about 0.03 of theirs. LSH must give every
    neuron the dense (nearest) controller. The tree is exact only inside its split margins
    (test above); the median gaps of random centroids shrink as K grows, so a cluster may
    straddle a split: at least 99% of neurons must agree (measured: 100% up to K = 64)."""
    points, centroids, owner = _clusters(k, 30, noise=0.01, seed=k + 1)
    dense = nearest_centroid(points, centroids)[0]
    assert torch.equal(dense, owner)
    router, routed = _route(name, points, centroids, seed=k)
    assert float((routed.assignment == dense).float().mean()) >= required
    if k <= 64:
        assert torch.equal(routed.assignment, dense)
    chosen = routed.assignment
    torch.testing.assert_close(routed.distance, (points - centroids[chosen]).norm(dim=1))


def test_lsh_falls_back_to_dense_when_no_bucket_matches():
    """One bit per table: a far-away neuron beyond every centroid still gets its nearest one."""
    points, centroids, _ = _clusters(8, 5, noise=0.01)
    router = build_router("lsh", {"tables": 1, "bits": 3, "capacity": 1})
    router.prepare(centroids, torch.Generator().manual_seed(0))
    probes = torch.randn(500, len(FEATURE_NAMES), generator=torch.Generator().manual_seed(1)) * 30
    routed = router.route(probes, None, None)
    empty = (router.bucket_ids[router._buckets(probes)] < 0).all(2).all(1)
    assert router.fallbacks == int(empty.sum()) > 0
    assert torch.equal(routed.assignment[empty], nearest_centroid(probes[empty], centroids)[0])


@pytest.mark.parametrize("scheme", ["importance", "reservoir"])
def test_sampled_recouples_only_the_sample(scheme):
    points, centroids, owner = _clusters(8, 50, noise=0.5)
    previous = (owner + 1) % 8  # every neuron is on a wrong controller
    router, routed = _route("sampled", points, centroids, previous, fraction=0.2, scheme=scheme)
    coupled = routed.coupled
    assert int(coupled.sum()) == 80
    assert torch.equal(routed.assignment[~coupled], previous[~coupled])
    assert torch.equal(routed.assignment[coupled], nearest_centroid(points[coupled], centroids)[0])


def test_importance_sampling_prefers_surprising_neurons():
    points, centroids, _ = _clusters(4, 500, noise=0.5)
    surprise = FEATURE_NAMES.index("surprise")
    points[:, surprise] = 0.0
    points[:1000, surprise] = 3.0  # e^3 = 20 times the weight: about 95% of draws
    previous = torch.zeros(2000, dtype=torch.long)
    picked = sum(_route("sampled", points, centroids, previous, seed=seed, fraction=0.1)[1].coupled[:1000].sum()
                 for seed in range(5))
    assert picked > 0.85 * 5 * 200


def test_online_kmeans_never_moves_an_uncoupled_neuron():
    """Re-seeding empty clusters only takes neurons the sampled router re-coupled."""
    points, _, _ = _clusters(6, 40, noise=0.5)
    routing = OnlineKMeans(6, router=build_router("sampled", {"fraction": 0.1}))
    routing.observe(points)
    generator = torch.Generator().manual_seed(0)
    routing.refresh(generator)
    for _ in range(4):
        before = routing.assignment.clone()
        routing.observe(points + 3 * torch.randn(points.shape, generator=generator))
        routing.refresh(generator)
        assert torch.equal(routing.assignment[~routing.coupled], before[~routing.coupled])


def test_topk_attention_with_k1_is_dense_through_the_bank():
    points, centroids, _ = _clusters(6, 20, noise=2.0)
    bank = ControllerBank(6, generator=torch.Generator().manual_seed(0))
    nn.init.normal_(bank.w2), nn.init.normal_(bank.b2)
    dense = nearest_centroid(points, centroids)[0]
    _, routed = _route("topk-attention", points, centroids, k=1)
    assert torch.equal(routed.assignment, dense) and torch.equal(routed.mixture[0][:, 0], dense)
    assert torch.equal(routed.mixture[1], torch.ones(120, 1))
    expected, mixed = bank(points, dense), bank(points, *routed.mixture)
    assert torch.equal(mixed.multiplier, expected.multiplier) and torch.equal(mixed.coupling, expected.coupling)


def test_topk_attention_mixes_controllers_by_softmax_weights():
    """k = 3: outputs are the weighted sum of the three nearest controllers' raw outputs
    (float64), and a very sharp temperature gives the dense controller's output."""
    points, centroids, _ = _clusters(5, 10, noise=3.0)
    points, centroids = points.double(), centroids.double()
    bank = ControllerBank(5, generator=torch.Generator().manual_seed(0)).double()
    nn.init.normal_(bank.w2), nn.init.normal_(bank.b2)
    _, routed = _route("topk-attention", points, centroids, k=3, temperature=50.0)
    controllers, weights = routed.mixture
    squared = torch.cdist(points, centroids).pow(2)
    expected_weights = torch.softmax(-squared.gather(1, controllers) / 50.0, 1)
    torch.testing.assert_close(weights, expected_weights)
    assert torch.equal(controllers, squared.topk(3, largest=False).indices)
    reference = sum(weights[:, [j]] * bank.raw(points, controllers[:, j]) for j in range(3))
    torch.testing.assert_close(bank.raw(points, controllers, weights), reference, rtol=1e-12, atol=1e-12)
    _, sharp = _route("topk-attention", points, centroids, k=3, temperature=1e-4)
    torch.testing.assert_close(bank(points, *sharp.mixture).multiplier, bank(points, sharp.assignment).multiplier)


@pytest.mark.parametrize("name", STRATEGIES)
def test_online_kmeans_state_dict_round_trip(name):
    """Save after two refreshes, reload into a fresh object, continue: same as uninterrupted."""
    batches = [_clusters(8, 25, noise=1.0, seed=seed)[0] for seed in range(5)]

    def run(routing, generator, feed):
        out = []
        for points in feed:
            routing.observe(points)
            out.append((routing.refresh(generator).clone(), routing.centroids.clone()))
        return out

    options = OPTIONS.get(name, {})
    whole = run(OnlineKMeans(8, router=build_router(name, options)), torch.Generator().manual_seed(0), batches)
    first = OnlineKMeans(8, router=build_router(name, options))
    generator = torch.Generator().manual_seed(0)
    run(first, generator, batches[:2])
    buffer = io.BytesIO()
    torch.save({"routing": first.state_dict(), "generator": generator.get_state()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = OnlineKMeans(8, router=build_router(name, options))
    resumed.load_state_dict(saved["routing"])
    assert resumed.controller_choice()[0].shape[0] == 200
    generator = torch.Generator()
    generator.set_state(saved["generator"])
    for (a, c), (b, d) in zip(whole[2:], run(resumed, generator, batches[2:]), strict=True):
        assert torch.equal(a, b) and torch.equal(c, d)


def test_unknown_strategy_and_bad_options_name_the_field():
    model = nn.Linear(4, 8)
    with pytest.raises(ValueError, match=r"routing: unknown routing strategy 'ring'; allowed: dense, lsh"):
        RIBBED(model, routing="ring")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\] for 'tree'"):
        RIBBED(model, routing="tree", routing_options={"depth": 3})
    with pytest.raises(ValueError,
                       match=r"routing_options.k: got 5; allowed: an integer from 1 to n_controllers \(4\)"):
        RIBBED(model, routing="topk-attention", routing_options={"k": 5})
    for name, options, field in [("lsh", {"tables": 0}, "tables"), ("sampled", {"fraction": 1.5}, "fraction"),
                                 ("sampled", {"scheme": "greedy"}, "scheme"), ("sampled", {"feature": "x"}, "feature"),
                                 ("topk-attention", {"temperature": 0}, "temperature"), ("lsh", {"bits": 30}, "bits")]:
        with pytest.raises(ValueError, match=f"routing_options.{field}: got"):
            RIBBED(model, routing=name, routing_options=options)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def _batches(n: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=generator)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    return [(x, y)] * n


SETTINGS = {"feature_every": 2, "routing_every": 4, "n_controllers": 4, "controller_lr": 3e-2}


@pytest.mark.parametrize("name", STRATEGIES)
def test_ribbed_trains_with_every_strategy(name):
    model = _mlp()
    optimizer = RIBBED(model, lr=1e-2, routing=name, routing_options=OPTIONS.get(name), **SETTINGS)
    losses = train_steps(model, optimizer, _batches(50))
    assert losses[-1] < 0.6 * losses[0], losses[::10]
    assert optimizer.controllers.clusters.assignment.shape == (optimizer.n_neurons,)
    assert len(set(optimizer.controllers.clusters.assignment.tolist())) == 4


@pytest.mark.parametrize("name", ["lsh", "sampled", "topk-attention"])
def test_ribbed_state_dict_round_trip_with_each_strategy(name):
    batches = _batches(30)
    settings = {**SETTINGS, "routing": name, "routing_options": OPTIONS.get(name)}
    assert_resume_matches_uninterrupted(_mlp, lambda model: RIBBED(model, lr=1e-2, **settings), train_steps,
                                        batches, split=13)


def test_sampled_ribbed_keeps_unsampled_multipliers_at_a_recoupling():
    model = _mlp()
    optimizer = RIBBED(model, lr=1e-2, routing="sampled", routing_options={"fraction": 0.25},
                       feature_every=1, routing_every=3)
    batches = _batches(7)
    train_steps(model, optimizer, batches[:6])
    before = optimizer.controllers.multiplier.clone()
    train_steps(model, optimizer, batches[6:])  # step 6: a re-clustering
    coupled = optimizer.controllers.clusters.coupled
    assert int(coupled.sum()) == -(-optimizer.n_neurons // 4)
    assert torch.equal(optimizer.controllers.multiplier[~coupled], before[~coupled])
    assert not torch.equal(optimizer.controllers.multiplier[coupled], before[coupled])


@pytest.mark.parametrize("name", STRATEGIES)
def test_all_components_off_is_adamw_bit_for_bit_with_any_strategy(name):
    ours, theirs = _mlp(), _mlp()
    batches = _batches(100)
    train_steps(ours, RIBBED(ours, lr=1e-2, controllers=False, routing=name, routing_options=OPTIONS.get(name)),
                batches)
    train_steps(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=True), batches)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
