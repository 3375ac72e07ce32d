"""Report figures rendered to PNG bytes with matplotlib's object API.

Figures are built from :class:`matplotlib.figure.Figure` directly, never through
``pyplot``: no global figure registry, no backend switch, nothing to close, and safe
to call from any thread or a headless machine. Each plot function takes the runs of
one dataset grouped by method (see :func:`ribbed.stats.group_runs`) and
returns a :class:`Plot`, or ``None`` when there is nothing to draw.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ribbed.report.metrics import is_internal
from ribbed.stats import mean_ci

DPI = 100
NOT_CURVES = ("step", "time", "lr")
MethodRuns = Mapping[str, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Plot:
    """One rendered figure: a caption, alt text for screen readers, and PNG bytes."""

    caption: str
    alt: str
    png: bytes


def method_colors(methods: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per method, so a method looks the same in every figure: ``tab10`` for up
    to ten methods, ``tab20`` (distinct up to twenty) beyond."""
    colormap = cast(ListedColormap, colormaps["tab10" if len(methods) <= 10 else "tab20"])  # both are listed
    palette = cast(Sequence[Any], colormap.colors)  # their colours: a tuple of RGB tuples
    return {method: palette[i % len(palette)] for i, method in enumerate(methods)}


def curves_plot(dataset: str, by_method: MethodRuns, colors: Mapping[str, Any],
                internal: bool = False) -> Plot | None:
    """Curves against step, one panel per logged metric: the training curves (``internal``
    False) or the methods' internals (True; see :mod:`ribbed.report.metrics`).

    Each line is the mean over the completed runs of a method at each logged step and
    the band spans their minimum to maximum; a method evaluated once is a marker, not an
    invisible one-point line. Diverged runs are left out of the curves (their values would
    swamp the scale) and marked by a dotted vertical line at the step where they diverged.
    """
    keys = [key for key in _curve_keys(by_method) if is_internal(key) == internal]
    if not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.3 * ncols, 3.2 * nrows), layout="constrained")
    for index, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        for method, runs in by_method.items():
            draw_curve(ax, key, runs, colors[method], _label(method))
        ax.set_title(_label(key))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.endswith("loss") and _spans_decades(ax):
            ax.set_yscale("log")
    if fig.axes[0].get_legend_handles_labels()[0]:
        fig.axes[0].legend(fontsize="small")
    what = "internal metrics of the methods" if internal else "metrics"
    return Plot(
        caption=f"{dataset}: {what} over training steps. Line: mean over completed seeds; "
        "band: min–max; dotted line: a run diverged there.",
        alt=f"Curves of {', '.join(keys)} against step on {dataset}, one line per method.",
        png=_png(fig),
    )


def final_metric_plot(
    dataset: str, by_method: MethodRuns, colors: Mapping[str, Any], metric: str, baseline: str
) -> Plot | None:
    """Final primary metric per method: mean with 95% CI bars, one dot per seed.

    A dashed line marks the baseline's mean so a method that does not move the metric
    is visible as such. Methods without a completed run are labelled, not dropped.
    """
    if not by_method:
        return None
    methods = list(by_method)
    fig = Figure(figsize=(max(4.5, 1.3 * len(methods) + 2.0), 3.6), layout="constrained")
    ax = fig.add_subplot()
    for x, method in enumerate(methods):
        values = [float(r["final"][metric]) for r in by_method[method] if r["status"] == "completed"]
        if not values:
            ax.annotate("no completed run", (x, 0.5), xycoords=("data", "axes fraction"),
                        ha="center", color="0.4", fontsize="small")
            continue
        mean, low, high = mean_ci(values)
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
        ax.scatter(x + np.asarray(jitter), values, s=14, color=colors[method], alpha=0.45)
        ax.errorbar(x, mean, yerr=_half_width(mean, low, high), fmt="o", markersize=7,
                    capsize=5, color=colors[method])
        if method == baseline:
            ax.axhline(mean, color="0.5", linestyle="--", linewidth=1, label=f"{_label(baseline)} mean")
    ax.set_xticks(range(len(methods)), [_label(m) for m in methods],
                  rotation=20 if len(methods) > 3 else 0)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel(_label(metric))
    ax.set_title(f"final {_label(metric)}")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return Plot(
        caption=f"{dataset}: final {metric}. Point: mean over completed seeds; bars: 95% "
        "Student-t interval; dots: individual seeds; dashed line: baseline mean.",
        alt=f"Final {metric} on {dataset} for each method with confidence intervals.",
        png=_png(fig),
    )


