"""Chiral gradient descent: a topology-aware rotation of each layer's gradient.

Per layer, ``G <- G + gamma J G`` where ``G`` is the ``[n_neurons, fan_in]`` gradient (bias
as one more column) and ``J = A - A^T`` is skew-symmetric, built from a graph ``A`` over the
layer's neurons. Because ``x^T J x = 0`` for every ``x``, the first-order change of the loss,
``-<G, G + gamma J G>``, equals plain descent's: the term only moves the step along level
sets, mixing each neuron's gradient with its graph neighbours' with a handedness set by
the sign of ``gamma``.

Graphs (refreshed every ``refresh`` steps from the current weights):

* ``ring`` (default): neurons ordered by their controller group, then by their weight rows'
  projection on the layer's leading singular direction; ``A`` links each neuron to the next
  in that order, cyclically. ``J G`` is then two contiguous shifts of the reordered rows:
  no gather/scatter per neighbour, which is what makes the term cheap.
* ``knn``: ``A`` links each neuron to its ``k`` most similar neurons (cosine similarity of
  weight rows); applied with a gather and a scatter-add.
* ``random``: a ring over a random order: the topology-free control.

``gamma = 0`` leaves the gradient untouched (the term is skipped entirely).
"""

from __future__ import annotations

import torch

from ribbed.core.layers import NeuronLayer

__all__ = ["CHIRAL_GRAPHS", "ChiralTerm", "skew_apply"]

CHIRAL_GRAPHS = ("ring", "knn", "random")


def _rows_with_bias(layer: NeuronLayer) -> torch.Tensor:
    rows = layer.weight.detach().reshape(layer.n, -1)
    return rows if layer.bias is None else torch.cat([rows, layer.bias.detach().reshape(layer.n, 1)], dim=1)


def ring_neighbours(order: torch.Tensor) -> torch.Tensor:
    """``[n, 2]``: for each neuron, the next and the previous neuron on the ring over ``order``."""
    neighbours = torch.empty(len(order), 2, dtype=torch.long, device=order.device)
    neighbours[order, 0] = order.roll(-1)
    neighbours[order, 1] = order.roll(1)
    return neighbours


def skew_apply(rows: torch.Tensor, neighbours: torch.Tensor, ring: bool) -> torch.Tensor:
    """``J @ rows`` (neurons along dim 0) for ``J = A - A^T``.

    For a ring, ``neighbours[:, 0]``/``[:, 1]`` are each neuron's successor/predecessor and
    ``(J G)_i = G_next(i) - G_prev(i)``: two gathers. For a k-nearest-neighbour graph,
    ``(A G)_i`` sums the rows of ``i``'s neighbours and ``(A^T G)`` scatters each row to them.
    """
    if ring:
        return rows.index_select(0, neighbours[:, 0]).sub_(rows.index_select(0, neighbours[:, 1]))
    k = neighbours.shape[1]
    forward = rows[neighbours].sum(1)
    backward = torch.zeros_like(rows).index_add_(0, neighbours.reshape(-1), rows.repeat_interleave(k, 0))
    return forward.sub_(backward)


class ChiralTerm:
    """Adds ``gamma J G`` to every neuron layer's gradient (see the module docstring)."""

    def __init__(self, gamma: float, graph: str = "ring", neighbours: int = 4):
        if graph not in CHIRAL_GRAPHS:
            raise ValueError(f"chiral_graph: got {graph!r}; allowed: {', '.join(CHIRAL_GRAPHS)}")
        if neighbours < 1:
            raise ValueError(f"chiral_neighbours: got {neighbours}; allowed: an integer >= 1")
        self.gamma, self.graph, self.k = gamma, graph, neighbours
        self.structure: list[torch.Tensor] = []

    def refresh(self, layers: list[NeuronLayer], generator: torch.Generator,
                assignment: torch.Tensor | None = None) -> None:
        """Rebuild each layer's graph from its current weights (and controller groups)."""
        self.structure = []
        for layer in layers:
            rows = _rows_with_bias(layer)
            if self.graph == "random":
                order = torch.randperm(layer.n, generator=generator).to(rows.device)
                self.structure.append(ring_neighbours(order))
            elif self.graph == "ring":
                direction = torch.randn(rows.shape[1], 1, generator=generator).to(rows)
                for _ in range(3):  # power iteration towards the leading right singular vector
                    direction = rows.T @ (rows @ direction)
                    direction = direction / direction.norm().clamp_min(1e-12)
                key = (rows @ direction).squeeze(1).argsort().argsort().double()
                if assignment is not None:
                    key = key + layer.n * assignment[layer.offset:layer.offset + layer.n].to(key.device).double()
                self.structure.append(ring_neighbours(key.argsort()))
            else:
                unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
                similarity = unit @ unit.T
                similarity.fill_diagonal_(-float("inf"))
                k = min(self.k, layer.n - 1)
                self.structure.append(similarity.topk(k, dim=1).indices if k > 0 else None)

    def apply(self, layers: list[NeuronLayer]) -> None:
        """``G <- G + gamma J G`` on every neuron layer's ``.grad``, in place.

        ``J`` acts along the neuron dimension, so the weight rows and the bias are rotated
        separately (no concatenated copy of the gradient).
        """
        ring = self.graph != "knn"
        for layer, neighbours in zip(layers, self.structure, strict=True):
            if neighbours is None:
                continue
            for param in layer.params:
                if param.grad is None:
                    continue
                rows = param.grad.view(layer.n, -1)
                rows.add_(skew_apply(rows, neighbours, ring), alpha=self.gamma)
