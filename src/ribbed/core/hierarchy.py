"""Recursive hierarchical grouping: clusters of neurons, clusters of clusters, and their evolution.

Level 1 is RIBBED's routing (:class:`~ribbed.core.clustering.OnlineKMeans`): neurons grouped by
their trajectory features, one controller of the bank per cluster. This module adds, on top:

**Higher levels** (``depth - 1`` of them). Level ``L + 1`` clusters the centroids of level ``L``
with k-means *weighted by cluster size in neurons* (a centroid standing for 300 neurons pulls
300 times harder than one standing for 1), ``ceil(K_L / branching)`` clusters, warm-started from
its previous centroids at every routing refresh (so cluster identities are stable and each
keeps its controller). Each level has its own small bank of controllers
(:class:`ModulatorBank`, one per cluster of that level) that reads, for every cluster of the
level below, an aggregate of its neurons: the mean of their standardised features, their
log size (as a fraction of ``log(1 + N)``) and their spread (RMS distance of their trajectory
features to their mean). It outputs a factor ``u = exp(tanh(o) log B)`` in ``[1/B, B]`` per
cluster below, which multiplies the step multipliers of every neuron in it. A neuron's
multiplier is therefore ``m_i * u_2 * ... * u_D``, within ``[1 / (M B^(D-1)), M B^(D-1)]``
for the bank's bound ``M`` and depth ``D``. Output weights start at zero, so every factor
starts at 1. The modulators are trained by the bank's own loss ``mean_i(h_i * m_i)`` with the
per-neuron hypergradient ``h_i``: by the chain rule a cluster's factor receives the sum of
its neurons' signals, ``dL/du_c = sum_{i in c} h_i m_i / (u_c N)`` -- the per-neuron signal
aggregated per cluster.

**Merge and split** (level 1, where controllers are per cluster). At each routing refresh,
after the Lloyd step:

* *merge*: while two clusters' centroids are closer than ``merge_distance`` (Euclidean, in
  standardised feature units), the smaller joins the larger (centroid: size-weighted mean);
* *split*: a cluster whose spread (RMS distance of its neurons to its centroid) exceeds
  ``split_spread`` is cut in two along its principal direction (the top eigenvector of its
  scatter matrix, sign of the projection); the new half takes a controller freed by a merge
  or, failing that, a spare one while fewer than ``max_controllers`` are in use; its controller
  starts as a copy of its parent's (weights and Adam moments);
* a freed controller no split needed is released: the last active controller moves into its
  slot, so active controllers are always slots ``0 .. K-1`` and ``1 <= K <= max_controllers``.

A cluster merged in a refresh is not split in the same refresh, so the rules cannot undo each
other within one step; choose ``merge_distance`` well below ``split_spread`` so they do not
alternate across refreshes either. Upper levels do not merge or split: their centroids are
centroids of distinct clusters, apart by construction, so a threshold in neuron units would
split them down to singletons; their sizes follow from ``branching``.

**Topology evolution**. Every merge, split and membership change (neurons whose cluster at some
level changed between refreshes) is an event ``{step, level, kind, clusters, neurons}`` in
:meth:`ClusterHierarchy.topology_log`: ``clusters`` are the ids involved as they were at that
moment (merge: kept, absorbed; split: parent, new; move: those that lost or gained neurons),
``neurons`` how many neurons changed cluster. Cumulative counts go to RIBBED's telemetry.

Why our own weighted k-means: it runs inside the optimiser step on the parameters' device,
warm-starts from the previous centroids and draws from RIBBED's own ``torch.Generator``, so a
resumed run continues bit for bit; scikit-learn's ``KMeans(sample_weight=...)`` would need host
copies and its own random state. It is Lloyd's algorithm with k-means++ seeding (Arthur &
Vassilvitskii 2007) in its weighted form.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ribbed.checks import check_integer, check_number
from ribbed.core.clustering import OnlineKMeans, kmeans_plus_plus
from ribbed.core.controllers import ControllerBank, gathered_mlp

__all__ = [
    "ClusterHierarchy", "ModulatorBank", "WeightedKMeans", "check_hierarchy_settings",
    "cluster_summary", "copy_controllers", "merge_close_clusters", "split_spread_clusters",
]

Event = tuple[str, list[int], int]  # kind, clusters, neurons moved


def check_hierarchy_settings(*, depth: int, branching: int, bound: float, merge_distance: float,
                             split_spread: float | None, max_controllers: int | None,
                             n_controllers: int) -> None:
    """Raise ``ValueError`` naming the field, the value and what is allowed."""
    check_integer("hierarchy_depth", depth, 1)
    check_integer("hierarchy_branching", branching, 2)
    check_number("hierarchy_bound", bound, "a number > 1", lambda v: v > 1)
    check_number("merge_distance", merge_distance, "a finite number >= 0 (0: never merge)",
                 lambda v: 0 <= v < math.inf)
    if split_spread is not None:
        check_number("split_spread", split_spread, "a number > 0, or None (never split)", lambda v: v > 0)
    if max_controllers is not None:
        check_integer("max_controllers", max_controllers, n_controllers)


# ---------------------------------------------------------------------- cluster statistics


def _spreads(points: torch.Tensor, weights: torch.Tensor, assignment: torch.Tensor,
             centroids: torch.Tensor) -> torch.Tensor:
    """Weighted RMS distance of each cluster's points to its centroid ``[K]`` (0 if empty)."""
    k = centroids.shape[0]
    sq = (points - centroids[assignment]).pow(2).sum(1) * weights
    mass = torch.zeros(k, dtype=points.dtype, device=points.device).index_add_(0, assignment, weights)
    total = torch.zeros_like(mass).index_add_(0, assignment, sq)
    return (total / mass.clamp_min(1e-12)).sqrt()


