"""The RIBBED studies (`ribbed-phase1`, `metabp-dynamics`, `coupling-scaling`) end to end, small:
each writes its figures and tables, and what they report holds."""

from __future__ import annotations

import math

import pytest

from ribbed.config import StudyConfig
from ribbed.experiments.studies import run_study

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, study: str, options: dict):
    outcome = run_study(StudyConfig(name=study, study=study, options=options), runs_dir=tmp_path)
    for figure in outcome.summary["figures"]:
        assert (outcome.record.path / figure["file"]).read_bytes()[:4] == b"\x89PNG"
    return outcome.summary


def test_phase1_controller_rescues_a_too_small_and_a_too_large_learning_rate(tmp_path):
    summary = _run(tmp_path, "ribbed-phase1", {"learning_rates": [0.003, 0.9], "seeds": 2, "steps": 150})
    rows = {(row[0], row[1]): row for row in summary["tables"][0]["rows"]}
    assert rows[0.003, "ribbed"][2] < 0.2 * rows[0.003, "sgd"][2], "too small: RIBBED gets much further"
    assert rows[0.003, "ribbed"][7] > 1.5, "... by learning a multiplier above 1"
    assert rows[0.9, "sgd"][4] == "2/2", "too large: plain SGD diverges"
    assert rows[0.9, "ribbed"][4] == "0/2" and rows[0.9, "ribbed"][2] < 0.05
    assert rows[0.9, "ribbed"][7] < 1, "... and RIBBED's controller shrinks the step"


def test_metabp_dynamics_reports_every_variant_and_its_heatmaps(tmp_path):
    summary = _run(tmp_path, "metabp-dynamics",
                   {"dataset": "digits", "hidden": [16], "steps": 60, "seeds": 1, "snapshot_every": 20})
    assert [figure["alt"] for figure in summary["figures"]] == ["heatmaps", "variants"]
    rows = {row[0]: row for row in summary["tables"][0]["rows"]}
    assert len(rows) == 5 and all(0.3 < row[1] <= 1 for row in rows.values())
    assert rows["no coupling (lambda = 1)"][4] == 1.0, "coupling off means lambda = 1"
    assert rows["no self-supervision"][5] == 0.0, "no predictions, no surprise"
    assert 0 < rows["Meta-BP (linear objective)"][4] < 1 and rows["Meta-BP (linear objective)"][5] > 0
    assert rows["residual (the default)"][4] == 1.0, "the residual objective has no lambda"


def test_coupling_scaling_fits_slopes_and_dense_agrees_with_itself(tmp_path):
    summary = _run(tmp_path, "coupling-scaling", {"neurons": [1000, 4000], "controllers": [4, 16],
                                                  "fixed_controllers": 8, "fixed_neurons": 2000, "repeats": 1})
    slopes, cells = (table["rows"] for table in summary["tables"])
    assert [row[0] for row in slopes] == ["dense", "tree", "lsh", "sampled", "topk-attention"]
    assert all(math.isclose(row[3], 2 ** row[2], rel_tol=1e-3) for row in slopes), "ratio per doubling = 2^slope"
    assert len(cells) == 5 * 4
    assert all(row[6] == 1 and row[7] == 1 for row in cells if row[0] == "dense")
    assert all(0 <= row[6] <= 1 for row in cells if row[0] in ("tree", "lsh", "topk-attention"))


@pytest.mark.parametrize("scores, width", [
    ([0.5, 0.9, 0.95, 0.9, 0.5], 2 * (0.95 - 0.94) / (0.95 - 0.9)),  # crossings inside the best's neighbours
    ([0.5, 0.945, 0.95, 0.945, 0.5], 2 * (1 + (0.945 - 0.94) / (0.945 - 0.5))),
    ([0.95, 0.95, 0.95, 0.95, 0.95], 4.0),  # flat: the whole grid
    ([0.95, 0.2, 0.1, 0.1, 0.1], 0.01 / 0.75),  # best at the edge: only one side counts
])
def test_width_within_tolerance_interpolates_the_crossings(scores, width):
    from ribbed.experiments.studies.core import width_within

    assert width_within([0.0, 1.0, 2.0, 3.0, 4.0], scores, 0.01) == pytest.approx(width)


def test_lr_sensitivity_reports_a_curve_and_a_width_per_method(tmp_path):
    summary = _run(tmp_path, "lr-sensitivity", {"dataset": "digits", "model": "mlp", "methods": ["adamw", "ribbed"],
                                                "low": 1e-3, "high": 1e-1, "points": 3, "seeds": 1, "steps": 40})
    (table,) = summary["tables"]
    rows = {row[0]: row for row in table["rows"]}
    assert set(rows) == {"adamw", "ribbed"}
    for row in rows.values():
        assert any(math.isclose(row[1], lr) for lr in (1e-3, 1e-2, 1e-1)) and 0 < row[2] <= 1 and 0 <= row[4] <= 2
    assert summary["figures"][0]["alt"] == "lr-sensitivity"
    with pytest.raises(ValueError, match="methods"):
        _run(tmp_path, "lr-sensitivity", {"methods": ["no-such-method"]})
