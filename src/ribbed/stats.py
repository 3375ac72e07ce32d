"""Statistics for a fair comparison of methods over seeds.

A comparison runs every method on every dataset with several seeds. This module turns
those runs into one row per (method, dataset): the mean of the primary metric with a
Student-t confidence interval, how often and how fast the target was reached, and a
two-sided Welch t-test against a named baseline, so that a method which does not help
is reported as such.

Example:
    >>> mean, low, high = mean_ci([0.91, 0.93, 0.92])
    >>> round(mean, 2), low < mean < high
    (0.92, True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

Run = Mapping[str, Any]

MODES = ("max", "min")
STATUSES = ("completed", "diverged", "failed")
VERDICTS = ("baseline", "better", "worse", "no significant difference", "insufficient data")


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the mean.

    The interval is ``mean ± t_{(1+c)/2, n-1} · s / sqrt(n)`` with ``s`` the sample
    standard deviation (``ddof=1``).

    Args:
        values: at least one number, e.g. a metric over seeds.
        confidence: coverage of the interval, in (0, 1).

    Returns:
        ``(mean, low, high)``. With a single value the interval is undefined and the
        bounds are ``nan`` (not ``(v, v)``, which would claim certainty). Nothing is
        dropped: a ``nan`` in the input gives ``nan`` everywhere, an infinite value an
        infinite mean and ``nan`` bounds.

    Raises:
        ValueError: no values, or ``confidence`` outside (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if x.size == 1 or not np.isfinite(x).all():
        return mean, math.nan, math.nan
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    half_width = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, x.size - 1)) * sem
    return mean, mean - half_width, mean + half_width


def welch_test(a: Iterable[float], b: Iterable[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) between two samples.

    Args:
        a, b: the two samples, e.g. a metric over seeds for two methods.

    Returns:
        The p-value of :func:`scipy.stats.ttest_ind` with ``equal_var=False``, or
        ``nan`` when either sample has fewer than two values or contains a non-finite
        value (no test is possible). When both samples are constant the t statistic is
        0/0 or ±inf and scipy answers ``nan``; we return the limit instead: ``1.0`` for
        the same constant (no evidence of a difference) and ``0.0`` for different
        constants (as seen in deterministic runs; with few seeds this is a statement
        about the sample, not proof of a general effect).
    """
    x = np.asarray(list(a), dtype=float)
    y = np.asarray(list(b), dtype=float)
    if x.size < 2 or y.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return 1.0 if x[0] == y[0] else 0.0
    return float(scipy_stats.ttest_ind(x, y, equal_var=False).pvalue)


def group_runs(runs: Sequence[Run], baseline: str | None) -> dict[str, dict[str, list[Run]]]:
    """Group runs as ``{dataset: {method: [runs]}}`` in report order.

    Datasets keep their first-seen order; within a dataset the baseline comes first,
    then the other methods in first-seen order. Reports use the same order everywhere.
    """
    grouped: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        grouped.setdefault(run["dataset"], {}).setdefault(run["method"], []).append(run)
    return {
        dataset: dict(sorted(methods.items(), key=lambda item: item[0] != baseline))
        for dataset, methods in grouped.items()
    }


