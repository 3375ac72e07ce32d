"""DeepSpeed's ZeRO-3 engine on 2 CPU ranks (gloo) against single-process training.

Slow the first time only: DeepSpeed compiles a CPU communication op (about two minutes),
cached afterwards. Skipped when DeepSpeed is not installed (the ``deepspeed`` extra).
"""

from __future__ import annotations

import pytest

from ribbed.distributed import launch
from ribbed.runs import list_runs, open_run
from ribbed.train import build_run, train
from tests.test_distributed import EXACT, STEPS, case_config, losses, single_process, write_config

pytest.importorskip("deepspeed")


@pytest.mark.slow
def test_deepspeed_zero3_follows_the_single_process_loss(tmp_path):
    config = case_config({"strategy": "deepspeed", "options": {"stage": 3}}, {})
    runs = tmp_path / "runs"
    launch(["--runs-dir", str(runs), "--run", f"zero3={write_config(tmp_path / 'ds.yaml', config)}"],
           nproc=2, module="ribbed.train.worker")
    (row,) = list_runs(runs)
    record = open_run(runs, row["id"])
    assert record.read_summary()["status"] == "completed"
    got = record.read_metrics()
    expected = train(build_run(single_process(config)), evaluate_test=False).history
    assert len(got) == STEPS
    for ours, reference in zip(losses(got), losses(expected), strict=True):
        assert ours == pytest.approx(reference, abs=EXACT)
    # ZeRO-3 partitions parameters: the busiest rank holds about half of them
    full_mb = sum(p.numel() * 4 for p in build_run(single_process(config)).model.parameters()) / 2**20
    assert got[-1]["mem_params_mb"] <= 0.6 * full_mb
