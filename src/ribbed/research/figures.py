"""Figures of loss-landscape slices and Hessian spectra (matplotlib object API, no pyplot).

Each function takes results keyed by a label (an optimiser, a model) and returns a
:class:`matplotlib.figure.Figure`, ready for a study's ``FigureSpec`` or ``savefig``. A label
keeps the same colour in every figure (``ribbed.report.plots.method_colors``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ribbed.report.plots import method_colors
from ribbed.research.landscape import Slice1D, Slice2D

__all__ = ["contours_figure", "eigenvalue_history_figure", "slices_figure", "spectrum_figure"]


def _eigenvalue_scale(ax: Axes, values: np.ndarray) -> None:
    """A log axis for positive eigenvalues; symmetric log (linear near zero) when some are not."""
    if (values > 0).all():
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=max(float(np.abs(values[values != 0]).min(initial=1.0)), 1e-3))


def slices_figure(curves: Mapping[str, Slice1D], *, title: str, xlabel: str) -> Figure:
    """Loss (left, log scale) and accuracy (right) along a 1-D slice, one line per label."""
    colors = method_colors(list(curves))
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for label, curve in curves.items():
        loss_ax.plot(curve.alphas, curve.loss, color=colors[label], label=label)
        acc_ax.plot(curve.alphas, curve.acc, color=colors[label], label=label)
    loss_ax.set_yscale("log")
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel(xlabel)
        ax.set_title(f"{title}: {name}")
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    return fig


def contours_figure(surfaces: Mapping[str, Slice2D], *, levels: int = 20) -> Figure:
    """Filled contours of log10(loss) on each 2-D slice, on shared levels so panels compare."""
    logs = {label: np.log10(s.loss.numpy()) for label, s in surfaces.items()}
    low = min(float(v.min()) for v in logs.values())
    high = max(float(v.max()) for v in logs.values())
    shared = np.linspace(low, high if high > low else low + 1.0, levels)
    fig = Figure(figsize=(4.2 * len(surfaces) + 0.8, 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(surfaces)))
    filled = None
    for ax, (label, s) in zip(axes, surfaces.items(), strict=True):
        filled = ax.contourf(s.alphas.numpy(), s.betas.numpy(), logs[label].T, levels=shared, cmap="viridis")
        ax.contour(s.alphas.numpy(), s.betas.numpy(), logs[label].T, levels=shared[::3], colors="white",
                   linewidths=0.5, alpha=0.6)
        ax.plot([0], [0], marker="*", color="red", markersize=9)
        ax.set_title(label)
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("β (direction 2)")
        ax.set_aspect("equal")
    assert filled is not None  # one panel per surface, and there is at least one
    fig.colorbar(filled, ax=list(axes), label="log10 loss")
    return fig


def eigenvalue_history_figure(histories: Mapping[str, Sequence[Mapping[str, Sequence[float]]]]) -> Figure:
    """Top Hessian eigenvalue against step: mean over seeds, band from min to max.

    ``histories[label]`` is one ``{"step": [...], "eig": [...]}`` per seed, on the same steps.
    """
    colors = method_colors(list(histories))
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for label, runs in histories.items():
        steps = np.asarray(runs[0]["step"])
        values = np.asarray([run["eig"] for run in runs], dtype=float)
        ax.plot(steps, values.mean(0), color=colors[label], label=label, marker="o", markersize=3)
        ax.fill_between(steps, values.min(0), values.max(0), color=colors[label], alpha=0.18, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel("top Hessian eigenvalue")
    _eigenvalue_scale(ax, np.concatenate([np.ravel([run["eig"] for run in runs]) for runs in histories.values()]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def spectrum_figure(spectra: Mapping[str, np.ndarray]) -> Figure:
    """The top-k Hessian eigenvalues of each label's final models: one dot per seed and index,
    the line joins the means over seeds. ``spectra[label]`` has shape ``[seeds, k]``."""
    colors = method_colors(list(spectra))
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for offset, (label, values) in enumerate(spectra.items()):
        values = np.atleast_2d(values)
        index = np.arange(1, values.shape[1] + 1) + 0.08 * (offset - (len(spectra) - 1) / 2)
        for seed_values in values:
            ax.scatter(index, seed_values, color=colors[label], s=14, alpha=0.5)
        ax.plot(index, values.mean(0), color=colors[label], label=label, marker="o")
    ax.set_xlabel("eigenvalue index (1 = largest)")
    ax.set_ylabel("eigenvalue")
    ax.set_xticks(range(1, max(np.atleast_2d(v).shape[1] for v in spectra.values()) + 1))
    _eigenvalue_scale(ax, np.concatenate([np.ravel(v) for v in spectra.values()]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
