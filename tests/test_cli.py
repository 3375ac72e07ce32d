"""The ``ribbed`` command end to end: runs, comparisons, records, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import re
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
from tests import processes
from tests.conftest import tiny_dict
from tests.processes import Deadline, finish, limit

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


@pytest.mark.slow
def test_two_processes_share_one_runs_directory(tmp_path):
    config = _write_config(tmp_path / "tiny.yaml", tiny_dict(train={"steps": 20, "eval_every": 10}))
    runs_dir = tmp_path / "runs"
    processes = [_ribbed("run", str(config), runs_dir=runs_dir) for _ in range(2)]
    outputs = [finish(p, limit(300, starts=2, work_s=1)) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    rows = list_runs(runs_dir)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
    doc = tiny_dict(
        model={"name": "mlp", "options": {"hidden": [64, 64], "dropout": 0.2}},
        train={"steps": 1000, "eval_every": 100, "checkpoint_every": 100, "threads": 1},  # same in both processes
    )
    config = _write_config(tmp_path / "resume.yaml", doc)
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"

    whole = _ribbed("run", str(config), runs_dir=whole_dir)  # alongside the run to kill: one start-up's wait
    killed = _ribbed("run", str(config), runs_dir=killed_dir)
    first_checkpoint = Deadline("first checkpoint of the run to kill", limit(120, starts=2, work_s=1))
    while not (manifests := list(killed_dir.glob("*/checkpoints/manifest.json"))):
        first_checkpoint.check(killed)
        time.sleep(0.05)
    record_dir = manifests[0].parent.parent
    time.sleep(0.1)  # between two checkpoints (a checkpoint every 100 steps, ~0.5 s on a quiet machine)
    killed.send_signal(signal.SIGKILL)
    finish(killed, limit(30))
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (record_dir / "summary.json").exists()

    resumed = _ribbed("resume", record_dir.name, runs_dir=killed_dir)
    output = finish(resumed, limit(300, starts=1, work_s=5))
    assert resumed.returncode == 0, output
    output = finish(whole, limit(300, starts=1, work_s=5))
    assert whole.returncode == 0, output

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
    assert f"ribbed run {config}" in (record_dir / "report.md").read_text()  # not `ribbed resume ID`
    assert final["final"] == json.loads((whole_dir_run / "summary.json").read_text())["final"]


def test_datasets_and_presets_are_listed():
    datasets = _invoke("datasets")
    assert datasets.exit_code == 0 and "mnist1d" in datasets.output and "text-char" in datasets.output
    presets = _invoke("presets")
    assert presets.exit_code == 0 and "default" in presets.output


@pytest.mark.parametrize("module_args", [["-m", "ribbed", "--help"]])
def test_python_dash_m_works(module_args):
    out = processes.run([sys.executable, *module_args], limit(120))
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


def _ribbed_run(*args: str, runs_dir: Path) -> subprocess.CompletedProcess:
    """``python -m ribbed ARGS`` with stdout and stderr captured: not a terminal, as when redirected."""
    env = {**os.environ, "RIBBED_RUNS_DIR": str(runs_dir)}
    return processes.run([sys.executable, "-m", "ribbed", *args], limit(300, starts=1, work_s=2), env=env)


@pytest.fixture(scope="module")
def redirected(tmp_path_factory):
    """One ``python -m ribbed run`` with its output redirected: its log, the record it made and the
    config it ran, for the tests of the log, of ``evaluate`` and of a rewritten report."""
    root = tmp_path_factory.mktemp("redirected")
    config = _write_config(root / "tiny.yaml", tiny_dict(train={"steps": 40, "eval_every": 20, "log_every": 10}))
    done = _ribbed_run("run", str(config), "--threads", "1", runs_dir=root / "runs")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = list_runs(root / "runs")
    return done, open_run(root / "runs", row["id"]), config


def test_redirected_run_logs_plain_progress_lines_and_records_threads_and_device(redirected, tmp_path):
    from ribbed.train.hardware import available_devices

    done, record, config = redirected
    logged = re.findall(r"^tiny: step (\d+)/40  loss \d+\.\d{4}  [\d.]+ steps/s  eta \S+$", done.stdout, flags=re.M)
    assert logged == ["10", "20", "30", "40"], done.stdout
    assert "p vs baseline" in done.stdout  # the results table is not cut to 80 columns in a log file
    summary = record.read_summary()
    assert summary["threads"] == 1 and summary["device"] == available_devices()[0]
    assert record.read_config()["train"]["threads"] == 1  # recorded, so a resume uses the same count
    assert record.read_config()["train"]["device"] == "auto"

    refused = _invoke("run", str(config), "--threads", "0", "--runs-dir", str(tmp_path / "runs"))
    assert refused.exit_code == 2 and "--threads" in refused.output


def test_comparison_takes_run_overrides_and_fast_dev_runs_every_member(tmp_path):
    runs_dir = tmp_path / "runs"
    done = _invoke("run", "default", "--fast-dev-run", "--set", "train.log_every=1", "--runs-dir", str(runs_dir))
    assert done.exit_code == 0, done.output
    (parent,) = list_runs(runs_dir, kind="comparison")
    children = list_runs(runs_dir, parent=parent["id"])
    assert sorted(c["method"] for c in children) == ["adam-hd", "adamw", "ribbed", "sgd"]
    assert {c["seed"] for c in children} == {0}
    for child in children:
        record = open_run(runs_dir, child["id"])
        assert record.read_summary()["steps"] == 3 and record.read_config()["train"]["log_every"] == 1
    assert "adamw · mnist1d/cnn1d · seed 0: step 1/3  loss" in done.output

    result = _invoke("run", "default", "--set", "optimizer.lr=0.1", "--runs-dir", str(runs_dir))
    assert result.exit_code == 2 and "did you mean methods.adamw.optimizer.lr" in result.output
    result = _invoke("run", "default", "--fast-dev-run", "--tune", "--runs-dir", str(runs_dir))
    assert result.exit_code == 2 and "--fast-dev-run" in result.output
    top_level = _write_config(runs_dir.parent / "cmp.yaml", {
        "kind": "comparison", "name": "cmp", "baseline": "adamw", "train": {"steps": 5},
        "methods": {"adamw": {"optimizer": {"name": "adamw"}}}})
    result = _invoke("run", str(top_level), "--runs-dir", str(runs_dir))
    assert result.exit_code == 2 and "did you mean base.train?" in result.output


def test_a_study_fast_dev_runs_with_its_stated_options_and_one_without_them_is_refused(tmp_path):
    from ribbed.config import StudyConfig, load_config
    from ribbed.experiments.harness import fast_dev_config
    from ribbed.experiments.presets import list_presets, preset_path

    for name in list_presets():  # every preset can be shortened (each was run so once)
        fast_dev_config(load_config(preset_path(name)))
    runs_dir = tmp_path / "runs"
    done = _invoke("run", "ribbed-phase1", "--fast-dev-run", "--runs-dir", str(runs_dir))
    assert done.exit_code == 0, done.output
    (study,) = list_runs(runs_dir, kind="study")
    options = open_run(runs_dir, study["id"]).read_config()["options"]
    assert options["steps"] == 3 and options["seeds"] == 1
    assert isinstance(load_config(preset_path("ribbed-phase1")), StudyConfig)

    bare = _write_config(tmp_path / "study.yaml", {"kind": "study", "name": "bare", "study": "ribbed-phase1"})
    refused = _invoke("run", str(bare), "--fast-dev-run", "--runs-dir", str(runs_dir))
    assert refused.exit_code == 2 and "states no fast_dev_options" in refused.output


def test_every_preset_is_listed_with_a_whole_sentence_and_a_duration_and_in_the_readme():
    from ribbed.experiments.presets import list_presets

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("| preset | what it runs |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`([a-z0-9-]+)`", table))
    shown = _invoke("presets")
    assert shown.exit_code == 0
    for name, info in list_presets().items():
        assert info.summary.endswith("."), f"{name}: {info.summary[-40:]!r} is cut off"
        assert info.duration, f"{name} states no duration"
        assert name in listed, f"{name} is missing from the README's preset table"
        assert name in shown.output


def test_compare_warns_about_what_differs_beyond_the_method(tmp_path):
    runs_dir = tmp_path / "runs"
    short = _write_config(tmp_path / "a.yaml", tiny_dict(train={"steps": 20, "eval_every": 10}))
    longer = _write_config(tmp_path / "b.yaml", tiny_dict(train={"steps": 30, "eval_every": 10},
                                                          optimizer={"name": "sgd", "lr": 0.1}))
    again = _write_config(tmp_path / "c.yaml", tiny_dict(train={"steps": 20, "eval_every": 10}, seed=1))
    for config in (short, longer, again):
        assert _invoke("run", str(config), "--runs-dir", str(runs_dir)).exit_code == 0
    by_method = {}
    for row in list_runs(runs_dir):
        by_method.setdefault(row["method"], []).append(row["id"])

    fair = _invoke("compare", *by_method["adamw"], "--runs-dir", str(runs_dir))
    assert fair.exit_code == 0 and "warning" not in fair.output

    unfair = _invoke("compare", *by_method["adamw"], *by_method["sgd"], "--runs-dir", str(runs_dir))
    assert unfair.exit_code == 0, unfair.output
    assert "differ beyond the method" in unfair.output
    assert "train.steps differs: adamw 20; sgd 30" in unfair.output
    assert "seeds differ: adamw 0, 1; sgd 0" in unfair.output
    assert "learning rates differ: adamw 0.01; sgd 0.1" in unfair.output
    (comparison,) = [r for r in list_runs(runs_dir, kind="comparison")
                     if open_run(runs_dir, r["id"]).read_summary().get("warnings")]
    record = open_run(runs_dir, comparison["id"])
    assert "train.steps differs: adamw 20; sgd 30" in (record.path / "report.html").read_text()
    assert "train.steps differs: adamw 20; sgd 30" in (record.path / "report.md").read_text()


def test_evaluate_tests_saved_weights_on_the_runs_data_or_another(redirected):
    _, record, _ = redirected
    runs_dir = record.path.parent
    final = record.read_summary()["final"]

    done = _invoke("evaluate", record.id, "--json", "--runs-dir", str(runs_dir))
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["split"] == "test" and result["dataset"] == "digits"
    assert result["acc"] == final["test_acc"] and result["loss"] == pytest.approx(final["test_loss"], rel=1e-6)

    other_seed = _invoke("evaluate", record.id, "--split", "val", "--set", "data.seed=3", "--json",
                         "--runs-dir", str(runs_dir))
    assert other_seed.exit_code == 0, other_seed.output
    assert "recorded_acc" not in json.loads(other_seed.output)  # other data: nothing recorded to match

    misfit = _invoke("evaluate", record.id, "--data", "mnist1d", "--runs-dir", str(runs_dir))
    assert misfit.exit_code == 2 and "do not fit" in misfit.output and "mnist1d" in misfit.output
    bad_split = _invoke("evaluate", record.id, "--split", "dev", "--runs-dir", str(runs_dir))
    assert bad_split.exit_code == 2 and "'dev'" in bad_split.output and "test, val, train" in bad_split.output


def test_a_rewritten_report_still_shows_the_command_that_made_the_run(redirected, monkeypatch):
    _, record, config = redirected
    monkeypatch.setattr(sys, "argv", ["ribbed", "report", record.id])  # what `ribbed report ID` sees
    rewritten = _invoke("report", record.id, "--runs-dir", str(record.path.parent))
    assert rewritten.exit_code == 0, rewritten.output
    markdown = (record.path / "report.md").read_text()
    assert f"ribbed run {config}" in markdown and "ribbed report" not in markdown