def steps_to_target_plot(
    dataset: str, by_method: MethodRuns, colors: Mapping[str, Any], target: Mapping[str, Any]
) -> Plot | None:
    """Training steps to reach the target: mean bar with 95% CI over the runs that reached
    it, the fraction that reached it in the bar, and ``not reached`` where no run of a method
    got there. Steps, not seconds: seconds of runs executed one after another depend on what
    else the machine was doing at the time (per-step time, measured within each run, is in
    the results table)."""
    if not by_method:
        return None
    methods = list(by_method)
    fig = Figure(figsize=(max(4.5, 1.3 * len(methods) + 2.0), 3.6), layout="constrained")
    ax = fig.add_subplot()
    for x, method in enumerate(methods):
        runs = by_method[method]
        reached = [r["steps_to_target"] for r in runs
                   if r["status"] == "completed" and r.get("steps_to_target") is not None]
        if not reached:
            ax.annotate(f"not reached\n(0/{len(runs)})", (x, 0.04), xycoords=("data", "axes fraction"),
                        ha="center", va="bottom", color="0.35", fontsize="small")
            continue
        mean, low, high = mean_ci(reached)
        bar = ax.bar(x, mean, width=0.6, color=colors[method], alpha=0.85,
                     yerr=_half_width(mean, low, high), capsize=5)
        ax.bar_label(bar, labels=[f"{len(reached)}/{len(runs)}"], label_type="center",
                     color="white", fontweight="bold", fontsize="small")
    relation = "≥" if target["mode"] == "max" else "≤"
    ax.set_xticks(range(len(methods)), [_label(m) for m in methods],
                  rotation=20 if len(methods) > 3 else 0)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylim(bottom=0)
    ax.margins(y=0.15)
    ax.set_ylabel("training steps")
    ax.set_title(f"steps to {_label(target['metric'])} {relation} {target['value']:g}")
    ax.grid(axis="y", alpha=0.3)
    return Plot(
        caption=f"{dataset}: training steps to reach {target['metric']} {relation} {target['value']:g} "
        "(measured at evaluations). Bar: mean over runs that reached it; error bar: 95% interval; "
        "in the bar: runs that reached it.",
        alt=f"Bar chart of steps to target on {dataset} per method.",
        png=_png(fig),
    )


def _curve_keys(by_method: MethodRuns) -> list[str]:
    """Numeric history keys of completed runs: validation first, then training, then others."""
    keys: dict[str, None] = {}
    for runs in by_method.values():
        for run in runs:
            if run["status"] != "completed":
                continue
            for entry in run.get("history") or []:
                keys.update({k: None for k, v in entry.items()
                             if k not in NOT_CURVES and _is_number(v)})
    return sorted(keys, key=lambda k: (not k.startswith("val_"), not k.startswith("train_")))


def draw_curve(ax: Axes, key: str, runs: Sequence[Mapping[str, Any]], color: Any, label: str) -> None:
    """Mean line and min–max band of ``key`` over completed runs, plus divergence markers."""
    by_step: dict[float, list[float]] = {}
    diverged_label = f"{label} diverged"
    for run in runs:
        if run["status"] == "diverged" and run.get("diverged_at") is not None:
            ax.axvline(run["diverged_at"], color=color, linestyle=":", linewidth=1.2, label=diverged_label)
            diverged_label = "_nolegend_"
        if run["status"] != "completed":
            continue
        for entry in run.get("history") or []:
            value = entry.get(key)
            if _is_number(value) and math.isfinite(value):
                by_step.setdefault(entry["step"], []).append(float(value))
    if not by_step:
        return
    steps = sorted(by_step)
    ax.plot(steps, [np.mean(by_step[s]) for s in steps], color=color, linewidth=1.8, label=label,
            marker="o" if len(steps) == 1 else None)
    ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                    color=color, alpha=0.18, linewidth=0)


def _spans_decades(ax: Axes) -> bool:
    """Whether the curves in ``ax`` are positive and span more than a factor of 30, the
    point where a log scale shows late training better than a linear one."""
    low, high = ax.dataLim.intervaly
    return bool(0 < low < high and high / low > 30)


def _half_width(mean: float, low: float, high: float) -> float:
    """Error-bar half-width; zero where the interval is undefined (a single run)."""
    return 0.0 if math.isnan(low) else high - mean


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _label(text: str) -> str:
    """Text safe for matplotlib: no mathtext from ``$``, and a leading ``_`` (which
    matplotlib reads as 'hide from legend') kept visible."""
    text = str(text).replace("$", r"\$")
    return f" {text}" if text.startswith("_") else text


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()