def cluster_summary(features: torch.Tensor, trajectory: torch.Tensor, ids: torch.Tensor,
                    k: int) -> torch.Tensor:
    """What a higher-level controller reads about each of ``k`` clusters: ``[k, F + 2]``.

    Columns: the mean of the members' standardised ``features``, their log size as a fraction
    of ``log(1 + N)``, and their spread (RMS distance of their ``trajectory`` rows to their
    mean). ``ids [N]`` is each neuron's cluster; empty clusters get zeros.
    """
    n = features.shape[0]
    ones = torch.ones(n, dtype=features.dtype, device=features.device)
    size = torch.zeros(k, dtype=features.dtype, device=features.device).index_add_(0, ids, ones)
    mean = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device)
    mean = mean.index_add_(0, ids, features) / size.clamp_min(1).unsqueeze(1)
    centre = torch.zeros(k, trajectory.shape[1], dtype=trajectory.dtype, device=trajectory.device)
    centre = centre.index_add_(0, ids, trajectory) / size.clamp_min(1).unsqueeze(1)
    spread = _spreads(trajectory, ones.to(trajectory.dtype), ids, centre).to(features.dtype)
    log_size = torch.log1p(size) / math.log1p(n)
    return torch.cat([mean, log_size.unsqueeze(1), spread.unsqueeze(1)], 1)


# ---------------------------------------------------------------------- weighted k-means


