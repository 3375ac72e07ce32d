"""Information density of neurons: how much, and how sparsely, each neuron carries information.

Per neuron (all neurons of a layer at once, on the ``[samples, n_neurons]`` matrix of its
outputs, batch and spatial/time positions as samples):

* **binned entropy** ``H(A)`` of its outputs (:func:`ribbed.core.layers.binned_entropy`);
* **binned mutual information with the label** ``I(A;Y) = H(A) - H(A|Y)``
  (:func:`binned_mutual_information`), from one joint ``[n, bins, classes]`` histogram counted
  with a single ``scatter_add`` on offset cell indices;
* **Hoyer sparsity** ``(sqrt(S) - ||a||_1/||a||_2) / (sqrt(S) - 1)`` of its ``S`` outputs
  (Hoyer 2004, "Non-negative matrix factorization with sparseness constraints", JMLR):
  1 for a one-hot vector, 0 for a constant one (:func:`hoyer_sparsity`);

and per layer the **effective rank** ``exp(H(p))``, ``p = sigma / ||sigma||_1`` the normalised
singular values of the output matrix (Roy & Vetterli 2007, "The effective rank: a measure of
effective dimensionality", EUSIPCO): ``n`` for an identity, 1 for a rank-1 matrix
(:func:`effective_rank`).

Bias of the histogram estimate. The plug-in MI of a finite sample is biased upwards: for
independent ``A`` and ``Y``, ``2 S I_plugin`` is asymptotically chi-squared with
``(m_A - 1)(m_Y - 1)`` degrees of freedom (the G-test), so ``E[I_plugin] ~ (m_A-1)(m_Y-1)/(2S)``
with ``m`` the occupied cells. We apply the Miller-Madow correction (Miller 1955; Paninski
2003, "Estimation of entropy and mutual information", Neural Computation), which adds
``(m - 1)/(2S)`` to every plug-in entropy; for ``I = H(A) + H(Y) - H(A,Y)`` it subtracts
``(m_AY - m_A - m_Y + 1)/(2S)``, removing that first-order bias. The corrected estimate may be
slightly negative for an uninformative neuron; it is reported as is (clamping would put the
bias back into averages).

Labels reach RIBBED through :meth:`ribbed.RIBBED.observe_labels` (called before ``step()``),
which the ``information-density`` training plug-in does for every measured step; with any
other optimiser the same plug-in measures the model itself and adds the values to the
metrics rows, so baselines are measured the same way.

Why our own code: scikit-learn's ``mutual_info_score`` and SciPy's ``entropy`` take one pair of
variables at a time on NumPy arrays, without bias correction; here every neuron of a layer is
one batched histogram on the training device, taken inside the step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ribbed.checks import check_integer
from ribbed.core.layers import (
    IndexedHook,
    NeuronLayer,
    bin_indices,
    binned_entropy,
    entropy_of_counts,
    offset_counts,
)

__all__ = [
    "CORRECTIONS",
    "InformationDensity",
    "check_density_options",
    "binned_mutual_information",
    "effective_rank",
    "hoyer_sparsity",
    "singular_values",
]

CORRECTIONS = ("miller-madow", "none")
VALUE_NAMES = ("entropy", "hoyer", "mutual_information", "effective_rank")


def check_density_options(bins: Any, max_samples: Any, correction: Any) -> None:
    """Raise a ValueError naming the first bad density option."""
    check_integer("bins", bins)
    check_integer("max_samples", max_samples)
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: got {correction!r}; allowed: {', '.join(CORRECTIONS)}")


def _check_samples(samples: torch.Tensor, minimum: int = 1) -> None:
    if samples.dim() != 2 or samples.shape[0] < minimum:
        raise ValueError(f"samples: got shape {tuple(samples.shape)}; allowed: [samples >= {minimum}, neurons]")


def binned_mutual_information(samples: torch.Tensor, labels: torch.Tensor, bins: int, *,
                              num_classes: int | None = None,
                              correction: str = "miller-madow") -> torch.Tensor:
    """``I(A_j; Y)`` in nats for every column ``A_j`` of ``samples [S, n]`` and labels ``[S]``.

    Each column is binned like :func:`~ribbed.core.layers.binned_entropy` (``bins`` equal bins
    between its min and max); ``I = H(A) - H(A|Y)`` from the joint histogram, with the
    Miller-Madow bias correction unless ``correction="none"`` (see the module docstring).
    """
    _check_samples(samples)
    check_integer("bins", bins)
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: got {correction!r}; allowed: {', '.join(CORRECTIONS)}")
    if labels.shape != samples.shape[:1] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: got shape {tuple(labels.shape)} dtype {labels.dtype}; allowed: integer "
                         f"class labels of shape [{samples.shape[0]}]")
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(f"labels: values in [{int(labels.min())}, {int(labels.max())}]; "
                         f"allowed: [0, {classes})")
    size, n = samples.shape
    cells = bin_indices(samples, bins) * classes + labels.to(samples.device).long()[:, None]
    dtype = torch.promote_types(samples.dtype, torch.float32)
    joint = offset_counts(cells, bins * classes, dtype).view(n, bins, classes)
    marginal, per_class = joint.sum(2), joint.sum(1)
    conditional = (per_class / size * entropy_of_counts(joint.transpose(1, 2))).sum(1)
    information = entropy_of_counts(marginal) - conditional
    if correction == "miller-madow":
        occupied = ((joint > 0).sum((1, 2)) - (marginal > 0).sum(1) - (per_class > 0).sum(1) + 1)
        information = information - occupied.to(information.dtype) / (2 * size)
    return information


def hoyer_sparsity(samples: torch.Tensor) -> torch.Tensor:
    """Hoyer sparsity ``[n]`` of each column of ``samples [S, n]`` (``S >= 2``), in ``[0, 1]``.

    An all-zero column (a dead ReLU) counts as maximally sparse, 1.
    """
    _check_samples(samples, minimum=2)
    root = math.sqrt(samples.shape[0])
    l1, l2 = samples.abs().sum(0), torch.linalg.vector_norm(samples, dim=0)
    ratio = l1 / l2.clamp_min(torch.finfo(samples.dtype).tiny)
    return torch.where(l2 > 0, (root - ratio) / (root - 1), 1.0).clamp(0, 1)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of ``matrix [..., S, n]`` from the eigenvalues of its smaller Gram matrix
    (``sigma^2 = eig(M M^T)`` or ``eig(M^T M)``): for a layer's ``[batch, width]`` outputs this is
    a ``min(S, n)``-sized symmetric eigenproblem instead of an SVD, several times faster.
    Eigenvalues below the numerical-rank threshold ``max(S, n) * eps * lambda_max`` count as 0
    (they are rounding noise of the Gram product)."""
    gram = matrix @ matrix.mT if matrix.shape[-2] <= matrix.shape[-1] else matrix.mT @ matrix
    eigenvalues = torch.linalg.eigvalsh(gram)
    floor = max(matrix.shape[-2:]) * torch.finfo(matrix.dtype).eps * eigenvalues.amax(-1, keepdim=True)
    return torch.where(eigenvalues > floor, eigenvalues, 0.0).sqrt()