def aggregate(
    runs: Sequence[Run], *, baseline: str, metric: str, mode: str, alpha: float = 0.05
) -> list[dict[str, Any]]:
    """One summary row per (method, dataset), each compared with the baseline.

    Only completed runs enter the mean, interval and test. Diverged and failed runs are
    counted (``n_diverged``, ``n_failed``) but never averaged in, and never count as
    having reached the target, so ``reached_target`` is ``"reached/all runs"``.

    Args:
        runs: run records with ``method``, ``dataset``, ``status`` (one of
            :data:`STATUSES`), ``final`` (metric name -> value) and optionally
            ``steps_to_target`` / ``seconds_to_target`` (``None`` if not reached).
        baseline: method every other method is tested against, per dataset.
        metric: key of ``final`` to compare, e.g. ``"test_acc"``.
        mode: ``"max"`` if higher is better, ``"min"`` if lower is better.
        alpha: significance level of the Welch test.

    Returns:
        Rows in :func:`group_runs` order with keys ``method, dataset, n, n_diverged,
        n_failed, metric, mean, ci_low, ci_high, std, steps_to_target_mean (and its 95% interval
        over the runs that reached the target, steps_to_target_ci_low / _high),
        seconds_to_target_mean, reached_target, p_value, verdict``. Undefined numbers
        are ``None`` so rows serialise to strict JSON. ``verdict`` (one of
        :data:`VERDICTS`) is ``"baseline"``,
        ``"better"`` / ``"worse"`` (only when ``p_value < alpha``, direction by
        ``mode``), ``"no significant difference"``, or ``"insufficient data"`` when no
        test is possible (fewer than two completed runs on a side, or no baseline runs
        on that dataset).

    Raises:
        ValueError: bad ``mode``/``alpha``, unknown status, a completed run without the
            metric, or a baseline that appears in no run.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    grouped = group_runs(runs, baseline)
    if not any(baseline in methods for methods in grouped.values()):
        raise ValueError(f"baseline {baseline!r} has no runs")
    rows = []
    for dataset, methods in grouped.items():
        baseline_values = _completed_values(methods.get(baseline, []), metric)
        for method, method_runs in methods.items():
            values = _completed_values(method_runs, metric)
            rows.append({
                "method": method,
                "dataset": dataset,
                **_describe(method_runs, values, metric),
                **_compare(method == baseline, values, baseline_values, mode, alpha),
            })
    return rows


def _completed_values(runs: Sequence[Run], metric: str) -> list[float]:
    """The metric of every completed run; a completed run must report it."""
    values = []
    for run in runs:
        if run["status"] not in STATUSES:
            raise ValueError(f"run {run.get('id')!r}: status must be one of {STATUSES}, got {run['status']!r}")
        if run["status"] != "completed":
            continue
        if metric not in run.get("final", {}):
            raise ValueError(f"completed run {run.get('id')!r} has no final metric {metric!r}")
        values.append(float(run["final"][metric]))
    return values


def _describe(runs: Sequence[Run], values: list[float], metric: str) -> dict[str, Any]:
    """Counts, mean, interval and time-to-target of one method on one dataset."""
    mean, low, high = mean_ci(values) if values else (math.nan,) * 3
    reached = [r for r in runs if r["status"] == "completed" and r.get("steps_to_target") is not None]
    seconds = [r["seconds_to_target"] for r in reached if r.get("seconds_to_target") is not None]
    _, steps_low, steps_high = mean_ci([r["steps_to_target"] for r in reached]) if reached else (math.nan,) * 3
    return {
        "n": len(values),
        "n_diverged": sum(r["status"] == "diverged" for r in runs),
        "n_failed": sum(r["status"] == "failed" for r in runs),
        "metric": metric,
        "mean": _finite_or_none(mean),
        "ci_low": _finite_or_none(low),
        "ci_high": _finite_or_none(high),
        "std": _sample_std(values),
        "steps_to_target_mean": _mean_or_none([r["steps_to_target"] for r in reached]),
        "steps_to_target_ci_low": _finite_or_none(steps_low),
        "steps_to_target_ci_high": _finite_or_none(steps_high),
        "seconds_to_target_mean": _mean_or_none(seconds),
        "reached_target": f"{len(reached)}/{len(runs)}",
    }


def _compare(
    is_baseline: bool, values: list[float], baseline_values: list[float], mode: str, alpha: float
) -> dict[str, Any]:
    """p-value and verdict of one method's completed values against the baseline's."""
    if is_baseline:
        return {"p_value": None, "verdict": "baseline"}
    p_value = welch_test(values, baseline_values)
    if math.isnan(p_value):
        return {"p_value": None, "verdict": "insufficient data"}
    if p_value >= alpha:
        return {"p_value": p_value, "verdict": "no significant difference"}
    higher = float(np.mean(values)) > float(np.mean(baseline_values))
    return {"p_value": p_value, "verdict": "better" if higher == (mode == "max") else "worse"}


def _sample_std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof=1); None when undefined or not finite."""
    if len(values) < 2 or not np.isfinite(values).all():
        return None
    return float(np.std(values, ddof=1))


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def step_time_ms(runs: Sequence[Run]) -> float | None:
    """Mean training time per step in milliseconds over the completed runs, each measured
    within its own run (``train_seconds / steps``; evaluation excluded). Unlike seconds to
    target, which add up wall-clock time of runs executed one after another, it does not
    depend on which run happened to share the machine with a busy neighbour."""
    times = [1000.0 * r["train_seconds"] / r["steps"] for r in runs
             if r["status"] == "completed" and r.get("train_seconds") is not None and r.get("steps")]
    return _mean_or_none(times)
