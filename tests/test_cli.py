"""The ``ribbed`` command end to end: runs, comparisons, records, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from ribbed.cli import app
from ribbed.runs import list_runs, open_run
from tests.conftest import tiny_dict

runner = CliRunner()


def _write_config(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _invoke(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


def _ribbed(*args: str, runs_dir: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "RIBBED_RUNS_DIR": str(runs_dir)}
    return subprocess.Popen([sys.executable, "-m", "ribbed", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_run_writes_a_record_and_a_report(tmp_path):
    config = _write_config(tmp_path / "tiny.yaml", tiny_dict())
    result = _invoke("run", str(config), "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    (row,) = list_runs(tmp_path / "runs")
    assert row["status"] == "completed" and row["kind"] == "run"
    record = open_run(tmp_path / "runs", row["id"])
    for name in ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "report.html",
                 "report.md", "model.safetensors"):
        assert (record.path / name).is_file(), name
    assert [r["step"] for r in record.read_metrics()] == [10, 20, 30, 40]
    assert record.read_summary()["final"]["test_acc"] > 0.5

    for command in (["list"], ["show", row["id"][:15]], ["report", row["id"]]):
        shown = _invoke(*command, "--runs-dir", str(tmp_path / "runs"))
        assert shown.exit_code == 0, shown.output


def test_bad_config_is_a_clear_error_and_writes_nothing(tmp_path):
    config = _write_config(tmp_path / "bad.yaml", tiny_dict(train={"steps": -1}))
    result = _invoke("run", str(config), "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2
    assert "train.steps" in result.output and "-1" in result.output
    bad_option = _write_config(tmp_path / "bad2.yaml", tiny_dict(model={"options": {"widthh": 3}}))
    result = _invoke("run", str(bad_option), "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "widthh" in result.output
    assert not (tmp_path / "runs").exists() or not list_runs(tmp_path / "runs")
    result = _invoke("run", "no-such-preset", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 2 and "default" in result.output


def test_comparison_with_tuning_seeds_and_a_diverging_method(tmp_path):
    base = tiny_dict(train={"steps": 30, "eval_every": 10,
                            "target": {"metric": "val_acc", "value": 0.5}})
    comparison = {
        "kind": "comparison", "name": "cmp", "baseline": "adamw", "seeds": 2, "base": base,
        "methods": {
            "adamw": {"optimizer": {"name": "adamw", "lr": 0.01},
                      "search": {"lr": {"low": 1e-3, "high": 3e-2, "log": True}}},
            "exploding": {"optimizer": {"name": "sgd", "lr": 1e6}},
        },
        "tuning": {"trials": 2, "grid": 3, "steps": 10, "always": True},
    }
    config = _write_config(tmp_path / "cmp.yaml", comparison)
    runs_dir = tmp_path / "runs"
    result = _invoke("run", str(config), "--runs-dir", str(runs_dir))  # tuning.always: no --tune
    assert result.exit_code == 0, result.output
    (parent,) = list_runs(runs_dir, kind="comparison")
    children = list_runs(runs_dir, parent=parent["id"])
    assert sorted((c["method"], c["seed"]) for c in children) == [
        ("adamw", 0), ("adamw", 1), ("exploding", 0), ("exploding", 1)]
    assert {c["status"] for c in children if c["method"] == "exploding"} == {"diverged"}
    summary = open_run(runs_dir, parent["id"]).read_summary()
    rows = {row["method"]: row for row in summary["aggregates"]}
    assert rows["adamw"]["n"] == 2 and rows["exploding"]["n_diverged"] == 2
    tuning = summary["methods"]["adamw"]["tuning"]["digits/mlp"]
    assert tuning["trials"] == 2 + 3 and tuning["grid"] == 3  # the coarse grid, then the sampler
    assert isinstance(tuning["lr_interior"], bool) and tuning["lr"] == tuning["params"]["lr"]
    assert (open_run(runs_dir, parent["id"]).path / "tuning.sqlite").is_file()

    compared = _invoke("compare", *[c["id"] for c in children if c["method"] == "adamw"],
                       "--runs-dir", str(runs_dir))
    assert compared.exit_code == 0, compared.output
    assert len(list_runs(runs_dir, kind="comparison")) == 2


def test_two_processes_share_one_runs_directory(tmp_path):
    config = _write_config(tmp_path / "tiny.yaml", tiny_dict(train={"steps": 20, "eval_every": 10}))
    runs_dir = tmp_path / "runs"
    processes = [_ribbed("run", str(config), runs_dir=runs_dir) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    rows = list_runs(runs_dir)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}


def _wait_for_checkpoint(record_dir: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        if (record_dir / "checkpoints" / "last.pt").is_file():
            return
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    doc = tiny_dict(
        model={"name": "mlp", "options": {"hidden": [64, 64], "dropout": 0.2}},
        train={"steps": 4000, "eval_every": 200, "checkpoint_every": 200},
    )
    config = _write_config(tmp_path / "resume.yaml", doc)
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"

    whole = _ribbed("run", str(config), runs_dir=whole_dir)
    assert whole.wait(timeout=300) == 0, whole.stdout.read()

    killed = _ribbed("run", str(config), runs_dir=killed_dir)
    deadline = time.monotonic() + 120
    while not list(killed_dir.glob("*/run.json")):
        assert time.monotonic() < deadline and killed.poll() is None
        time.sleep(0.05)
    record_dir = next(killed_dir.glob("*/run.json")).parent
    _wait_for_checkpoint(record_dir, killed)
    time.sleep(0.1)  # between two checkpoints
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (record_dir / "summary.json").exists()

    resumed = _ribbed("resume", record_dir.name, runs_dir=killed_dir)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()

    whole_dir_run = next(whole_dir.glob("*/run.json")).parent
    expected = load_file(whole_dir_run / "model.safetensors")
    actual = load_file(record_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name

    def metrics(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "time"} for row in rows]

    assert metrics(record_dir) == metrics(whole_dir_run)
    final = json.loads((record_dir / "summary.json").read_text())
    assert final["status"] == "completed"
    assert final["final"] == json.loads((whole_dir_run / "summary.json").read_text())["final"]


def test_datasets_and_presets_are_listed():
    datasets = _invoke("datasets")
    assert datasets.exit_code == 0 and "mnist1d" in datasets.output and "text-char" in datasets.output
    presets = _invoke("presets")
    assert presets.exit_code == 0 and "default" in presets.output


@pytest.mark.parametrize("module_args", [["-m", "ribbed", "--help"]])
def test_python_dash_m_works(module_args):
    out = subprocess.run([sys.executable, *module_args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run" in out.stdout


def test_a_study_records_tables_figures_and_child_runs(tmp_path):
    from matplotlib.figure import Figure

    from ribbed.config import RunConfig
    from ribbed.experiments.studies import FigureSpec, StudyResult, Table, register_study

    @register_study("test-squares", "tests only: a table, a figure and one child run")
    def squares(context, size: int = 3):
        figure = Figure(figsize=(3, 2))
        figure.add_subplot().plot(range(size), [i * i for i in range(size)])
        record, result = context.train(RunConfig.model_validate(tiny_dict(train={"steps": 10, "eval_every": 10})),
                                       method="adamw")
        return StudyResult(
            tables=[Table("squares <b>", ["n", "n^2"], [[i, i * i] for i in range(size)], note="exact")],
            figures=[FigureSpec("squares", figure, "n against n squared")],
            findings=[f"child run reached {result.final['test_acc']:.2f}"],
        )

    config = _write_config(tmp_path / "study.yaml", {"kind": "study", "name": "sq", "study": "test-squares",
                                                     "options": {"size": 4}})
    runs_dir = tmp_path / "runs"
    result = _invoke("run", str(config), "--runs-dir", str(runs_dir))
    assert result.exit_code == 0, result.output
    (study,) = list_runs(runs_dir, kind="study")
    (child,) = list_runs(runs_dir, parent=study["id"])
    assert child["status"] == "completed"
    record = open_run(runs_dir, study["id"])
    html = (record.path / "report.html").read_text()
    assert "squares &lt;b&gt;" in html and html.count("data:image/png;base64,") == 1
    assert "| 3 | 9 |" in (record.path / "report.md").read_text()
    assert (record.path / "figures" / "01-squares.png").is_file()
    bad = _write_config(tmp_path / "bad.yaml", {"kind": "study", "name": "sq", "study": "test-squares",
                                                "options": {"sise": 4}})
    result = _invoke("run", str(bad), "--runs-dir", str(runs_dir))
    assert result.exit_code == 2 and "sise" in result.output
    assert len(list_runs(runs_dir, kind="study")) == 1
    rerendered = _invoke("report", study["id"], "--runs-dir", str(runs_dir))
    assert rerendered.exit_code == 0, rerendered.output