class WeightedKMeans:
    """Size-weighted Lloyd clustering of one level's centroids into ``k`` clusters.

    ``fit`` warm-starts from the previous centroids (k-means++ the first time) and iterates
    until the assignment is stable (at most ``iterations``). A cluster left without points is
    re-seeded at the point farthest from its centroid among clusters of two or more points; a
    cluster holding only weightless points keeps its centroid.
    """

    def __init__(self, n_clusters: int, *, iterations: int = 20):
        self.k = n_clusters
        self.iterations = iterations
        self.centroids: torch.Tensor | None = None
        self.assignment: torch.Tensor | None = None

    def fit(self, points: torch.Tensor, weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cluster ``points [U, F]`` with ``weights [U]``; return the ``[U]`` cluster ids."""
        if self.centroids is None:
            self.centroids = kmeans_plus_plus(points, self.k, generator, weights)
        previous = None
        for _ in range(self.iterations):
            distances = torch.cdist(points, self.centroids)
            assignment = distances.argmin(1)
            counts = torch.bincount(assignment, minlength=self.k)
            empty = (counts == 0).nonzero().flatten()
            far = distances.gather(1, assignment.unsqueeze(1)).squeeze(1)
            far[counts[assignment] < 2] = -math.inf
            movable = int((far > -math.inf).sum())
            if len(empty) and movable:
                moved = far.topk(min(len(empty), movable)).indices
                assignment[moved] = empty[: len(moved)]
            mass = torch.zeros(self.k, dtype=points.dtype, device=points.device).index_add_(0, assignment, weights)
            sums = torch.zeros_like(self.centroids).index_add_(0, assignment, points * weights.unsqueeze(1))
            heavy = mass > 0
            self.centroids[heavy] = sums[heavy] / mass[heavy].unsqueeze(1)
            if previous is not None and torch.equal(previous, assignment):
                break
            previous = assignment
        self.assignment = assignment
        return assignment

    def state_dict(self) -> dict:
        return {"centroids": self.centroids, "assignment": self.assignment}

    def load_state_dict(self, state: dict) -> None:
        self.centroids, self.assignment = state["centroids"], state["assignment"]


# ---------------------------------------------------------------------- merge and split


def merge_close_clusters(points: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor,
                         merge_distance: float) -> tuple[list[int], list[Event]]:
    """Merge, closest pair first, every two clusters closer than ``merge_distance``.

    Updates ``assignment`` and ``centroids`` in place; returns the freed cluster ids and the
    merge events ``("merge", [kept, absorbed], neurons moved)``.
    """
    k = centroids.shape[0]
    sizes = torch.bincount(assignment, minlength=k).to(centroids.dtype)
    freed: list[int] = []
    events: list[Event] = []
    while True:
        distances = torch.cdist(centroids, centroids)
        inactive = sizes == 0
        distances[inactive] = math.inf
        distances[:, inactive] = math.inf
        distances.fill_diagonal_(math.inf)
        closest = int(distances.argmin())
        a, b = divmod(closest, k)
        if not float(distances[a, b]) < merge_distance:
            return freed, events
        if sizes[b] > sizes[a]:
            a, b = b, a
        centroids[a] = (sizes[a] * centroids[a] + sizes[b] * centroids[b]) / (sizes[a] + sizes[b])
        events.append(("merge", [a, b], int(sizes[b])))
        assignment[assignment == b] = a
        sizes[a] += sizes[b]
        sizes[b] = 0
        freed.append(b)


def _principal_side(members: torch.Tensor) -> torch.Tensor:
    """Which side of the members' mean, along their principal direction, each member lies."""
    centred = members - members.mean(0)
    direction = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -1]
    return centred @ direction > 0


