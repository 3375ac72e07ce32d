"""Confidence intervals, Welch's test and the per-(method, dataset) aggregate rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ribbed.stats import aggregate, mean_ci, welch_test

BASE = [0.50, 0.51, 0.49]
HIGHER = [0.70, 0.71, 0.69]
LOWER = [0.30, 0.31, 0.29]
NOISY_SAME = [0.50, 0.53, 0.47]


def test_mean_ci_matches_hand_computation():
    values = [1.0, 2.0, 3.0, 4.0]
    half = scipy_stats.t.ppf(0.975, df=3) * math.sqrt(5 / 3) / math.sqrt(4)
    assert mean_ci(values) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    half_90 = scipy_stats.t.ppf(0.95, df=3) * math.sqrt(5 / 3) / 2
    assert mean_ci(values, confidence=0.9)[2] == pytest.approx(2.5 + half_90)


def test_mean_ci_contains_mean_and_shrinks_with_more_samples():
    widths = []
    for repeats in (1, 2, 8):
        mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0] * repeats)
        assert low < mean < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


@pytest.mark.parametrize(
    "values, expected",
    [([0.7], (0.7, math.nan, math.nan)),
     ([0.5, 0.5], (0.5, 0.5, 0.5)),
     ([0.5, math.nan], (math.nan, math.nan, math.nan))],
    ids=["single value: no interval", "constant: zero width", "nan propagates"],
)
def test_mean_ci_edge_cases(values, expected):
    assert mean_ci(values) == pytest.approx(expected, nan_ok=True)


@pytest.mark.parametrize("values, confidence", [([], 0.95), ([1.0, 2.0], 1.0), ([1.0, 2.0], 0.0)])
def test_mean_ci_rejects_bad_input(values, confidence):
    with pytest.raises(ValueError):
        mean_ci(values, confidence)


@pytest.mark.parametrize("a, b", [(BASE, HIGHER), (BASE, NOISY_SAME), ([1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 9.0])])
def test_welch_test_matches_scipy(a, b):
    assert welch_test(a, b) == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)


def test_welch_test_separates_clearly_different_samples():
    rng = np.random.default_rng(0)
    assert welch_test(rng.normal(0, 1, 20), rng.normal(3, 1, 20)) < 1e-6
    assert welch_test(BASE, NOISY_SAME) > 0.5


@pytest.mark.parametrize(
    "a, b, expected",
    [([1.0], [1.0, 2.0], math.nan), ([1.0, math.nan], [1.0, 2.0], math.nan),
     ([0.9, 0.9], [0.9, 0.9, 0.9], 1.0), ([0.9, 0.9], [0.8, 0.8], 0.0)],
    ids=["too few values", "nan input", "same constant", "different constants"],
)
def test_welch_test_edge_cases(a, b, expected):
    assert welch_test(a, b) == pytest.approx(expected, nan_ok=True)


def _runs(method: str, values: list[float], dataset: str = "d1", steps: list | None = None) -> list[dict]:
    steps = steps or [None] * len(values)
    return [
        {"id": f"{method}-{seed}", "method": method, "dataset": dataset, "seed": seed,
         "status": "completed", "final": {"acc": value},
         "steps_to_target": step, "seconds_to_target": None if step is None else step / 100}
        for seed, (value, step) in enumerate(zip(values, steps, strict=True))
    ]


def _diverged(method: str, dataset: str = "d1") -> dict:
    return {"id": f"{method}-div", "method": method, "dataset": dataset, "seed": 9, "status": "diverged",
            "final": {"acc": math.nan}, "steps_to_target": 50, "diverged_at": 120}


@pytest.mark.parametrize(
    "mode, expected",
    [("max", {"base": "baseline", "higher": "better", "lower": "worse", "same": "no significant difference"}),
     ("min", {"base": "baseline", "higher": "worse", "lower": "better", "same": "no significant difference"})],
)
def test_aggregate_verdicts_follow_mode(mode, expected):
    runs = _runs("higher", HIGHER) + _runs("base", BASE) + _runs("lower", LOWER) + _runs("same", NOISY_SAME)
    rows = aggregate(runs, baseline="base", metric="acc", mode=mode)
    assert {row["method"]: row["verdict"] for row in rows} == expected
    p_values = {row["method"]: row["p_value"] for row in rows}
    assert p_values["base"] is None
    assert p_values["higher"] == pytest.approx(welch_test(HIGHER, BASE))


def test_aggregate_counts_diverged_runs_without_averaging_them():
    runs = _runs("base", BASE, steps=[100, 300, None]) + [_diverged("base")]
    (row,) = aggregate(runs, baseline="base", metric="acc", mode="max")
    mean, low, high = mean_ci(BASE)
    assert (row["n"], row["n_diverged"], row["n_failed"]) == (3, 1, 0)
    assert (row["mean"], row["ci_low"], row["ci_high"]) == pytest.approx((mean, low, high))
    assert row["std"] == pytest.approx(np.std(BASE, ddof=1))
    assert row["reached_target"] == "2/4"
    assert row["steps_to_target_mean"] == pytest.approx(200)
    # two runs reached it (100, 300): mean ± t_{0.975, 1} * s / sqrt(2) with s = 141.4
    half = scipy_stats.t.ppf(0.975, 1) * np.std([100, 300], ddof=1) / np.sqrt(2)
    assert (row["steps_to_target_ci_low"], row["steps_to_target_ci_high"]) == pytest.approx((200 - half, 200 + half))
    assert row["seconds_to_target_mean"] == pytest.approx(2.0)
    json.dumps(row, allow_nan=False)


def test_aggregate_orders_datasets_as_seen_and_baseline_first():
    runs = (_runs("other", HIGHER, "d2") + _runs("third", LOWER, "d1") + _runs("base", BASE, "d2")
            + _runs("base", BASE, "d1") + _runs("other", HIGHER, "d1"))
    rows = aggregate(runs, baseline="base", metric="acc", mode="max")
    assert [(r["dataset"], r["method"]) for r in rows] == [
        ("d2", "base"), ("d2", "other"), ("d1", "base"), ("d1", "third"), ("d1", "other")]


def test_aggregate_without_enough_runs_says_so():
    runs = _runs("base", BASE) + _runs("once", [0.9]) + [_diverged("gone")]
    rows = {r["method"]: r for r in aggregate(runs, baseline="base", metric="acc", mode="max")}
    assert rows["once"]["verdict"] == "insufficient data" and rows["once"]["p_value"] is None
    assert rows["once"]["ci_low"] is None and rows["once"]["std"] is None
    assert (rows["gone"]["n"], rows["gone"]["mean"], rows["gone"]["reached_target"]) == (0, None, "0/1")
    assert rows["base"]["steps_to_target_mean"] is None


@pytest.mark.parametrize(
    "runs, kwargs, message",
    [(_runs("a", BASE), {"baseline": "missing"}, "baseline 'missing'"),
     (_runs("a", BASE), {"baseline": "a", "mode": "up"}, "mode"),
     ([{**_runs("a", BASE)[0], "final": {}}], {"baseline": "a"}, "no final metric 'acc'"),
     ([{**_runs("a", BASE)[0], "status": "running"}], {"baseline": "a"}, "status")],
)
def test_aggregate_rejects_bad_input(runs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        aggregate(runs, **{"metric": "acc", "mode": "max", **kwargs})
