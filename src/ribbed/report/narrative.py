"""The few sentences at the top of a report: who won on what, by how much, at which learning
rate, how fast, and what the methods' internals did.

Every number comes from the summary (aggregates, runs and their histories, the methods'
hyperparameters); nothing is judged that the statistics did not test, so "better" only
appears with a significant Welch test. Sentences are plain text; the renderers escape them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ribbed.report import formatting as fmt
from ribbed.report.metrics import describe, is_internal
from ribbed.stats import group_runs, step_time_ms

__all__ = ["final_internals", "learning_rate", "narrative"]

RIBBED_KEYS = ("ribbed_multiplier_mean", "ribbed_multiplier_std", "ribbed_near_bound")
HD_KEYS = ("hd_lr_mean", "hd_lr_min", "hd_lr_max")


def narrative(summary: Mapping[str, Any]) -> list[str]:
    """Sentences summarising a comparison (empty for a summary without aggregates)."""
    rows = summary.get("aggregates") or []
    if not rows:
        return []
    baseline = summary["baseline"]
    grouped = group_runs(summary["runs"], baseline)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    sentences = []
    for dataset in datasets:
        where = f"On {dataset}, " if len(datasets) > 1 else ""
        dataset_rows = [row for row in rows if row["dataset"] == dataset]
        sentences.append(_winner(summary, dataset, dataset_rows, where))
        sentences += [s for s in (_speed(summary, dataset, dataset_rows, where),
                                  _step_time(grouped.get(dataset, {}), baseline, where)) if s]
    methods = list(dict.fromkeys(run["method"] for run in summary["runs"]))
    for method in methods:
        runs = [run for run in summary["runs"] if run["method"] == method]
        sentence = _internals(method, runs)
        if sentence:
            sentences.append(sentence)
    return sentences


def learning_rate(summary: Mapping[str, Any], method: str, dataset: str) -> float | None:
    """The learning rate ``method`` used on ``dataset``: a comparison records one per dataset
    (tuned or from the preset), a run or ``ribbed compare`` its optimiser's."""
    spec = ((summary.get("methods") or {}).get(method) or {}).get("hyperparameters") or {}
    if isinstance(spec.get(dataset), Mapping):
        spec = spec[dataset]
    lr = spec.get("lr")
    return lr if isinstance(lr, (int, float)) else None


def final_internals(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each internal metric's value at the last evaluation, mean over the completed runs."""
    values: dict[str, list[float]] = {}
    for run in runs:
        history = run.get("history") or []
        if run["status"] != "completed" or not history:
            continue
        for key, value in history[-1].items():
            if is_internal(key) and key not in ("step", "time", "lr") and _finite(value):
                values.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in values.items()}


def _winner(summary: Mapping[str, Any], dataset: str, rows: Sequence[Mapping[str, Any]], where: str) -> str:
    spec = fmt.dataset_spec(summary, dataset)
    metric, mode = spec["metric"], spec["mode"]
    baseline = summary["baseline"]
    done = [row for row in rows if row["mean"] is not None]
    if not done:
        return _start(where, "no method completed a run.")
    ranked = sorted(done, key=lambda row: row["mean"], reverse=mode == "max")
    best = ranked[0]
    base = next((row for row in done if row["verdict"] == "baseline"), None)
    text = (f"{where}{best['method']} had the best {metric}, {fmt.number(best['mean'])} "
            f"(mean of {best['n']} run{'s' if best['n'] != 1 else ''}{_lr_clause(summary, best['method'], dataset)})")
    if base is None:
        return text + f"; the baseline {baseline} has no completed run to compare with."
    if best is base:
        if len(ranked) == 1:
            return text + "."
        runner = ranked[1]
        return (text + f"; the baseline leads the next best, {runner['method']} "
                f"({fmt.number(runner['mean'])}{_lr_clause(summary, runner['method'], dataset)}), "
                f"by {fmt.number(abs(base['mean'] - runner['mean']), 2)}: {_verdict(runner)}.")
    return (text + f", {_signed(best['mean'] - base['mean'])} against the baseline {baseline} "
            f"({fmt.number(base['mean'])}{_lr_clause(summary, baseline, dataset)}): {_verdict(best)}.")