def effective_rank(matrix: torch.Tensor) -> torch.Tensor:
    """Effective rank of ``matrix [..., S, n]`` (batched over leading dimensions); 0 for a
    zero matrix."""
    sigma = singular_values(matrix)
    total = sigma.sum(-1, keepdim=True)
    p = sigma / total.clamp_min(torch.finfo(sigma.dtype).tiny)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(sigma.dtype).tiny))).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), 0.0)


class InformationDensity:
    """Measures the information density of ``layers`` from their outputs on armed steps.

    A forward hook per layer keeps (detached) the first ``max_samples`` rows of the layer's
    output while :attr:`recording` is on and the module is training. :meth:`measure` turns what
    was kept into per-neuron entropy, Hoyer sparsity and, when labels were given with
    :meth:`observe_labels`, mutual information, plus each layer's effective rank, then forgets
    the outputs. Rows of a layer are matched to labels in order: a layer with ``R`` output rows
    per labelled item (conv positions, several micro-batches concatenated) repeats each label
    ``R`` times.

    Args:
        layers: the neuron layers (``ribbed.core.layers.find_neuron_layers``).
        bins: histogram bins per neuron.
        max_samples: output rows kept per layer and step (bounds the measuring cost).
        correction: ``miller-madow`` or ``none`` (the mutual-information bias correction).
    """

    def __init__(self, layers: Sequence[NeuronLayer], *, bins: int = 16, max_samples: int = 4096,
                 correction: str = "miller-madow"):
        check_density_options(bins, max_samples, correction)
        self.bins, self.max_samples = bins, max_samples
        self.layers, self.correction = list(layers), correction
        self.recording = False
        self.measurements = 0
        self.values: dict[str, torch.Tensor] = {}
        self._kept: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._rows = [0] * len(self.layers)
        self._labels: torch.Tensor | None = None
        self._handles = [layer.module.register_forward_hook(IndexedHook(self, "_keep", i))
                         for i, layer in enumerate(self.layers)]

    def _keep(self, index: int, module: nn.Module, inputs, output: torch.Tensor) -> None:
        """Forward hook of layer ``index``: keep (a sample of) its outputs while recording."""
        if not self.recording or not module.training:
            return
        rows = self.layers[index].stats.samples(output)
        room = self.max_samples - sum(len(part) for part in self._kept[index])
        if room > 0:  # a copy: a later in-place op (ReLU(inplace=True)) must not change it
            self._kept[index].append(rows[:room].to(torch.float32, copy=True))
        self._rows[index] += len(rows)

    def arm(self, on: bool) -> None:
        """Keep outputs of the coming forward passes (``on``) or not."""
        self.recording = on

    def observe_labels(self, labels: torch.Tensor) -> None:
        """Labels of the batch whose outputs are being kept (used by the next :meth:`measure`)."""
        self._labels = labels.detach()

    @torch.no_grad()
    def measure(self) -> bool:
        """Compute :attr:`values` from the kept outputs; ``False`` if nothing was kept."""
        if not any(self._kept):
            self._labels = None
            return False
        columns: dict[str, list[torch.Tensor]] = {name: [] for name in VALUE_NAMES}
        for layer, kept, rows in zip(self.layers, self._kept, self._rows, strict=True):
            samples = torch.cat(kept) if kept else None
            for name, value in self._layer_values(layer, samples, rows).items():
                columns[name].append(value)
        self.values = {name: torch.cat(parts) if name != "effective_rank" else torch.stack(parts)
                       for name, parts in columns.items()}
        if self.values["mutual_information"].isnan().all():
            del self.values["mutual_information"]
        self._kept = [[] for _ in self.layers]
        self._rows = [0] * len(self.layers)
        self._labels = None
        self.measurements += 1
        return True

    def _layer_values(self, layer: NeuronLayer, samples: torch.Tensor | None, rows: int) -> dict[str, torch.Tensor]:
        """One layer's values; NaN for what its kept outputs cannot give (a layer that did not
        run, a single row, labels that do not match its rows)."""
        missing = torch.full((layer.n,), torch.nan, device=layer.weight.device)
        if samples is None or len(samples) < 2:
            return {"entropy": missing, "hoyer": missing, "mutual_information": missing,
                    "effective_rank": missing[0]}
        labels = self._row_labels(rows, len(samples))
        information = (missing if labels is None else
                       binned_mutual_information(samples, labels, self.bins, correction=self.correction))
        return {"entropy": binned_entropy(samples, self.bins), "hoyer": hoyer_sparsity(samples),
                "mutual_information": information, "effective_rank": effective_rank(samples.double()).float()}

    def _row_labels(self, rows: int, kept: int) -> torch.Tensor | None:
        """The label of each kept row, or ``None`` without labels or when rows do not match them."""
        if self._labels is None or self._labels.numel() == 0 or rows == 0 or rows % self._labels.numel():
            return None
        flat = self._labels.reshape(-1)
        return flat.repeat_interleave(rows // flat.numel())[:kept]

    def layer_slices(self) -> dict[str, slice]:
        """Each layer's range in the per-neuron value vectors."""
        return {layer.name: slice(layer.offset - self.layers[0].offset,
                                  layer.offset - self.layers[0].offset + layer.n) for layer in self.layers}

    def telemetry(self) -> dict[str, float]:
        """Means over neurons (``density_entropy``, ``density_hoyer``, ``density_mutual_information``)
        and each layer's ``density_effective_rank.<layer>``, from the last measurement."""
        if not self.values:
            return {}
        row = {f"density_{name}": float(self.values[name].nanmean())
               for name in ("entropy", "hoyer", "mutual_information") if name in self.values}
        for layer, rank in zip(self.layers, self.values["effective_rank"].tolist(), strict=True):
            row[f"density_effective_rank.{layer.name}"] = rank
        return row

    def reward_loss(self, multiplier: torch.Tensor) -> torch.Tensor:
        """Controller reward as a loss: ``-mean(z_i log m_i)``, ``z_i`` the neuron's mutual
        information standardised over neurons (entropy when no labels were seen).

        Minimising it raises the step multipliers of the neurons that carry the most
        information about the label (the features being learnt) and lowers those of the
        least informative, relative to the network. Neurons without a value (NaN) get
        ``z = 0``; the loss is zero before the first measurement.
        """
        score = self.values.get("mutual_information", self.values.get("entropy"))
        if score is None or (known := score[~score.isnan()]).numel() < 2:
            return multiplier.sum() * 0
        z = ((score - known.mean()) / known.std().clamp_min(1e-8)).nan_to_num(0.0)
        return -(z.to(multiplier) * multiplier.log()).mean()

    def state_dict(self) -> dict[str, Any]:
        return {"recording": self.recording, "measurements": self.measurements,
                "values": {name: value.clone() for name, value in self.values.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recording, self.measurements = state["recording"], state["measurements"]
        self.values = {name: value.clone() for name, value in state["values"].items()}

    def remove(self) -> None:
        """Detach the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
