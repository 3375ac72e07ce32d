"""Tests for ribbed.runs: run records, the SQLite index, environment capture, trackers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ribbed.runs import (
    RunNotFound,
    atomic_write_bytes,
    atomic_write_text,
    build_tracker,
    capture_environment,
    create_run,
    default_runs_dir,
    list_runs,
    open_run,
    rebuild_index,
)
from ribbed.runs.index import index_path
from tests import processes

CONFIG = {"model": {"width": 64, "depth": 2}, "optim": {"name": "ribbed", "lr": 0.01}}


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def make_run(runs_dir: Path, name: str = "mlp baseline", **kwargs):
    return create_run(runs_dir, name=name, config=CONFIG, **kwargs)


def test_create_writes_layout_and_running_row(runs_dir: Path) -> None:
    record = make_run(runs_dir, method="ribbed", dataset="mnist1d", seed=3)

    assert record.path == runs_dir.resolve() / record.id
    assert record.id.split("-")[2:-1] == ["mlp", "baseline"]
    assert record.config_path.is_file() and record.checkpoint_dir.is_dir()
    assert record.read_config() == CONFIG
    assert list(record.config_path.read_text().splitlines())[0] == "model:"  # not sorted
    assert json.loads((record.path / "env.json").read_text())["python"]["version"]
    assert record.read_summary() is None
    [row] = list_runs(runs_dir)
    assert row["id"] == record.id
    assert (row["status"], row["method"], row["dataset"], row["seed"]) == (
        "running",
        "ribbed",
        "mnist1d",
        3,
    )
    assert row["summary"] is None


def test_finish_round_trip(runs_dir: Path) -> None:
    record = make_run(runs_dir)
    record.finish("diverged", {"final_loss": math.inf, "steps": 12})

    summary = json.loads(record.summary_path.read_text())
    assert summary == {"status": "diverged", "final_loss": math.inf, "steps": 12}
    assert record.read_summary() == summary
    [row] = list_runs(runs_dir)
    assert row["status"] == "diverged"
    assert row["summary"] == summary
    assert row["updated"] >= row["created"]

    record.set_status("running")
    assert list_runs(runs_dir)[0]["status"] == "running"


@pytest.mark.parametrize("status", ["running", "done", ""])
def test_finish_rejects_non_final_status(runs_dir: Path, status: str) -> None:
    with pytest.raises(ValueError, match="status must be one of"):
        make_run(runs_dir).finish(status, {})


def test_unknown_parent_is_rejected(runs_dir: Path) -> None:
    with pytest.raises(ValueError, match="parent"):
        make_run(runs_dir, parent="20990101-000000-nope-abcdef")


def test_metrics_append_read_and_partial_line(runs_dir: Path) -> None:
    record = make_run(runs_dir)
    record.append_metrics({"step": 0, "loss": 2.5})
    record.append_metrics({"step": 1, "loss": math.nan}, fsync=True)
    with open(record.metrics_path, "a") as file:
        file.write('{"step": 2, "lo')  # a writer killed mid-line

    rows = record.read_metrics()
    assert [row["step"] for row in rows] == [0, 1]
    assert math.isnan(rows[1]["loss"])
    with pytest.raises(ValueError, match="step"):
        record.append_metrics({"loss": 1.0})


def test_truncate_metrics_after(runs_dir: Path) -> None:
    record = make_run(runs_dir)
    for step in range(6):
        record.append_metrics({"step": step, "loss": 1.0 / (step + 1)})
    with open(record.metrics_path, "a") as file:
        file.write('{"step": 6')

    record.truncate_metrics_after(3)

    assert [row["step"] for row in record.read_metrics()] == [0, 1, 2, 3]
    assert record.metrics_path.read_text().endswith("\n")
    record.append_metrics({"step": 4, "loss": 0.2})
    assert [row["step"] for row in record.read_metrics()] == [0, 1, 2, 3, 4]


def test_open_run_by_id_prefix_and_path(runs_dir: Path) -> None:
    record = make_run(runs_dir)
    other = make_run(runs_dir, name="other")

    assert open_run(runs_dir, record.id) == record
    assert open_run(runs_dir, record.id[:-3]) == record
    assert open_run(runs_dir, str(record.path)) == record
    assert open_run(runs_dir.parent / "elsewhere", str(other.path)) == other  # a path wins


def test_open_run_ambiguous_prefix_lists_candidates(runs_dir: Path) -> None:
    records = [make_run(runs_dir, name="sweep") for _ in range(3)]
    prefix = os.path.commonprefix([r.id for r in records])

    with pytest.raises(RunNotFound) as caught:
        open_run(runs_dir, prefix)

    assert sorted(caught.value.candidates) == sorted(r.id for r in records)
    assert all(r.id in str(caught.value) for r in records)
    assert isinstance(caught.value, LookupError)


def test_open_run_unknown_lists_close_candidates(runs_dir: Path) -> None:
    record = make_run(runs_dir, name="adamw-baseline")
    make_run(runs_dir, name="sgd")

    with pytest.raises(RunNotFound) as caught:
        open_run(runs_dir, "adamw-baseline")  # a piece of the id, not its prefix

    assert caught.value.candidates[0] == record.id
    assert record.id in str(caught.value)


def test_ids_unique_within_one_second(runs_dir: Path) -> None:
    ids = {make_run(runs_dir, name="same").id for _ in range(20)}
    assert len(ids) == 20


def test_comparison_members_point_to_parent(runs_dir: Path) -> None:
    comparison = create_run(runs_dir, name="ribbed vs adam", kind="comparison", config={})
    members = [make_run(runs_dir, parent=comparison.id, seed=seed) for seed in range(2)]
    make_run(runs_dir)

    assert [row["id"] for row in list_runs(runs_dir, kind="comparison")] == [comparison.id]
    assert {row["id"] for row in list_runs(runs_dir, parent=comparison.id)} == {
        m.id for m in members
    }
    assert len(list_runs(runs_dir, limit=2)) == 2
    assert open_run(runs_dir, comparison.id).kind == "comparison"


def test_list_runs_newest_first(runs_dir: Path) -> None:
    ids = [make_run(runs_dir, name=f"run {i}").id for i in range(3)]
    assert [row["id"] for row in list_runs(runs_dir)] == ids[::-1]


def test_list_runs_without_runs_dir_is_empty(tmp_path: Path) -> None:
    assert list_runs(tmp_path / "missing") == []


def test_rebuild_index_after_deleting_it(runs_dir: Path) -> None:
    finished = make_run(runs_dir, seed=1)
    finished.finish("completed", {"test_acc": 0.75})
    make_run(runs_dir, seed=2)
    before = list_runs(runs_dir)
    for path in runs_dir.glob("index.sqlite*"):
        path.unlink()

    assert list_runs(runs_dir) == before  # rebuilt on demand

    index_path(runs_dir).unlink()
    assert rebuild_index(runs_dir) == 2
    assert list_runs(runs_dir) == before


CONCURRENT_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ribbed.runs import create_run

    runs_dir, go_file, worker = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    while not go_file.exists():
        time.sleep(0.01)
    for i in range(15):
        record = create_run(runs_dir, name=f"worker {worker}", config={"i": i}, seed=i)
        record.append_metrics({"step": 0, "worker": worker})
        record.finish("completed", {"worker": worker, "i": i})
    """
)