def _speed(summary: Mapping[str, Any], dataset: str, rows: Sequence[Mapping[str, Any]], where: str) -> str | None:
    if not fmt.dataset_spec(summary, dataset)["target"]:
        return None
    reached = [row for row in rows if row.get("steps_to_target_mean") is not None]
    missed = [row["method"] for row in rows if row.get("steps_to_target_mean") is None]
    if not reached:
        return _start(where, f"no method reached {fmt.target(summary, dataset)}.")
    reached.sort(key=lambda row: row["steps_to_target_mean"])
    parts = ", ".join(f"{row['method']} {fmt.steps(row['steps_to_target_mean'])} ({row['reached_target']} runs)"
                      for row in reached)
    text = _start(where, f"steps to {fmt.target(summary, dataset)}, the primary speed figure: {parts}")
    return text + (f"; not reached by {', '.join(missed)}." if missed else ".")


def _step_time(by_method: Mapping[str, Sequence[Mapping[str, Any]]], baseline: str, where: str) -> str | None:
    times = {method: ms for method, runs in by_method.items() if (ms := step_time_ms(runs)) is not None}
    if not times:
        return None
    base = times.get(baseline)
    parts = ", ".join(f"{method} {ms:.2f} ms" + (f" ({ms / base:.2f}x)" if base and method != baseline else "")
                      for method, ms in times.items())
    return _start(where, f"training time per step, measured within each run (evaluation excluded): {parts}.")


def _internals(method: str, runs: Sequence[Mapping[str, Any]]) -> str | None:
    """What a method's own mechanism did, from its internal metrics over training."""
    final = final_internals(runs)
    if not final:
        return None
    if all(key in final for key in HD_KEYS):
        widest = _hd_spread(runs)
        if widest is None:
            return None
        text = (f"Inside {method}: the per-neuron learning rates stayed within ±{100 * widest[0]:.2g}% of "
                f"their mean throughout training (widest at step {widest[1]})")
        return text + (", so neurons barely differ and its result is set by its base learning rate."
                       if widest[0] < 0.05 else ".")
    if all(key in final for key in RIBBED_KEYS):
        peak = _peak(runs, "ribbed_multiplier_std")
        text = (f"Inside {method}: step multipliers ended at a mean of {final['ribbed_multiplier_mean']:.3g} "
                f"with a spread of {final['ribbed_multiplier_std']:.2g} across neurons")
        if peak is not None and peak[0] > final["ribbed_multiplier_std"]:
            text += f" (widest: {peak[0]:.2g} at step {peak[1]})"
        return text + f"; {100 * final['ribbed_near_bound']:.3g}% of neurons were near a multiplier bound."
    shown = [key for key in final if not describe(key).startswith("logged by")][:3]
    if not shown:
        return None
    return (f"Inside {method}, at the last evaluation: "
            + "; ".join(f"{key} = {fmt.number(final[key])} ({describe(key)})" for key in shown) + ".")


def _hd_spread(runs: Sequence[Mapping[str, Any]]) -> tuple[float, int] | None:
    """The widest relative spread of Adam-HD's per-neuron rates, ``(max - min) / (2 mean)``,
    over the completed runs' evaluations (the rates follow the schedule to 0 at the end, so
    the last evaluation alone says nothing), and its step."""
    widest = None
    for run in runs:
        if run["status"] != "completed":
            continue
        for row in run.get("history") or []:
            if all(_finite(row.get(key)) for key in HD_KEYS) and row["hd_lr_mean"] > 0:
                spread = (row["hd_lr_max"] - row["hd_lr_min"]) / (2 * row["hd_lr_mean"])
                if widest is None or spread > widest[0]:
                    widest = (spread, row["step"])
    return widest


def _peak(runs: Sequence[Mapping[str, Any]], key: str) -> tuple[float, int] | None:
    """The largest value of ``key`` over the completed runs' histories, and its step."""
    best = None
    for run in runs:
        if run["status"] != "completed":
            continue
        for row in run.get("history") or []:
            value = row.get(key)
            if _finite(value) and (best is None or value > best[0]):
                best = (float(value), row["step"])
    return best


def _lr_clause(summary: Mapping[str, Any], method: str, dataset: str) -> str:
    lr = learning_rate(summary, method, dataset)
    return "" if lr is None else f", lr {fmt.number(lr, 3)}"


def _verdict(row: Mapping[str, Any]) -> str:
    verdict = row["verdict"]
    if verdict in ("better", "worse"):
        return f"significantly {verdict} ({fmt.p_clause(row['p_value'])}, Welch's t-test)"
    if verdict == "no significant difference":
        return f"not a significant difference ({fmt.p_clause(row['p_value'])})"
    return f"too few completed runs to test (n={row['n']})"


def _start(where: str, text: str) -> str:
    """``text`` after ``On dataset, ``, or as a sentence of its own (capitalised)."""
    return f"{where}{text}" if where else text[0].upper() + text[1:]


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "−") + fmt.number(abs(x), 2)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
