"""Routers (the coupling strategies): which of ``K`` controllers serves each of ``N`` neurons.

A router maps the neurons' trajectory features ``points [N, F]`` to controllers, given the
controllers' keys (the k-means centroids ``[K, F]``). :class:`ribbed.core.clustering.OnlineKMeans`
calls ``prepare(centroids, generator)`` (index the centroids) then ``route(points, previous,
generator)`` at every re-clustering; the RIBBED option ``routing`` names the strategy and
``routing_options`` its options. Registered strategies (:data:`ROUTERS`):

* ``dense``: exact nearest centroid, ``O(N K F)`` with ``torch.cdist`` (the default, and the
  reference every other strategy is measured against);
* ``tree``: a balanced principal-direction hyperplane tree over the centroids (a PCA tree,
  Sproull 1991; Verma, Kpotufe & Dasgupta 2009, "Which spatial partition trees are adaptive
  to intrinsic dimension?"). Each node splits its centroids at the median of their projection
  on their principal direction, so the tree is balanced and every leaf holds one centroid;
  all neurons descend together, one dot product per level: ``O(N F log K)``. Exact for a
  neuron whose distance to its centroid is below every split margin on its path;
* ``lsh``: random-hyperplane sign hashes (SimHash, Charikar 2002) in several tables; a neuron
  is compared only with the centroids that share its bucket in some table, ``O(N F T (b +
  c))`` for ``T`` tables of ``b = log2(K / bucket_size)`` bits and buckets of at most ``c``
  centroids. Each hyperplane is offset to the median of the centroids' projections, so each bit
  halves the centroid set (balanced buckets). Fallback: a neuron whose bucket is empty in every
  table is routed by the exact dense search (counted in ``fallbacks``);
* ``sampled``: only a sample of neurons is re-coupled at each routing (exact nearest centroid
  for them, ``O(n K F)``); the others keep their controller, and RIBBED keeps their step
  multiplier at that refresh. The sample is drawn by weighted reservoir sampling (A-ES,
  Efraimidis & Spirakis 2006: the ``n`` largest keys ``u^(1/w)``), with weights ``w =
  exp(feature)`` of a trajectory feature (``importance``; ``surprise`` by default, i.e.
  neurons that their controllers predict worst) or ``w = 1`` (``reservoir``, uniform);
* ``topk-attention``: sparse attention of each neuron over the controller keys: scores
  ``-|x - c|^2 / temperature``, softmax over the ``k`` best. RIBBED then evaluates each of
  the neuron's ``k`` controllers with the bank's gather + bmm and mixes their raw outputs
  by the weights (:meth:`ribbed.core.controllers.ControllerBank.raw`). With ``k = 1`` it is
  ``dense``. It is the ``O(N K F)`` soft baseline of the design.

Why our own code: approximate nearest-neighbour libraries exist (Annoy, FAISS), but Annoy
answers one query per Python call (a loop over neurons) and FAISS works on host NumPy arrays
with its own index types; these routers are a few vectorised torch ops over all neurons at
once that run on the model's device, and the routing problem here is small (``K <= 4096``
keys in ``F = 8`` dimensions, rebuilt at every re-clustering).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from ribbed.checks import check_integer, check_number
from ribbed.core.features import FEATURE_NAMES
from ribbed.registry import Registry

__all__ = [
    "ROUTERS",
    "DenseRouter",
    "LSHRouter",
    "Routed",
    "Router",
    "SampledRouter",
    "TopKAttentionRouter",
    "TreeRouter",
    "build_router",
    "nearest_centroid",
    "register_router",
]

_BLOCK_ENTRIES = 1 << 24
"""Largest number of per-(neuron, candidate) entries one block materialises (64 MiB of float32):
bounds the memory of a search at large ``N K`` with a loop over row blocks, not over neurons."""


@dataclass
class Routed:
    """A routing of ``N`` neurons.

    Attributes:
        assignment: ``[N]`` int64, each neuron's controller (its first, under attention).
        distance: ``[N]`` distance of each neuron to its controller's centroid.
        mixture: ``(controllers [N, k], weights [N, k])`` when a neuron mixes several controllers.
        coupled: ``[N]`` bool, the neurons re-coupled by this routing; ``None``: all of them.
    """

    assignment: torch.Tensor
    distance: torch.Tensor
    mixture: tuple[torch.Tensor, torch.Tensor] | None = None
    coupled: torch.Tensor | None = None


class Router(abc.ABC):
    """A coupling strategy: ``prepare`` indexes the centroids, ``route`` assigns the neurons."""

    centroids: torch.Tensor

    def check(self, n_controllers: int) -> None:
        """Raise ``ValueError`` if this strategy cannot serve ``n_controllers`` controllers."""
        check_integer("n_controllers", n_controllers)

    def prepare(self, centroids: torch.Tensor, generator: torch.Generator) -> None:
        """Index the controllers' keys ``[K, F]`` (called whenever they have moved)."""
        self.centroids = centroids

    @abc.abstractmethod
    def route(self, points: torch.Tensor, previous: torch.Tensor | None,
              generator: torch.Generator) -> Routed:
        """Route ``points [N, F]``; ``previous [N]`` is the last assignment (``None`` at first)."""


