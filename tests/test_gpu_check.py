"""The prepared GPU check (``benchmarks/gpu_check.py``) in its CPU dry run.

Every section runs on tiny sizes and writes its rows; a section that raises or overruns its
time limit is recorded and the next one still runs; without CUDA the real run refuses with
status 2; bad arguments are rejected with what is allowed. Everything runs in-process through
``main(argv)``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ROW_STATUSES = {"ok", "error", "unavailable", "skipped", "mismatch"}


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module; its folder on ``sys.path`` for the sibling benchmarks it imports."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def dry_run(gpu_check, one_thread, tmp_path_factory):
    """``(report, out folder)`` of one full dry run."""
    out = tmp_path_factory.mktemp("gpu-check")
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 0
    return json.loads((out / gpu_check.JSON_NAME).read_text()), out


def _run(gpu_check, out: Path, *args: str) -> dict:
    assert gpu_check.main(["--out", str(out), "--dry-run", *args]) == 0
    return json.loads((out / gpu_check.JSON_NAME).read_text())


def test_dry_run_measures_or_records_every_section(gpu_check, dry_run):
    report, _ = dry_run
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    for name, record in report["sections"].items():
        assert record["status"] == "ok", (name, record.get("error"))
        assert record["elapsed_s"] <= record["limit_s"]
        statuses = {row["status"] for row in record["rows"]}
        assert statuses <= ROW_STATUSES - {"error", "mismatch"}, (name, record["rows"])
        measured = [row for row in record["rows"] if row["status"] == "ok"]
        assert measured and all(row["ms"] > 0 for row in measured), name
        assert all(row["note"] for row in record["rows"] if row["status"] != "ok"), name
    assert report["meta"]["finished"] and report["meta"]["dry_run"]
    assert report["meta"]["torch"] == torch.__version__ and report["meta"]["cpu"]


def test_dry_run_records_cuda_only_figures_as_skipped(gpu_check, dry_run):
    sections = dry_run[0]["sections"]
    sparse = {row["case"]: row for row in sections["sparsity"]["rows"]}
    assert sparse["2:4 semi-structured"]["note"] == gpu_check.NEEDS_CUDA
    assert 0 <= sparse["2:4 pruned (dense kernel)"]["accuracy"] <= 1
    attention = sections["attention"]["rows"]
    assert {row["case"] for row in attention} >= {"naive", "sdpa (default)", *gpu_check.BACKENDS}
    assert all(row["picked"] for row in attention if row["case"] == "sdpa (default)")
    unavailable = [row for row in attention if row["status"] == "unavailable"]
    assert unavailable and all(row["reasons"] for row in unavailable)  # efficient and cudnn have no CPU kernel
    assert all(any(gpu_check.NEEDS_CUDA in note for note in record["notes"]) for record in sections.values())


def test_dry_run_ratios_and_parity(dry_run):
    sections = dry_run[0]["sections"]
    for name, baseline in (("precision", "fp32"), ("checkpointing", "none"), ("optimizers", "adamw (foreach)")):
        bases = [row for row in sections[name]["rows"] if row["case"] == baseline and row["status"] == "ok"]
        assert bases and all(row["time_ratio"] == 1.0 for row in bases), name
    parity = {row["case"]: row for row in sections["distributed"]["rows"]}
    for strategy in ("ddp", "zero3"):
        assert parity[strategy]["max_loss_diff"] <= 1e-5
        assert len(parity[strategy]["losses"]) == len(parity["single process"]["losses"])


def test_markdown_table_has_a_line_per_row(gpu_check, dry_run):
    report, out = dry_run
    table = [line for line in (out / gpu_check.MARKDOWN_NAME).read_text().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Section | Group | Case | Status | ms |")
    assert len(table) == 1 + sum(len(record["rows"]) for record in report["sections"].values())


def test_a_failing_section_is_recorded_and_the_next_runs(gpu_check, monkeypatch, tmp_path):
    def failing(section):
        section.attempt("g", "fine", lambda: section.measure(lambda: None, warmup=0, steps=1, repeats=1))
        section.attempt("g", "broken case", lambda: 1 / 0)
        raise ValueError("injected failure")

    monkeypatch.setitem(gpu_check.SECTIONS, "precision", gpu_check.SectionSpec(failing, 10.0))
    sections = _run(gpu_check, tmp_path, "--sections", "precision,checkpointing")["sections"]
    failed = sections["precision"]
    assert failed["status"] == "error"
    assert failed["error"]["type"] == "ValueError" and failed["error"]["message"] == "injected failure"
    assert [row["status"] for row in failed["rows"]] == ["ok", "error"]
    assert failed["rows"][1]["error"]["type"] == "ZeroDivisionError"
    assert sections["checkpointing"]["status"] == "ok" and sections["checkpointing"]["rows"]
    assert "injected failure" in (tmp_path / gpu_check.MARKDOWN_NAME).read_text()


def test_the_time_limit_stops_an_overrunning_section(gpu_check, monkeypatch, tmp_path):
    def slow(section):
        section.compare_to("case 0")
        for i in range(1000):
            section.attempt("g", f"case {i}", lambda: section.measure(lambda: time.sleep(0.01), warmup=0, steps=1,
                                                                      repeats=1))

    monkeypatch.setitem(gpu_check.SECTIONS, "attention", gpu_check.SectionSpec(slow, 0.2))
    started = time.perf_counter()
    sections = _run(gpu_check, tmp_path, "--sections", "attention,checkpointing")["sections"]
    stopped = sections["attention"]
    assert stopped["status"] == "time_limit" and stopped["error"]["type"] == "SectionTimeLimit"
    assert 1 <= len(stopped["rows"]) < 100
    assert stopped["rows"][0]["time_ratio"] == 1.0  # ratios still filled in for what was measured
    assert stopped["elapsed_s"] < 1.0 and time.perf_counter() - started < 10
    assert sections["checkpointing"]["status"] == "ok"


def test_the_total_limit_skips_the_remaining_sections(gpu_check, tmp_path):
    sections = _run(gpu_check, tmp_path, "--sections", "checkpointing,sparsity", "--total-limit", "1e-9")["sections"]
    assert [record["status"] for record in sections.values()] == ["skipped", "skipped"]


def test_without_cuda_the_real_run_exits_2(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "needs a CUDA device" in error and "--dry-run" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "allowed"), [
    (["--sections", "precision,nope"], "comma-separated subset of precision"),
    (["--sections", ""], "comma-separated subset"),
    (["--limit-scale", "0"], "a positive number"),
    (["--total-limit", "soon"], "a positive number"),
    ([], "--out"),
])
def test_bad_arguments_are_rejected(gpu_check, tmp_path, capsys, args, allowed):
    argv = args if not args else ["--out", str(tmp_path), *args]
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--dry-run", *argv])
    assert stop.value.code == 2
    assert allowed in capsys.readouterr().err


def test_out_must_not_be_a_file(gpu_check, tmp_path, capsys):
    existing = tmp_path / "file"
    existing.write_text("")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(existing), "--dry-run"])
    assert "allowed: a folder" in capsys.readouterr().err
