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
  in that order, cyclically. Since ``next`` and ``prev`` are permutations, ``J G`` is two
  row scatter-adds (``index_add_``) of one copy of ``G`` straight into ``G``: one temporary
  and eight passes over the gradient instead of two gathered temporaries and ten (on the
  1.86M-parameter MLP of ``benchmarks/ribbed_overhead.py`` this took RIBBED's step from
  1.34x to 1.16x AdamW's);
* ``knn``: ``A`` links each neuron to its ``k`` most similar neurons (cosine similarity of
  weight rows); applied with a gather and a scatter-add.
* ``random``: a ring over a random order: the topology-free control.

``gamma = 0`` leaves the gradient untouched (the term is skipped entirely).

**Handedness per layer.** ``signs`` holds one ``±1`` per neuron layer; layer ``l`` gets
``G <- G + s_l gamma J G``. All ``+1`` (the default) is the single-handed term, bit for bit
(``gamma * 1`` is ``gamma``); ``s_l = -1`` flips that layer's handedness only. Since each
``s_l gamma J`` is still skew-symmetric, ``gᵀ(s_l gamma J)g = 0`` holds for every sign vector.
The signs are what :func:`ribbed.core.evolution.evolve_chirality` evolves: which way to turn
is a per-layer choice that no gradient informs (``J`` leaves the first-order loss change
unchanged), so it is settled by selection on the loss after a trial step.
"""

from __future__ import annotations

import torch

from ribbed.checks import check_integer
from ribbed.core.layers import NeuronLayer

__all__ = ["CHIRAL_GRAPHS", "ChiralTerm", "add_skew_", "check_signs", "skew_apply"]

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


def add_skew_(target: torch.Tensor, rows: torch.Tensor, neighbours: torch.Tensor, ring: bool,
              alpha: float) -> torch.Tensor:
    """``target += alpha J @ rows`` in place (neurons along dim 0; ``target`` is not ``rows``).

    For a ring, ``neighbours[:, 0]``/``[:, 1]`` are each neuron's successor/predecessor and
    ``(J G)_i = G_next(i) - G_prev(i)``; as both are permutations, row ``j`` of ``G`` is added to
    its predecessor's row and subtracted from its successor's: two ``index_add_``. For a
    k-nearest-neighbour graph, ``(A G)_i`` sums the rows of ``i``'s neighbours (a gather) and
    ``A^T G`` scatters each row to them.
    """
    if ring:
        target.index_add_(0, neighbours[:, 1], rows, alpha=alpha)
        return target.index_add_(0, neighbours[:, 0], rows, alpha=-alpha)
    k = neighbours.shape[1]
    target.add_(rows[neighbours].sum(1), alpha=alpha)
    return target.index_add_(0, neighbours.reshape(-1), rows.repeat_interleave(k, 0), alpha=-alpha)


def skew_apply(rows: torch.Tensor, neighbours: torch.Tensor, ring: bool) -> torch.Tensor:
    """``J @ rows`` for ``J = A - A^T`` (see :func:`add_skew_`)."""
    return add_skew_(torch.zeros_like(rows), rows, neighbours, ring, 1.0)


def check_signs(signs: torch.Tensor, n_layers: int | None = None) -> torch.Tensor:
    """``signs`` as a CPU ``int8`` vector after checking it is 1-D, all ``±1`` and (if given)
    ``n_layers`` long; a ``ValueError`` names the field, the value and what is allowed."""
    signs = torch.as_tensor(signs)
    length = "" if n_layers is None else f", {n_layers} entries (one per neuron layer)"
    if signs.dim() != 1 or not bool(((signs == 1) | (signs == -1)).all()) or (
            n_layers is not None and len(signs) != n_layers):
        raise ValueError(f"chiral signs: got {signs.tolist()!r}; allowed: a 1-D tensor of +1/-1{length}")
    return signs.to("cpu", torch.int8)


def check_chiral_options(graph: str, neighbours: int) -> None:
    """Errors name the field, the value and what is allowed."""
    if graph not in CHIRAL_GRAPHS:
        raise ValueError(f"chiral_graph: got {graph!r}; allowed: {', '.join(CHIRAL_GRAPHS)}")
    check_integer("chiral_neighbours", neighbours)


class ChiralTerm:
    """Adds ``s_l gamma J G`` to every neuron layer's gradient (see the module docstring).

    Args:
        gamma: strength; its sign is the handedness of every layer whose sign is ``+1``.
        graph: ``ring``, ``knn`` or ``random``.
        neighbours: ``k`` of the ``knn`` graph.
        signs: ``±1`` per neuron layer (default: all ``+1``, set at the first :meth:`refresh`).
    """

    def __init__(self, gamma: float, graph: str = "ring", neighbours: int = 4,
                 signs: torch.Tensor | None = None):
        check_chiral_options(graph, neighbours)
        self.gamma, self.graph, self.k = gamma, graph, neighbours
        self.structure: list[torch.Tensor | None] = []
        self.signs: torch.Tensor | None = None if signs is None else check_signs(signs)
        self.last: dict[str, float] = {}  # telemetry of the last sign selection

    def refresh(self, layers: list[NeuronLayer], generator: torch.Generator,
                assignment: torch.Tensor | None = None) -> None:
        """Rebuild each layer's graph from its current weights (and controller groups); the
        first call also sets the default signs (all ``+1``) or checks the given ones' length."""
        self.signs = (torch.ones(len(layers), dtype=torch.int8) if self.signs is None
                      else check_signs(self.signs, len(layers)))
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
        """``G <- G + s_l gamma J G`` on every neuron layer's ``.grad``, in place.

        ``J`` acts along the neuron dimension, so the weight rows and the bias are rotated
        separately (no concatenated copy of the gradient); one copy of each keeps the rows read
        apart from the rows written. The signs are read as Python integers, so ``gamma * 1`` is
        exactly ``gamma`` (the default is the single-handed term bit for bit).
        """
        assert self.signs is not None, "refresh() sets the signs first"
        ring = self.graph != "knn"
        for layer, neighbours, sign in zip(layers, self.structure, self.signs.tolist(), strict=True):
            if neighbours is None:
                continue
            for param in layer.params:
                if param.grad is None:
                    continue
                rows = param.grad.view(layer.n, -1)
                add_skew_(rows, rows.clone(), neighbours, ring, self.gamma * sign)
