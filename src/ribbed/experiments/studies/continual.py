"""The ``plasticity`` study: the continual-learning benchmark as a preset with a report.

Every method learns the same stream with the same seeds (seed ``s`` fixes both the stream and
the model's initialisation), online, each example once. The report gives per-task curves of
the online metric, of the fraction of dead units and of the last hidden layer's effective
rank, and the headline table: the mean online metric over the last 10% of tasks per method,
with a 95% Student-t interval over seeds and Welch's test against the baseline, plus the
pairwise tests between all methods. The published shape to compare with (Dohare et al. 2024,
"Loss of plasticity in deep continual learning", Nature 632, 768-774): plain backprop loses
plasticity at every step size they tried; its online performance on later tasks falls below
that of early tasks while dead units grow and the effective rank falls; continual backprop,
and to a lesser degree L2 and Shrink & Perturb, keep it.

Fair tuning: every method has one learning rate in the preset; with ``tune: true`` each is
replaced by the best of the same grid (``lr_grid``, scored by the headline metric on a
tuning seed that is not one of the reported seeds, ``tune_seed``), and the report says for
each method whether its best lr is interior to the grid. A method whose optimiser is neither a
registered name nor an import path is refused before anything runs.

Presets: ``plasticity-regression`` (slowly-changing regression, minutes) and
``plasticity-permuted`` (online permuted MNIST on the bundled 5,000 digits).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ribbed import stats
from ribbed.continual.metrics import early_fraction_mean
from ribbed.continual.runner import Method, OnlineRun, run_online, tune_lr
from ribbed.data.continual import STREAMS, build_stream
from ribbed.experiments.studies import FigureSpec, StudyContext, StudyResult, Table, register_study
from ribbed.optim import OPTIMIZERS
from ribbed.report.plots import method_colors

__all__ = ["plasticity"]

METHOD_KEYS = ("optimizer", "lr", "options")
PUBLISHED = ("Published shape (Dohare et al. 2024, Nature): plain backprop loses plasticity at every step "
             "size tried: online performance on later tasks falls below that on early tasks, while dead "
             "units grow and the effective rank falls; continual backprop keeps it.")


def _methods(methods: Mapping[str, Any]) -> list[Method]:
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(f"options.methods: got {methods!r}; allowed: a mapping name -> "
                         f"{{{', '.join(METHOD_KEYS)}}}")
    parsed = []
    for name, spec in methods.items():
        where = f"options.methods.{name}"
        if not isinstance(spec, Mapping) or "optimizer" not in spec or "lr" not in spec:
            raise ValueError(f"{where}: got {spec!r}; allowed: a mapping with optimizer and lr (and options)")
        unknown = sorted(set(spec) - set(METHOD_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(METHOD_KEYS)}")
        lr = spec["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"{where}.lr: got {lr!r}; allowed: a number > 0")
        parsed.append(Method(str(name), str(spec["optimizer"]), float(lr), dict(spec.get("options") or {})))
    return parsed


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1:
        return list(range(seeds))
    if isinstance(seeds, Sequence) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds):
        return list(seeds)
    raise ValueError(f"options.seeds: got {seeds!r}; allowed: a count >= 1 or a list of seeds >= 0")


@register_study("plasticity", "continual learning: online metric per task, dead units and effective rank, "
                "headline mean over the last 10% of tasks (Dohare et al. 2024)")
def plasticity(
    context: StudyContext,
    stream: str,
    methods: Mapping[str, Any],
    stream_options: Mapping[str, Any] | None = None,
    tasks: int = 50,
    hidden: Sequence[int] = (5,),
    batch_size: int = 1,
    probe: int = 500,
    seeds: int | Sequence[int] = 3,
    baseline: str = "adamw",
    last_fraction: float = 0.1,
    tune: bool = False,
    lr_grid: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    tune_seed: int = 1000,
) -> StudyResult:
    """Run every method on ``stream`` with every seed; tune each method's lr first if ``tune``.

    Args:
        context: the study's context (records, progress).
        stream: ``regression`` or ``permuted`` (``ribbed.data.continual``).
        methods: ``name -> {optimizer, lr, options}``; ``optimizer`` a registered name.
        stream_options: the stream's options (period, source, ...).
        tasks: tasks per run.
        hidden: hidden layer widths of the ReLU MLP.
        batch_size: examples per update.
        probe: examples at the end of each task for dead units and effective rank.
        seeds: a count (seeds 0..n-1) or a list; seed ``s`` fixes the stream and the init.
        baseline: the method every other is tested against.
        last_fraction: the fraction of final tasks the headline averages.
        tune: replace every lr by the best of ``lr_grid`` on ``tune_seed`` first.
        lr_grid: the learning rates every method is tuned over (same grid, same budget).
        tune_seed: the seed of the tuning runs (keep it out of ``seeds``).
    """
    if stream not in STREAMS:
        raise ValueError(f"options.stream: got {stream!r}; allowed: {', '.join(STREAMS)}")
    stream_options = dict(stream_options or {})
    seed_list = _seeds(seeds)
    if tune and tune_seed in seed_list:
        raise ValueError(f"options.tune_seed: got {tune_seed}, one of the reported seeds {seed_list}; "
                         "allowed: a seed outside them")
    available = _methods(methods)
    for method in available:
        if method.optimizer not in OPTIMIZERS and "." not in method.optimizer:
            raise ValueError(f"options.methods.{method.name}.optimizer: got {method.optimizer!r}; allowed: a "
                             f"registered optimiser ({', '.join(OPTIMIZERS.names())}) or an import path")
    if baseline not in [m.name for m in available]:
        raise ValueError(f"options.baseline: got {baseline!r}; allowed: one of the methods "
                         f"{[m.name for m in available]}")
    streams = {seed: build_stream(stream, seed=seed, **stream_options) for seed in seed_list}
    kind = streams[seed_list[0]].kind
    mode = "min" if kind == "regression" else "max"
    metric = "online squared error" if kind == "regression" else "online accuracy"
    settings: dict[str, Any] = {"tasks": tasks, "hidden": list(hidden), "batch_size": batch_size, "probe": probe}

    tuning: dict[str, dict[str, Any]] = {}
    if tune:
        tuning_stream = build_stream(stream, seed=tune_seed, **stream_options)
        for method in context.steps(available, label="tuning (lr grid)"):
            context.message(f"tuning {method.name} over {len(lr_grid)} learning rates")

            def trial(lr: float, m: Method = method) -> OnlineRun:
                return run_online(tuning_stream, Method(m.name, m.optimizer, lr, m.options), seed=tune_seed, **settings)

            tuning[method.name] = tune_lr(trial, lr_grid, mode=mode, fraction=last_fraction)
        available = [Method(m.name, m.optimizer, tuning[m.name]["best_lr"], m.options) for m in available]

    runs: list[OnlineRun] = []
    jobs = [(method, seed) for method in available for seed in seed_list]
    for method, seed in context.steps(jobs, label=f"{len(available)} methods x {len(seed_list)} seeds"):
        runs.append(run_online(streams[seed], method, seed=seed, **settings))
        context.message(f"{method.name} seed {seed}: {metric} last {last_fraction:.0%} of tasks = "
                        f"{_show(runs[-1].headline(last_fraction))} ({runs[-1].seconds:.0f} s)")

    rows = _aggregate(runs, baseline, mode, last_fraction)
    tables = [_headline_table(rows, runs, available, metric, last_fraction),
              _pairwise_table(runs, [m.name for m in available], last_fraction)]
    if tune:
        tables.append(_tuning_table(tuning, lr_grid))
    return StudyResult(
        tables=tables,
        figures=_figures(runs, [m.name for m in available], metric, mode, last_fraction),
        findings=_findings(rows, runs, baseline, mode, metric, last_fraction, tune, tuning),
        data={"stream": stream, "stream_options": stream_options, "settings": settings, "metric": metric,
              "mode": mode, "seeds": seed_list, "methods": [_method_dict(m) for m in available],
              "tuning": tuning, "aggregates": rows,
              "runs": [run.as_dict() for run in runs]},
    )


def _method_dict(method: Method) -> dict[str, Any]:
    return {"name": method.name, "optimizer": method.optimizer, "lr": method.lr,
            "options": json.loads(json.dumps(dict(method.options), default=str))}


def _show(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.4g}"


def _aggregate(runs: list[OnlineRun], baseline: str, mode: str, fraction: float) -> list[dict[str, Any]]:
    entries = [{"id": f"{r.method}-{r.seed}", "method": r.method, "dataset": "stream", "status": r.status,
                "final": {"headline": r.headline(fraction)} if r.status == "completed" else {}}
               for r in runs]
    return stats.aggregate(entries, baseline=baseline, metric="headline", mode=mode)


def _final_mean(runs: Sequence[OnlineRun], attribute: str) -> float | None:
    values = [getattr(r, attribute)[-1] for r in runs if r.status == "completed" and getattr(r, attribute)]
    return float(np.mean(values)) if values else None


def _headline_table(rows, runs, methods, metric, fraction) -> Table:
    lrs = {m.name: m.lr for m in methods}
    body = []
    for row in rows:
        mine = [r for r in runs if r.method == row["method"]]
        done = [r for r in mine if r.status == "completed"]
        early = float(np.mean([early_fraction_mean(r.online, fraction) for r in done])) if done else None
        body.append([
            row["method"], lrs[row["method"]], f"{row['n']}/{len(mine)}", row["mean"], row["ci_low"],
            row["ci_high"], early, _final_mean(mine, "dead"), _final_mean(mine, "rank"),
            "-" if row["p_value"] is None else row["p_value"], row["verdict"],
            float(np.mean([r.seconds for r in mine])) if mine else None,
        ])
    return Table(
        f"Headline: {metric}, mean over the last {fraction:.0%} of tasks",
        ["method", "lr", "completed", "mean", "95% CI low", "95% CI high",
         f"early (tasks {fraction:.0%}-{2 * fraction:.0%})", "dead units (last task)", "effective rank (last task)",
         "p vs baseline (Welch)", "verdict", "seconds per run"],
        body,
        note="Mean and Student-t 95% interval over seeds; diverged runs are counted, never averaged. "
             "'early' is the same metric over the second tenth of tasks (after the from-scratch start): "
             "a headline worse than it is lost plasticity.",
    )


def _pairwise_table(runs: list[OnlineRun], names: list[str], fraction: float) -> Table:
    values = {n: [h for r in runs if r.method == n and (h := r.headline(fraction)) is not None]  # None: diverged
              for n in names}
    body = [[a, *["-" if a == b else _none_if_nan(stats.welch_test(values[a], values[b])) for b in names]]
            for a in names]
    return Table("Pairwise Welch tests of the headline metric (p-values)", ["method", *names], body,
                 note="Two-sided Welch t-test over seeds between each pair of methods.")


def _none_if_nan(value: float) -> float | str:
    return "n/a" if math.isnan(value) else value


def _tuning_table(tuning: Mapping[str, Mapping[str, Any]], grid: Sequence[float]) -> Table:
    grid = sorted(grid)
    body = [[name, *t["scores"], t["best_lr"], "yes" if t["interior"] else "no (edge of grid)"]
            for name, t in tuning.items()]
    return Table("Tuning: headline metric per learning rate (tuning seed)",
                 ["method", *[f"lr {lr:g}" for lr in grid], "best lr", "interior"], body,
                 note="Every method was scored on the same grid with one run each on the tuning seed; "
                      "an optimum at the edge of the grid may lie outside it.")


def _curve_panel(ax, runs, names, colors, attribute: str) -> None:
    for name in names:
        curves = [getattr(r, attribute) for r in runs if r.method == name and r.status == "completed"]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        data = np.asarray([c[:length] for c in curves])
        tasks = np.arange(1, length + 1)
        ax.plot(tasks, data.mean(0), color=colors[name], linewidth=1.6, label=name)
        if len(curves) > 1:
            ax.fill_between(tasks, data.min(0), data.max(0), color=colors[name], alpha=0.15, linewidth=0)
    ax.set_xlabel("task")
    ax.grid(alpha=0.3)


def _figures(runs: list[OnlineRun], names: list[str], metric: str, mode: str,
             fraction: float) -> list[FigureSpec]:
    colors = method_colors(names)
    specs = []
    for attribute, title, caption in (
        ("online", metric, f"{metric} per task (each example predicted before it is learned)"),
        ("dead", "dead hidden units (fraction)", "fraction of hidden ReLU units that are zero on every "
                                                "example of the task's last probe chunk"),
        ("rank", "effective rank, last hidden layer", "effective rank of the last hidden layer's "
                                                      "representation on the task's last probe chunk"),
    ):
        fig = Figure(figsize=(7.5, 4.0), layout="constrained")
        ax = fig.add_subplot()
        _curve_panel(ax, runs, names, colors, attribute)
        ax.set_ylabel(title)
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", ncol=2)
        specs.append(FigureSpec(attribute, fig, f"{caption}. Line: mean over seeds; band: min-max."))
    fig = Figure(figsize=(max(5.0, 1.1 * len(names) + 2.0), 3.8), layout="constrained")
    ax = fig.add_subplot()
    for x, name in enumerate(names):
        values = [h for r in runs if r.method == name and (h := r.headline(fraction)) is not None]  # None: diverged
        if not values:
            continue
        mean, low, high = stats.mean_ci(values)
        ax.scatter(np.full(len(values), x) + np.linspace(-0.12, 0.12, len(values)), values, s=14,
                   color=colors[name], alpha=0.5)
        ax.errorbar(x, mean, yerr=0 if math.isnan(low) else high - mean, fmt="o", capsize=5,
                    color=colors[name])
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0)
    ax.set_ylabel(f"{metric}, last {fraction:.0%} of tasks")
    ax.set_title("headline" + (" (lower is better)" if mode == "min" else " (higher is better)"))
    ax.grid(axis="y", alpha=0.3)
    specs.append(FigureSpec("headline", fig, "Headline metric per method: mean with 95% interval over "
                                             "seeds; dots: individual seeds."))
    return specs


def _findings(rows, runs, baseline, mode, metric, fraction, tune, tuning) -> list[str]:
    findings = [PUBLISHED]
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    base = [r for r in runs if r.method == baseline and r.status == "completed"]
    if base:
        early_values = [early_fraction_mean(r.online, fraction) for r in base]
        last_values = [r.headline(fraction) for r in base]
        early, last = float(np.mean(early_values)), float(np.mean(last_values))
        # a loss of plasticity is claimed only when the drop is significant over the seeds
        p_value = stats.welch_test(early_values, last_values) if len(base) > 1 else math.nan
        verdict = ("plasticity is lost on this stream, as published" if better(early, last) and p_value < 0.05
                   else "no significant loss of plasticity at this size and horizon" if len(base) > 1
                   else "one seed, so no test of a loss of plasticity")
        findings.append(
            f"{baseline}: {metric} {early:.4g} early (tasks {fraction:.0%}-{2 * fraction:.0%}) and {last:.4g} "
            f"over the last {fraction:.0%} of tasks (Welch p = {p_value:.3g} over {len(base)} seeds): {verdict}.")
    ranked = [r for r in rows if r["mean"] is not None]
    if ranked:
        best = max(ranked, key=lambda r: r["mean"]) if mode == "max" else min(ranked, key=lambda r: r["mean"])
        findings.append(f"Best headline: {best['method']} ({best['mean']:.4g}).")
    for row in rows:
        if row["verdict"] in ("better", "worse"):
            findings.append(f"{row['method']} is significantly {row['verdict']} than {baseline} "
                            f"(p = {row['p_value']:.3g}).")
    quiet = [r["method"] for r in rows if r["verdict"] == "no significant difference"]
    if quiet:
        findings.append(f"No significant difference from {baseline}: {', '.join(quiet)}.")
    diverged = sorted({r.method for r in runs if r.status == "diverged"})
    if diverged:
        findings.append(f"Diverged runs (counted, not averaged): {', '.join(diverged)}.")
    if tune:
        edge = [name for name, t in tuning.items() if not t["interior"]]
        findings.append("Tuned on one lr grid for every method; best lr at the edge of the grid for: "
                        + (", ".join(edge) if edge else "none") + ".")
    else:
        findings.append("Learning rates are the preset's (see its comments for how they were chosen); "
                        "rerun with --set options.tune=true for the equal-budget grid pass.")
    return findings
