"""Plain-text formatting of summary numbers, shared by the HTML and Markdown reports.

Every function returns unescaped text; the renderer escapes it for its format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MISSING = "—"


def number(x: float | int | None, digits: int = 4) -> str:
    """``x`` with ``digits`` significant figures; ``—`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return str(x) if isinstance(x, int) else f"{x:.{digits}g}"


def estimate(mean: float | None, low: float | None, high: float | None) -> str:
    """``mean ± half-width`` of a symmetric interval, or the mean alone when undefined."""
    if mean is None:
        return MISSING
    if low is None or high is None:
        return f"{number(mean)} (no CI)"
    return f"{number(mean)} ± {number((high - low) / 2, 2)}"


def p_value(p: float | None) -> str:
    """Table form of a p-value: two significant figures, ``<0.001`` below that."""
    if p is None:
        return MISSING
    return "<0.001" if p < 0.001 else f"{p:.2g}"


def p_clause(p: float | None) -> str:
    """Prose form of a p-value: ``p=0.41``, ``p<0.001`` or ``no test possible``."""
    if p is None:
        return "no test possible"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def steps(x: float | None, low: float | None = None, high: float | None = None) -> str:
    """A (mean) step count as a whole number, ``± half-width`` when an interval is given."""
    if x is None:
        return MISSING
    if low is None or high is None:
        return str(round(x))
    return f"{round(x)} ± {round((high - low) / 2)}"


def seconds(x: float | None) -> str:
    """Seconds with one decimal, e.g. ``12.3 s``."""
    return MISSING if x is None else f"{x:.1f} s"


def milliseconds(x: float | None) -> str:
    """A duration in milliseconds, three significant figures, e.g. ``2.51 ms``."""
    return MISSING if x is None else f"{x:.3g} ms"


def run_status(run: Mapping[str, Any]) -> str:
    """A run's status, naming the step of divergence when known."""
    if run["status"] == "diverged" and run.get("diverged_at") is not None:
        return f"diverged at step {run['diverged_at']}"
    return str(run["status"])


def dataset_spec(summary: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """``metric``, ``mode`` and ``target`` on ``dataset``: a comparison's datasets may each
    have their own (``summary["datasets"]``), else the summary's primary metric and target."""
    own = (summary.get("datasets") or {}).get(dataset) or {}
    primary = summary["primary_metric"]
    return {"metric": own.get("metric", primary["name"]), "mode": own.get("mode", primary["mode"]),
            "target": own["target"] if "target" in own else summary.get("target")}


def _per_dataset(summary: Mapping[str, Any], describe) -> str | None:
    """``describe(spec)`` if it reads the same on every dataset, else ``None``."""
    texts = {describe(dataset_spec(summary, dataset)) for dataset in summary.get("datasets") or [""]}
    return texts.pop() if len(texts) == 1 else None


def _grouped(summary: Mapping[str, Any], describe) -> str:
    """``describe(spec)`` once, or per group of datasets where they differ: ``a on d1, d2; b on d3``."""
    same = _per_dataset(summary, describe)
    if same is not None:
        return same
    groups: dict[str, list[str]] = {}
    for dataset in summary["datasets"]:
        groups.setdefault(describe(dataset_spec(summary, dataset)), []).append(dataset)
    return "; ".join(f"{text} on {', '.join(datasets)}" for text, datasets in groups.items())


def target(summary: Mapping[str, Any], dataset: str | None = None) -> str:
    """The comparison target as ``val_acc ≥ 0.9``, or ``none``; with ``dataset``, that
    dataset's; without, every dataset's where they differ."""
    if dataset is not None:
        return _target_text(dataset_spec(summary, dataset))
    return _grouped(summary, _target_text)


def _target_text(spec: Mapping[str, Any]) -> str:
    target = spec["target"]
    if not target:
        return "none"
    relation = "≥" if target["mode"] == "max" else "≤"
    return f"{target['metric']} {relation} {number(target['value'])}"


def primary_metric(summary: Mapping[str, Any]) -> str:
    """The primary metric and its direction, e.g. ``test_acc (higher is better)``, per group of
    datasets where they differ."""
    return _grouped(summary, lambda spec: f"{spec['metric']} ({direction(spec['mode'])})")


def metric_name(summary: Mapping[str, Any]) -> str | None:
    """The primary metric's name if every dataset shares it, else ``None`` (say it per row)."""
    return _per_dataset(summary, lambda spec: spec["metric"])


def direction(mode: str) -> str:
    """Which way a metric improves, in words."""
    return "higher is better" if mode == "max" else "lower is better"


def mapping(values: Mapping[str, Any]) -> str:
    """A flat ``key = value`` line per entry; nested values inline."""
    return "\n".join(f"{key} = {number(value)}" for key, value in values.items())


def compare_line(row: Mapping[str, Any], baseline: str, baseline_mean: float | None = None) -> str:
    """A plain sentence for one aggregate row against the baseline, whatever its verdict.

    Example: ``sgd on mnist1d/cnn1d: 0.9631, −0.0049 against adamw, no significant difference
    (p=0.41)``.
    """
    verdict = row["verdict"]
    where = f"{row['method']} on {row['dataset']}"
    if verdict == "baseline":
        sentence = f"{where}: {number(row['mean'])}, the baseline"
    elif row["mean"] is None or verdict == "insufficient data":
        sentence = f"{where}: too few completed runs to compare with {baseline} (n={row['n']} completed)"
    else:
        difference = ""
        if baseline_mean is not None:
            delta = row["mean"] - baseline_mean
            difference = f", {'+' if delta >= 0 else '−'}{number(abs(delta), 2)}"
        judged = (f"{verdict} than {baseline}" if verdict in ("better", "worse")
                  else f"no significant difference from {baseline}")
        sentence = (f"{where}: {number(row['mean'])}{difference} against {baseline}, "
                    f"{judged} ({p_clause(row['p_value'])})")
    if row.get("n_diverged"):
        sentence += f"; {row['n_diverged']} run(s) diverged"
    return sentence