ROUTERS: Registry[Router] = Registry("routing strategy", "routing")


def register_router(name: str, description: str):
    """Register a :class:`Router` factory ``(**options) -> Router`` under ``name``."""
    return ROUTERS.register(name, description)


def build_router(name: str = "dense", options: dict | None = None) -> Router:
    """The router ``name`` built with ``options`` (errors name ``routing`` and the allowed values)."""
    return ROUTERS.build(name, **(options or {}))


def _row_blocks(n_rows: int, entries_per_row: int) -> list[slice]:
    step = max(1, _BLOCK_ENTRIES // max(1, entries_per_row))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact nearest centroid ``(assignment [N], distance [N])`` by ``torch.cdist``, in row blocks."""
    assignments, distances = [], []
    for rows in _row_blocks(points.shape[0], centroids.shape[0]):
        distance = torch.cdist(points[rows], centroids)
        assignment = distance.argmin(1)
        assignments.append(assignment)
        distances.append(distance.gather(1, assignment.unsqueeze(1)).squeeze(1))
    if len(assignments) == 1:
        return assignments[0], distances[0]
    return torch.cat(assignments), torch.cat(distances)


def distance_to(points: torch.Tensor, centroids: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """``[N]`` distance of each point to its assigned centroid (``O(N F)``)."""
    return torch.linalg.vector_norm(points - centroids[assignment], dim=1)


def _integer(field: str, value, low: int) -> int:
    return check_integer(f"routing_options.{field}", value, low)


def _positive(field: str, value) -> float:
    return check_number(f"routing_options.{field}", value, "a number > 0", lambda v: v > 0)


class DenseRouter(Router):
    """Exact nearest centroid for every neuron, ``O(N K F)``."""

    def route(self, points, previous, generator) -> Routed:
        return Routed(*nearest_centroid(points, self.centroids))


class TreeRouter(Router):
    """Balanced principal-direction hyperplane tree: ``log2 K`` dot products per neuron.

    The tree is stored in heap order (node ``i`` has children ``2i+1``, ``2i+2``) as one
    normal and one threshold per inner node; a neuron goes right where ``x . normal >
    threshold``. A node with one centroid has a zero normal (everything goes left), so trees
    over any ``K`` have ``ceil(log2 K)`` levels and the descent has no branches.
    """

    def prepare(self, centroids, generator) -> None:
        self.centroids = centroids
        k, features = centroids.shape
        self.depth = (k - 1).bit_length()
        inner = (1 << self.depth) - 1
        self.normals = centroids.new_zeros(inner, features)
        self.thresholds = centroids.new_zeros(inner)
        order = torch.arange(k, device=centroids.device)
        starts = torch.zeros(1, dtype=torch.long, device=centroids.device)
        sizes = torch.full((1,), k, dtype=torch.long, device=centroids.device)
        for level in range(self.depth):
            order, normal, threshold, left = self._split(centroids, order, starts, sizes)
            nodes = slice((1 << level) - 1, (1 << (level + 1)) - 1)
            self.normals[nodes], self.thresholds[nodes] = normal, threshold
            starts = torch.stack([starts, starts + left], 1).flatten()
            sizes = torch.stack([left, sizes - left], 1).flatten()
        self.leaf_centroid = torch.where(sizes > 0, order[starts.clamp(max=k - 1)], 0)

    @staticmethod
    def _split(centroids, order, starts, sizes):
        """Split every node of one level (segments ``starts``/``sizes`` of ``order``) at once."""
        k = centroids.shape[0]
        slot = torch.arange(int(sizes.max()), device=centroids.device)
        valid = slot < sizes.unsqueeze(1)
        index = (starts.unsqueeze(1) + slot).clamp(max=k - 1)
        members = centroids[order[index]]
        weight = valid.to(centroids.dtype).unsqueeze(2)
        mean = (members * weight).sum(1) / sizes.clamp(min=1).unsqueeze(1).to(centroids.dtype)
        centred = (members - mean.unsqueeze(1)) * weight
        direction = torch.linalg.eigh(centred.transpose(1, 2) @ centred).eigenvectors[..., -1]
        projection = (members * direction.unsqueeze(1)).sum(2).masked_fill(~valid, math.inf)
        ranked, rank = projection.sort(1)
        left = (sizes + 1) // 2
        last_left = ranked.gather(1, (left - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        first_right = ranked.gather(1, left.clamp(max=slot.numel() - 1).unsqueeze(1)).squeeze(1)
        splits = sizes >= 2
        threshold = torch.where(splits, (last_left + first_right) / 2, 0.0)
        normal = direction * splits.unsqueeze(1)
        reordered = order.clone()
        reordered[index[valid]] = order[(starts.unsqueeze(1) + rank).clamp(max=k - 1)][valid]
        return reordered, normal, threshold, left

    def route(self, points, previous, generator) -> Routed:
        node = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        for _ in range(self.depth):
            right = torch.linalg.vecdot(points, self.normals[node]) > self.thresholds[node]
            node = 2 * node + 1 + right
        assignment = self.leaf_centroid[node - ((1 << self.depth) - 1)]
        return Routed(assignment, distance_to(points, self.centroids, assignment))


class LSHRouter(Router):
    """Random-hyperplane sign hashes in ``tables`` tables; exact search within shared buckets.

    A bucket keeps at most ``capacity`` centroids (the lowest ids; the others of an overfull
    bucket are left out of that table only, counted in ``dropped``), so a neuron compares with
    at most ``tables * capacity`` centroids whatever ``K``: the candidates' coordinates are
    stored per bucket, feature-major (empty slots at infinity), and gathered bucket by bucket.

    Args:
        tables: T, hash tables (more: fewer misses, more candidates).
        bucket_size: mean centroids per bucket; ``bits = max(1, round(log2(K / bucket_size)))``
            unless ``bits`` is given.
        bits: b, hyperplanes per table (overrides ``bucket_size``; at most 24).
        capacity: c, centroids kept per bucket.
    """

    def __init__(self, tables: int = 4, bucket_size: float = 2.0, bits: int | None = None,
                 capacity: int = 4):
        self.tables = _integer("tables", tables, 1)
        self.bucket_size = _positive("bucket_size", bucket_size)
        if bits is not None and (_integer("bits", bits, 1) > 24):
            raise ValueError(f"routing_options.bits: got {bits!r}; allowed: an integer from 1 to 24")
        self.bits = bits
        self.capacity = _integer("capacity", capacity, 1)
        self.fallbacks = self.dropped = 0

    def prepare(self, centroids, generator) -> None:
        self.centroids = centroids
        k, features = centroids.shape
        bits = self.bits or min(24, max(1, round(math.log2(max(k / self.bucket_size, 1.0)))))
        self._hyperplanes(centroids, bits, generator)
        device = centroids.device
        buckets = self._buckets(centroids).flatten()
        owner = torch.arange(k, device=device).repeat_interleave(self.tables)
        order = buckets.argsort(stable=True)
        counts = torch.bincount(buckets, minlength=self.tables << bits)
        rank = torch.arange(buckets.numel(), device=device) - (counts.cumsum(0) - counts)[buckets[order]]
        kept = rank < self.capacity
        self.dropped = int((~kept).sum())
        bucket, slot, member = buckets[order][kept], rank[kept], owner[order][kept]
        self.bucket_points = centroids.new_full((self.tables << bits, features, self.capacity), math.inf)
        self.bucket_points[bucket, :, slot] = centroids[member]
        self.bucket_ids = torch.full((self.tables << bits, self.capacity), -1, dtype=torch.long, device=device)
        self.bucket_ids[bucket, slot] = member

    def _hyperplanes(self, centroids: torch.Tensor, bits: int, generator: torch.Generator) -> None:
        """Draw each table's ``b`` hyperplanes: ``d = min(b, F)`` random orthonormal directions,
        ``b_j`` bits on direction ``j`` as ``2^b_j - 1`` parallel hyperplanes at the quantiles of
        the centroids' projections (the bin index is the code's digit)."""
        features, device = centroids.shape[1], centroids.device
        directions = min(bits, features)
        gaussian = torch.randn(self.tables, features, directions, generator=generator, dtype=torch.float64)
        basis = torch.linalg.qr(gaussian).Q.to(centroids)  # [T, F, d]
        self.planes = basis.permute(1, 0, 2).reshape(features, self.tables * directions)
        digits = torch.full((directions,), bits // directions, device=device)
        digits[: bits % directions] += 1
        levels = 2 ** digits
        quantiles = torch.arange(1, int(levels.max()), device=device) / levels.unsqueeze(1)
        projection = centroids @ self.planes  # [K, T*d]
        edges = torch.quantile(projection, quantiles.clamp(max=1).flatten().to(centroids), dim=0)
        edges = edges.view(directions, -1, self.tables, directions).diagonal(dim1=0, dim2=3)  # [L, T, d]
        beyond = quantiles >= 1  # directions with fewer levels: their extra edges lie at infinity
        self.edges = edges.masked_fill(beyond.T.unsqueeze(1), math.inf).permute(1, 2, 0).reshape(
            self.tables * directions, -1)
        strides = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0).to(centroids.dtype)
        block = torch.arange(self.tables, device=device).repeat_interleave(directions)
        self.pack = centroids.new_zeros(self.tables * directions, self.tables)
        self.pack[torch.arange(self.tables * directions, device=device), block] = strides.repeat(self.tables)
        self.first_bucket = torch.arange(self.tables, device=device) << bits

    def _buckets(self, points: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` global bucket ids: table ``t``'s ``b``-bit code plus ``t * 2^b``."""
        bins = ((points @ self.planes).unsqueeze(2) > self.edges).sum(2).to(points.dtype)
        return (bins @ self.pack).long() + self.first_bucket

    def route(self, points, previous, generator) -> Routed:
        assignments, distances, self.fallbacks = [], [], 0
        for rows in _row_blocks(points.shape[0], self.tables * self.capacity * points.shape[1]):
            block = points[rows]
            buckets = self._buckets(block)
            gathered = self.bucket_points[buckets]  # [n, T, F, c]: one contiguous block per bucket
            squared = gathered.sub_(block[:, None, :, None]).square_().sum(2).flatten(1)
            best = squared.argmin(1, keepdim=True)
            assignment = self.bucket_ids[buckets].flatten(1).gather(1, best).squeeze(1)
            distance = squared.gather(1, best).squeeze(1).sqrt()
            missing = (assignment < 0).nonzero().squeeze(1)
            if missing.numel():
                assignment[missing], distance[missing] = nearest_centroid(block[missing], self.centroids)
                self.fallbacks += missing.numel()
            assignments.append(assignment)
            distances.append(distance)
        if len(assignments) == 1:
            return Routed(assignments[0], distances[0])
        return Routed(torch.cat(assignments), torch.cat(distances))


class SampledRouter(Router):
    """Re-couple only a sample of the neurons each routing; the others keep their controller.

    Args:
        fraction: share of neurons re-coupled per routing (at least one neuron).
        scheme: ``importance`` (weights ``exp(feature)``) or ``reservoir`` (uniform).
        feature: the trajectory feature whose size makes a neuron more likely to be sampled.
    """

    SCHEMES = ("importance", "reservoir")

    def __init__(self, fraction: float = 0.1, scheme: str = "importance", feature: str = "surprise"):
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise ValueError(f"routing_options.fraction: got {fraction!r}; allowed: a number in (0, 1]")
        if scheme not in self.SCHEMES:
            raise ValueError(f"routing_options.scheme: got {scheme!r}; allowed: {', '.join(self.SCHEMES)}")
        if feature not in FEATURE_NAMES:
            raise ValueError(f"routing_options.feature: got {feature!r}; allowed: {', '.join(FEATURE_NAMES)}")
        self.fraction, self.scheme = float(fraction), scheme
        self.feature = FEATURE_NAMES.index(feature)

    def sample(self, points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Indices of the neurons to re-couple: the largest A-ES keys ``log(u) / w``."""
        n = points.shape[0]
        size = max(1, math.ceil(self.fraction * n))
        log_u = torch.rand(n, generator=generator).log().to(points.device)
        if self.scheme == "reservoir":
            return log_u.topk(size).indices
        score = points[:, self.feature]
        weight = torch.exp(score - score.max())
        return (log_u / weight).topk(size).indices

    def route(self, points, previous, generator) -> Routed:
        if previous is None:
            return Routed(*nearest_centroid(points, self.centroids))
        chosen = self.sample(points, generator)
        assignment = previous.clone()
        assignment[chosen] = nearest_centroid(points[chosen], self.centroids)[0]
        coupled = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
        coupled[chosen] = True
        return Routed(assignment, distance_to(points, self.centroids, assignment), coupled=coupled)


class TopKAttentionRouter(Router):
    """Each neuron attends to its ``k`` nearest controller keys: softmax of ``-|x - c|^2 / T``.

    Args:
        k: controllers mixed per neuron (at most the number of controllers).
        temperature: T of the softmax (small: the nearest controller dominates).
    """

    def __init__(self, k: int = 2, temperature: float = 1.0):
        self.k = _integer("k", k, 1)
        self.temperature = _positive("temperature", temperature)

    def check(self, n_controllers: int) -> None:
        super().check(n_controllers)
        if self.k > n_controllers:
            raise ValueError(f"routing_options.k: got {self.k}; allowed: an integer from 1 to "
                             f"n_controllers ({n_controllers})")

    def route(self, points, previous, generator) -> Routed:
        controllers, distances = [], []
        for rows in _row_blocks(points.shape[0], self.centroids.shape[0]):
            top = torch.cdist(points[rows], self.centroids).topk(self.k, largest=False)
            controllers.append(top.indices)
            distances.append(top.values)
        controller, distance = torch.cat(controllers), torch.cat(distances)
        weights = torch.softmax(-distance.pow(2) / self.temperature, dim=1)
        return Routed(controller[:, 0].clone(), distance[:, 0].clone(), mixture=(controller, weights))


register_router("dense", "exact nearest centroid by torch.cdist, O(N K)")(DenseRouter)
register_router("tree", "balanced principal-direction hyperplane tree, O(N log K)")(TreeRouter)
register_router("lsh", "random-hyperplane sign hashes in several tables; exact search in shared buckets")(
    LSHRouter)
register_router("sampled", "re-couple an importance- or reservoir-sampled share of neurons per routing")(
    SampledRouter)
register_router("topk-attention", "softmax attention over the k nearest controller keys; outputs mixed")(
    TopKAttentionRouter)