def split_spread_clusters(points: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor,
                          split_spread: float, free: list[int], max_clusters: int,
                          exclude: set[int]) -> tuple[torch.Tensor, list[tuple[int, int]], list[Event]]:
    """Split clusters whose spread exceeds ``split_spread`` along their principal direction.

    Widest first; each new half takes a slot from ``free`` (consumed in place) or a new slot
    ``K, K+1, ...`` while fewer than ``max_clusters`` exist; stops when there is none.
    ``exclude``: clusters not to split (those merged this refresh). Updates ``assignment`` in
    place; returns the (possibly grown) centroids, the ``(parent, new)`` slot pairs and the
    split events ``("split", [parent, new], neurons moved)``.
    """
    ones = torch.ones(points.shape[0], dtype=points.dtype, device=points.device)
    spreads = _spreads(points, ones, assignment, centroids)
    sizes = torch.bincount(assignment, minlength=centroids.shape[0])
    wide = ((spreads > split_spread) & (sizes >= 2)).nonzero().flatten()
    pairs, events = [], []
    for parent in wide[spreads[wide].argsort(descending=True)].tolist():
        if parent in exclude:
            continue
        if free:
            slot = free.pop(0)
        elif centroids.shape[0] < max_clusters:
            slot = centroids.shape[0]
            centroids = torch.cat([centroids, centroids[parent:parent + 1]])
        else:
            break
        index = (assignment == parent).nonzero().flatten()
        side = _principal_side(points[index])
        moved = index[side]
        assignment[moved] = slot
        centroids[slot] = points[moved].mean(0)
        centroids[parent] = points[index[~side]].mean(0)
        pairs.append((parent, slot))
        events.append(("split", [parent, slot], len(moved)))
    return centroids, pairs, events


def _compaction(free: list[int], k: int) -> tuple[list[int], list[int]]:
    """Moves ``(sources, holes)`` that close the freed slots: active slots at or beyond the new
    count ``k - len(free)`` move into the freed slots below it."""
    count = k - len(free)
    holes = sorted(slot for slot in free if slot < count)
    sources = [slot for slot in range(count, k) if slot not in free]
    return sources, holes


def copy_controllers(rows: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                     sources: list[int], targets: list[int]) -> None:
    """Controller ``targets[j]`` becomes a copy of ``sources[j]``: its rows in every stacked
    parameter and in the optimiser's per-parameter state (Adam's moments)."""
    if not sources:
        return
    with torch.no_grad():
        for param in rows:
            source = torch.tensor(sources, dtype=torch.long, device=param.device)
            target = torch.tensor(targets, dtype=torch.long, device=param.device)
            param[target] = param[source]
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value[target] = value[source]


# ---------------------------------------------------------------------- higher-level controllers