@pytest.mark.slow
def test_concurrent_processes_all_land_in_index(runs_dir: Path, tmp_path: Path) -> None:
    go_file = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_WORKER, str(runs_dir), str(go_file), str(w)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(3)
    ]
    time.sleep(0.5)  # let the interpreters start so the writes overlap
    go_file.touch()
    for worker in workers:
        output = processes.finish(worker, processes.limit(120, starts=3, work_s=1))
        assert worker.returncode == 0, output

    rows = list_runs(runs_dir)
    assert len(rows) == 45
    assert {row["status"] for row in rows} == {"completed"}
    assert sorted((r["summary"]["worker"], r["summary"]["i"]) for r in rows) == sorted(
        (str(w), i) for w in range(3) for i in range(15)
    )


def test_default_runs_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RIBBED_RUNS_DIR", raising=False)
    assert default_runs_dir() == Path("runs")
    monkeypatch.setenv("RIBBED_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert default_runs_dir() == tmp_path / "elsewhere"


def test_capture_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # not a git repository
    env = capture_environment()

    assert {
        "time_utc",
        "argv",
        "python",
        "platform",
        "hostname",
        "cpu",
        "torch",
        "packages",
        "git",
    } <= set(env)
    assert env["torch"]["version"] and isinstance(env["torch"]["cuda_available"], bool)
    import torch

    assert env["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    import torch

    assert env["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["packages"]["numpy"] and "ribbed" in env["packages"]
    assert env["cpu"]["count"] >= 1
    assert env["git"]["cwd"] is None
    assert json.loads(json.dumps(env)) == env


def test_atomic_writes_replace_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    atomic_write_text(target, "one")
    target.chmod(0o600)
    atomic_write_text(target, "two")
    atomic_write_bytes(tmp_path / "data.bin", b"\x00\xff")

    assert target.read_text() == "two"
    assert target.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "data.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "file.txt"]


def test_jsonl_tracker_writes_metrics(runs_dir: Path) -> None:
    record = make_run(runs_dir)
    tracker = build_tracker(["jsonl", "jsonl"], record)
    tracker.log_config(CONFIG)
    tracker.log_metrics({"loss": 1.5}, step=10)
    tracker.close()

    assert record.read_metrics() == [{"step": 10, "loss": 1.5}]


def test_build_tracker_rejects_unknown_name(runs_dir: Path) -> None:
    with pytest.raises(ValueError, match="allowed.*jsonl.*tensorboard.*mlflow.*wandb"):
        build_tracker(["jsonl", "neptune"], make_run(runs_dir))


def _logged_twice(names: list[str], record):
    tracker = build_tracker(names, record)
    tracker.log_config(CONFIG)
    tracker.log_metrics({"loss": 0.5, "note": "text is skipped"}, step=1)
    tracker.log_metrics({"loss": 0.25}, step=2)
    return tracker


def test_tensorboard_tracker_writes_scalars_readable_by_tensorboard(runs_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = make_run(runs_dir)
    _logged_twice(["tensorboard"], record).close()
    events = EventAccumulator(str(record.path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]


@pytest.mark.slow
def test_mlflow_tracker_logs_params_and_metric_history(runs_dir: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    record = make_run(runs_dir)
    tracker = _logged_twice(["mlflow"], record)
    (mlflow_tracker,) = tracker.trackers
    tracker.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")
    run = client.get_run(mlflow_tracker.run_id)
    assert run.info.run_name == record.id and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.01"
    history = client.get_metric_history(mlflow_tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]


def test_wandb_tracker_runs_offline_in_the_run_directory(runs_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    record = make_run(runs_dir)
    tracker = _logged_twice(["wandb"], record)
    (wandb_tracker,) = tracker.trackers
    assert wandb_tracker.run.settings.mode == "offline"
    assert wandb_tracker.run.config["optim"]["lr"] == 0.01
    tracker.close()
    # wandb >= 0.2x reads its offline log only from its Go core: check the records hold the values
    (offline,) = (record.path / "wandb").glob("offline-run-*")
    path = next(offline.glob("run-*.wandb"))
    written = processes.Deadline("'loss' in wandb's offline log", processes.limit(30))  # its core process
    while b"loss" not in (log := path.read_bytes()):  # may still be writing after close()
        written.check()
        time.sleep(0.2)
    assert b"loss" in log and b"0.25" in log and b"text is skipped" not in log
