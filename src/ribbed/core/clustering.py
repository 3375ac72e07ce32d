"""Clustering neurons for their controllers: online k-means over the neurons' trajectory features.

Centroids are seeded with k-means++. Each neuron's *trajectory feature* is an exponential
moving average of its standardised feature vector, so neurons that have been learning alike share a controller. Every
``refresh`` the assignment is recomputed by the coupling strategy (a router of
``ribbed.core.routers``; by default the exact nearest centroid, ``O(N K)`` with
``torch.cdist``) followed by one Lloyd update of the centroids; an empty cluster is
re-seeded at the neuron farthest from its centroid among clusters of two or more, so no
controller is left unused while there are neurons to spare (and no neuron is moved out of
a cluster it is alone in, nor a neuron the router did not re-couple). The
number of neurons that changed controller is kept (the topology-evolution signal).
"""

from __future__ import annotations

import torch

from ribbed.core.routers import DenseRouter, Router

__all__ = ["OnlineKMeans", "kmeans_plus_plus"]


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centroid drawn with
    probability proportional to the squared distance to the nearest one chosen so far (times
    the point's weight when ``weights`` are given; the first one uniformly, or by weight).
    With fewer points than ``k``, points are reused."""
    def draw(scores: torch.Tensor) -> int:
        total = float(scores.sum())
        if total <= 0:
            return int(torch.randint(len(scores), (1,), generator=generator))
        return int(torch.multinomial((scores / total).cpu(), 1, generator=generator))

    chosen = [int(torch.randint(len(points), (1,), generator=generator)) if weights is None else draw(weights)]
    nearest = (points - points[chosen[0]]).pow(2).sum(1)
    for _ in range(1, k):
        chosen.append(draw(nearest if weights is None else weights * nearest))
        nearest = torch.minimum(nearest, (points - points[chosen[-1]]).pow(2).sum(1))
    return points[chosen].clone()


class OnlineKMeans:
    """Routing of ``N`` neurons to ``K`` controllers by ``router`` with Lloyd updates.

    ``router`` is a coupling strategy (default :class:`ribbed.core.routers.DenseRouter`, exact
    nearest centroid). Besides ``assignment`` it may leave ``mixture`` (top-k attention: each
    neuron's controllers and weights) and ``coupled`` (sampled coupling: the neurons re-coupled
    by the last refresh; ``None`` when all were).
    """

    def __init__(self, n_clusters: int, *, trajectory_momentum: float = 0.9, router: Router | None = None):
        self.k = n_clusters
        self.momentum = trajectory_momentum
        self.router = DenseRouter() if router is None else router
        self.router.check(n_clusters)
        self.trajectory: torch.Tensor | None = None
        self.centroids: torch.Tensor | None = None
        self.assignment: torch.Tensor | None = None
        self.mixture: tuple[torch.Tensor, torch.Tensor] | None = None
        self.coupled: torch.Tensor | None = None
        self.changes = 0

    def observe(self, features: torch.Tensor) -> None:
        """Fold the current standardised features ``[N, F]`` into the trajectory features."""
        if self.trajectory is None:
            self.trajectory = features.clone()
        else:
            self.trajectory.lerp_(features, 1 - self.momentum)

    def refresh(self, generator: torch.Generator) -> torch.Tensor:
        """Route the neurons to centroids, update the centroids; return ``[N]`` ids."""
        points = self.trajectory
        assert points is not None, "observe() gives the features first"
        if self.centroids is None:
            self.centroids = kmeans_plus_plus(points, self.k, generator)
        self.router.prepare(self.centroids, generator)
        routed = self.router.route(points, self.assignment, generator)
        assignment, spread = routed.assignment, routed.distance
        counts = torch.bincount(assignment, minlength=self.k)
        sums = torch.zeros_like(self.centroids).index_add_(0, assignment, points)
        occupied = counts > 0
        self.centroids[occupied] = sums[occupied] / counts[occupied].unsqueeze(1)
        empty = (~occupied).nonzero().flatten()
        spread[counts[assignment] < 2] = -float("inf")  # never empty a cluster to fill another
        if routed.coupled is not None:
            spread[~routed.coupled] = -float("inf")  # a neuron left uncoupled keeps its controller
        movable = int((spread > -float("inf")).sum())
        if len(empty) and movable:
            far = spread.topk(min(len(empty), movable)).indices
            self.centroids[empty[: len(far)]] = points[far]
            assignment[far] = empty[: len(far)]
            if routed.mixture is not None:  # alone at its new centroid, it attends to it only
                controllers, weights = routed.mixture
                controllers[far, 0] = assignment[far]
                weights[far] = torch.nn.functional.one_hot(torch.zeros_like(far), weights.shape[1]).to(weights)
        self.changes = 0 if self.assignment is None else int((assignment != self.assignment).sum())
        self.assignment, self.mixture, self.coupled = assignment, routed.mixture, routed.coupled
        return assignment

    def controller_choice(self) -> tuple[torch.Tensor, ...]:
        """The ``ControllerBank`` arguments after the features: ``(assignment,)``, or
        ``(controllers [N, k], weights [N, k])`` under top-k attention."""
        if self.mixture is not None:
            return self.mixture
        assert self.assignment is not None, "refresh() routes the neurons first"
        return (self.assignment,)

    def state_dict(self) -> dict:
        return {"trajectory": self.trajectory, "centroids": self.centroids,
                "assignment": self.assignment, "changes": self.changes,
                "mixture": None if self.mixture is None else list(self.mixture), "coupled": self.coupled}

    def load_state_dict(self, state: dict) -> None:
        self.trajectory, self.centroids = state["trajectory"], state["centroids"]
        self.assignment, self.changes = state["assignment"], state["changes"]
        mixture = state.get("mixture")
        self.mixture = None if mixture is None else tuple(mixture)
        self.coupled = state.get("coupled")