class ModulatorBank(nn.Module):
    """``K`` tiny MLPs, one per cluster of a level, each giving the clusters of the level below
    it a step factor ``exp(tanh(o) log B)`` in ``[1/B, B]`` (1 at initialisation)."""

    def __init__(self, n_controllers: int, n_inputs: int, *, hidden: int, bound: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.log_bound = math.log(bound)
        self.w1 = nn.Parameter(torch.randn(n_controllers, n_inputs, hidden, generator=generator) / math.sqrt(n_inputs))
        self.b1 = nn.Parameter(torch.zeros(n_controllers, hidden))
        self.w2 = nn.Parameter(torch.zeros(n_controllers, hidden, 1))
        self.b2 = nn.Parameter(torch.zeros(n_controllers, 1))

    def forward(self, summaries: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
        """Factors ``[U]`` for clusters below with ``summaries [U, F + 2]`` and parents ``assignment [U]``."""
        out = gathered_mlp(summaries, assignment, self.w1, self.b1, self.w2, self.b2).squeeze(1)
        return torch.exp(torch.tanh(out) * self.log_bound)


def _moves(old: torch.Tensor | None, new: torch.Tensor) -> tuple[int, list[int]]:
    """Neurons whose cluster changed, and the clusters that lost or gained them."""
    if old is None or old.shape != new.shape:
        return 0, []
    changed = old != new
    clusters = torch.cat([old[changed], new[changed]]).unique()
    return int(changed.sum()), clusters.tolist()


class ClusterHierarchy:
    """Merge/split of level-1 clusters, levels 2..``depth`` of clusters of clusters, their
    modulating controllers and the topology log (see the module docstring).

    Args:
        n_features: F, the length of a neuron's feature vector.
        max_controllers: level-1 controller slots (the bank's size).
        depth: levels in all (1: level 1 only, with merge/split if enabled).
        branching: level ``L + 1`` has ``ceil(K_L / branching)`` clusters.
        hidden: hidden width of the higher-level controllers.
        bound: ``B``, each higher-level factor lies in ``[1/B, B]``.
        merge_distance: merge clusters closer than this (0: never).
        split_spread: split clusters wider than this (None: never).
        seed: seed of the hierarchy's own generator (controller init, k-means++ seeding), kept
            apart from the optimiser's so that switching the hierarchy on changes nothing else.
    """

    def __init__(self, n_features: int, max_controllers: int, *, depth: int = 2, branching: int = 4,
                 hidden: int = 8, bound: float = 2.0, merge_distance: float = 0.0,
                 split_spread: float | None = None, seed: int = 0):
        self.max_controllers = max_controllers
        self.generator = torch.Generator().manual_seed(seed)
        self.merge_distance, self.split_spread = merge_distance, split_spread
        sizes, k = [], max_controllers
        for _ in range(depth - 1):
            k = math.ceil(k / branching)
            sizes.append(k)
        self.levels = [WeightedKMeans(size) for size in sizes]
        self.modulators = nn.ModuleList(
            ModulatorBank(size, n_features + 2, hidden=hidden, bound=bound, generator=self.generator)
            for size in sizes
        )
        self.log: list[dict[str, Any]] = []
        self.ids: list[torch.Tensor] = []
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.neuron_ids: torch.Tensor | None = None
        self.moved = 0

    def parameters(self):
        """The higher-level controllers' parameters (trained with the bank's optimiser)."""
        return self.modulators.parameters()

    def to(self, device: torch.device | str) -> ClusterHierarchy:
        self.modulators.to(device)
        return self

    # ------------------------------------------------------------------ topology

    def restructure(self, routing: OnlineKMeans, step: int, bank: ControllerBank,
                    optimizer: torch.optim.Optimizer) -> None:
        """After a routing refresh: log the Lloyd step's moves, merge/split level 1 (moving
        controllers with their clusters), re-cluster the levels above, log every change."""
        assert routing.assignment is not None, "called after a routing refresh"
        moved, clusters = _moves(self.ids[0] if self.ids else None, routing.assignment)
        events = [("move", clusters, moved)] if moved else []
        events += self._merge_and_split(routing, [bank.w1, bank.b1, bank.w2, bank.b2], optimizer)
        self.moved = sum(neurons for _, _, neurons in events)
        self._record(step, 1, events)
        self._recluster(routing, step)

    def _merge_and_split(self, routing: OnlineKMeans, rows: list[nn.Parameter],
                         optimizer: torch.optim.Optimizer) -> list[Event]:
        """Apply the merge and split rules to ``routing``'s clusters, then release the freed
        controllers no split took; ``rows``: the bank's per-controller parameters."""
        assert (routing.trajectory is not None and routing.centroids is not None
                and routing.assignment is not None), "called after a routing refresh"
        points, assignment = routing.trajectory, routing.assignment.clone()
        freed: list[int] = []
        events: list[Event] = []
        if self.merge_distance > 0:
            freed, events = merge_close_clusters(points, assignment, routing.centroids, self.merge_distance)
        if self.split_spread is not None:
            merged = {clusters[0] for _, clusters, _ in events}
            routing.centroids, pairs, splits = split_spread_clusters(
                points, assignment, routing.centroids, self.split_spread, freed, self.max_controllers, merged)
            events += splits
            copy_controllers(rows, optimizer, [parent for parent, _ in pairs], [child for _, child in pairs])
        if freed:
            count = routing.centroids.shape[0]
            sources, holes = _compaction(freed, count)
            relabel = torch.arange(count, device=assignment.device)
            relabel[sources] = torch.tensor(holes, dtype=torch.long, device=assignment.device)
            assignment = relabel[assignment]
            routing.centroids[holes] = routing.centroids[sources]
            routing.centroids = routing.centroids[: count - len(freed)]
            copy_controllers(rows, optimizer, sources, holes)
        routing.assignment, routing.k = assignment, routing.centroids.shape[0]
        return events

    def _recluster(self, routing: OnlineKMeans, step: int) -> None:
        ids = routing.assignment
        centroids = routing.centroids
        assert ids is not None and centroids is not None, "called after a routing refresh"
        weights = torch.bincount(ids, minlength=routing.k).to(centroids.dtype)
        new_ids = [ids]
        for index, level in enumerate(self.levels):
            parents = level.fit(centroids, weights, self.generator)
            weights = torch.zeros(level.k, dtype=weights.dtype, device=weights.device).index_add_(0, parents, weights)
            assert level.centroids is not None, "fit() sets them"
            centroids, ids = level.centroids, parents[ids]
            new_ids.append(ids)
            moved, clusters = _moves(self.ids[index + 1] if len(self.ids) > index + 1 else None, ids)
            self._record(step, index + 2, [("move", clusters, moved)] if moved else [])
        self.ids = new_ids

    def _record(self, step: int, level: int, events: list[Event]) -> None:
        self.log.extend({"step": step, "level": level, "kind": kind, "clusters": clusters, "neurons": neurons}
                        for kind, clusters, neurons in events)

    # ------------------------------------------------------------------ modulation

    def summarise(self, features: torch.Tensor, routing: OnlineKMeans) -> None:
        """Aggregate the clusters of every level for the higher-level controllers (kept until
        the next refresh, when the same inputs give the controllers their training signal)."""
        ids, units = routing.assignment, routing.k
        assert ids is not None and routing.trajectory is not None, "called after a routing refresh"
        self.neuron_ids, self.pending = ids, []
        for level in self.levels:
            assert level.assignment is not None, "restructure() fitted every level"
            summary = cluster_summary(features, routing.trajectory.to(features.dtype), ids, units)
            self.pending.append((summary, level.assignment))
            ids, units = level.assignment[ids], level.k

    def modulation(self) -> torch.Tensor:
        """Each neuron's product of higher-level factors ``[N]`` for the last summaries
        (differentiable in the modulators' parameters)."""
        assert self.neuron_ids is not None, "summarise() first"
        factor = torch.ones(self.neuron_ids.shape[0], device=self.neuron_ids.device)
        ids = self.neuron_ids
        for (summary, parents), modulator in zip(self.pending, self.modulators, strict=True):
            factor = factor * modulator(summary, parents)[ids]
            ids = parents[ids]
        return factor

    # ------------------------------------------------------------------ inspection and persistence

    def topology_log(self) -> list[dict[str, Any]]:
        return [dict(event, clusters=list(event["clusters"])) for event in self.log]

    def telemetry(self, routing: OnlineKMeans) -> dict[str, float]:
        kinds = [event["kind"] for event in self.log]
        return {"ribbed_merges": float(kinds.count("merge")), "ribbed_splits": float(kinds.count("split")),
                "ribbed_membership_changes": float(self.moved), "ribbed_clusters": float(routing.k)}

    def state_dict(self) -> dict[str, Any]:
        return {"modulators": self.modulators.state_dict(), "levels": [level.state_dict() for level in self.levels],
                "log": self.topology_log(), "ids": list(self.ids), "pending": [list(item) for item in self.pending],
                "neuron_ids": self.neuron_ids, "moved": self.moved, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], routing: OnlineKMeans) -> None:
        """Restore, and give ``routing`` back the cluster count merges and splits had reached."""
        self.modulators.load_state_dict(state["modulators"])
        for level, saved in zip(self.levels, state["levels"], strict=True):
            level.load_state_dict(saved)
        self.log = [dict(event) for event in state["log"]]
        self.ids, self.neuron_ids, self.moved = list(state["ids"]), state["neuron_ids"], state["moved"]
        self.pending = [tuple(item) for item in state["pending"]]
        self.generator.set_state(state["generator"])
        if routing.centroids is not None:
            routing.k = routing.centroids.shape[0]
