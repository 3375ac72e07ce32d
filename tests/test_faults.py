"""Faults an operator meets: damaged checkpoints, a damaged or read-only index, a full disk,
links in a run dir, broken run files, hostile CIFAR-10 batches, Ctrl-C, and resuming runs and
comparisons. Each test injects the fault and checks the one-line error, the state left behind,
and that nothing outside the run dir changed. Ctrl-C goes through the real command
(``python -m ribbed``) in a subprocess; the resumes call the command in-process (``resume
--nproc`` still launches two rank processes; ``tests/test_cli.py`` resumes a SIGKILLed run
through the real command)."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from ribbed.cli import app
from ribbed.config import RunConfig
from ribbed.data import load_dataset
from ribbed.data.registry import DatasetError
from ribbed.experiments.harness import run_comparison, run_single
from ribbed.runs import atomic_write_bytes, create_run, list_runs, open_run
from ribbed.runs.index import index_path
from ribbed.train import build_run, train
from ribbed.train.checkpoint import CheckpointError, CheckpointStore, save_checkpoint
from tests import processes
from tests.conftest import StopAfter, tiny_dict

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, EVAL_EVERY, STOP = 40, 10, 25  # stopped after step 25: checkpoints at steps 10 and 20
runner = CliRunner()


def _config(**train) -> RunConfig:
    return RunConfig.model_validate(
        tiny_dict(train={"steps": STEPS, "eval_every": EVAL_EVERY, "threads": 1, **train}))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    """The tiny run trained without a break: its final weights and metric rows."""
    runs = tmp_path_factory.mktemp("whole")
    record = create_run(runs, name="tiny", config=_config().model_dump(mode="json"))
    result = train(build_run(_config(), digits), record=record)
    return {k: v.clone() for k, v in result.model.state_dict().items()}, _rows(record)


@pytest.fixture(scope="module")
def stopped(digits, tmp_path_factory):
    """A run dir stopped after step 25, with the checkpoints of steps 10 and 20 (copy before use)."""
    runs = tmp_path_factory.mktemp("stopped")
    record = create_run(runs, name="tiny", config=_config().model_dump(mode="json"))
    with pytest.raises(KeyboardInterrupt) as stopped_by:
        train(build_run(_config(), digits), record=record, callbacks=[StopAfter(STOP)])
    assert record.record_error(stopped_by.value) == "interrupted"  # as the command does
    return record.path


def _rows(record) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time"} for row in record.read_metrics()]


def _copy_run(source: Path, runs_dir: Path):
    runs_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, runs_dir / source.name, symlinks=True)
    return open_run(runs_dir, source.name)


def _newest(record) -> Path:
    return record.checkpoint_dir / CheckpointStore(record.checkpoint_dir).entries()[0]["file"]


def _resave(record, state: dict) -> None:
    """Replace the newest checkpoint with ``state`` and make the manifest vouch for it, as a
    user copying in another file would (so only the content checks can catch it)."""
    store = CheckpointStore(record.checkpoint_dir)
    entries = store.entries()
    path = record.checkpoint_dir / entries[0]["file"]
    digest = save_checkpoint(path, state)
    entries[0].update(sha256=digest, bytes=path.stat().st_size)
    store.manifest_path.write_text(json.dumps({"checkpoints": entries}))


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_by_default_at_every_evaluation_keep_the_last_two(stopped):
    assert RunConfig().train.checkpoint_every == "eval"
    store = CheckpointStore(stopped / "checkpoints")
    entries = store.entries()
    assert [entry["step"] for entry in entries] == [20, 10]
    assert sorted(p.name for p in store.directory.iterdir()) == [
        "manifest.json", "step-000000010.pt", "step-000000020.pt"]
    for entry in entries:
        assert len(entry["sha256"]) == 64 and entry["bytes"] == (store.directory / entry["file"]).stat().st_size


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_weight_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=True)
    weight = state["model"]["net.0.weight"] if "net.0.weight" in state["model"] else next(iter(state["model"].values()))
    needle = weight.flatten()[:4].numpy().tobytes()
    at = bytes(data).find(needle)
    assert at > 0, "the weights' bytes are stored verbatim"
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _torchscript(path: Path) -> None:
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))


DAMAGE = {
    "truncated": _truncate,
    "zero-length": lambda path: path.write_bytes(b""),
    "garbage": lambda path: path.write_bytes(os.urandom(path.stat().st_size)),
    "bit flip in the weights": _flip_a_weight_bit,
    "TorchScript archive": _torchscript,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(damage, stopped, uninterrupted, digits, tmp_path):
    record = _copy_run(stopped, tmp_path / "runs")
    newest = _newest(record)
    DAMAGE[damage](newest)
    messages = []

    class Messages:
        def on_message(self, text: str) -> None:
            messages.append(text)

    result = train(build_run(_config(), digits), record=record, callbacks=[Messages()], resume=True)

    assert any(str(newest) in text and "damaged" in text for text in messages), messages
    assert any("resuming from step 10" in text for text in messages), messages
    weights, rows = uninterrupted
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name  # resumed from step 10: the same run
    assert _rows(record) == rows
    assert record.read_summary()["status"] == "completed"


@pytest.mark.parametrize("fault", ["missing keys", "wrong shapes", "step past the end"])
def test_a_checkpoint_that_does_not_fit_the_run_is_skipped(fault, stopped, digits, tmp_path):
    record = _copy_run(stopped, tmp_path / "runs")
    newest = _newest(record)
    state = torch.load(newest, weights_only=True)
    if fault == "missing keys":
        del state["plugins"]
    elif fault == "wrong shapes":
        name = next(iter(state["model"]))
        state["model"][name] = torch.zeros(3, 3)
    else:
        state["step"] = STEPS + 100
    _resave(record, state)
    messages = []

    class Messages:
        def on_message(self, text: str) -> None:
            messages.append(text)

    train(build_run(_config(), digits), record=record, callbacks=[Messages()], resume=True)
    skipped = next(text for text in messages if "skipped" in text)
    assert str(newest) in skipped
    assert {"missing keys": "plugins", "wrong shapes": "shape", "step past the end": "140"}[fault] in skipped
    assert record.read_summary()["status"] == "completed"


def test_no_usable_checkpoint_fails_the_resume_naming_every_file(stopped, tmp_path):
    record = _copy_run(stopped, tmp_path / "runs")
    for entry in CheckpointStore(record.checkpoint_dir).entries():
        (record.checkpoint_dir / entry["file"]).write_bytes(b"junk")

    out = runner.invoke(app, ["resume", record.id, "--runs-dir", str(tmp_path / "runs")])

    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert "step-000000010.pt" in text and "step-000000020.pt" in text and "marked failed" in text
    assert record.read_meta()["status"] == "failed"


def test_stray_files_of_a_killed_write_are_removed_on_the_next_start(stopped, digits, tmp_path):
    record = _copy_run(stopped, tmp_path / "runs")
    (record.checkpoint_dir / ".step-000000030.pt.x1y2.tmp").write_bytes(b"half")
    (record.checkpoint_dir / "step-000000030.pt").write_bytes(b"written, manifest not yet")
    (record.path / ".summary.json.ab12.tmp").write_bytes(b"{")

    train(build_run(_config(), digits), record=record, resume=True)

    assert not list(record.path.glob(".*.tmp"))
    names = sorted(p.name for p in record.checkpoint_dir.iterdir())
    assert names == ["manifest.json", "step-000000030.pt", "step-000000040.pt"]
    assert CheckpointStore(record.checkpoint_dir).load().step == STEPS


def test_resumed_metrics_equal_the_uninterrupted_rows_between_evaluations(digits, uninterrupted, tmp_path):
    """checkpoint_every 7 is not a multiple of eval_every 10: the running train_loss is in the checkpoint."""
    config = _config(checkpoint_every=7)
    record = create_run(tmp_path / "runs", name="tiny", config=config.model_dump(mode="json"))
    with pytest.raises(KeyboardInterrupt):
        train(build_run(config, digits), record=record, callbacks=[StopAfter(STOP)])  # last checkpoint: 21
    train(build_run(config, digits), record=record, resume=True)
    assert _rows(record) == uninterrupted[1]


def test_a_full_disk_fails_the_run_in_one_line_and_keeps_the_last_checkpoint(digits, tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save({"step": 1, "w": torch.zeros(10)}, 1)
    config = RunConfig.model_validate({**_config().model_dump(),
                                       "model": {"name": "mlp", "options": {"hidden": [256, 256]}}})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        with pytest.raises(OSError, match=r"cannot write checkpoint .*step-000000002.pt: File too large"):
            store.save({"step": 2, "w": torch.zeros(100_000)}, 2)
        with pytest.raises(OSError, match=r"cannot write .*big.bin: File too large"):
            atomic_write_bytes(tmp_path / "big.bin", bytes(400_000))
        with pytest.raises(OSError, match="File too large") as failed:
            run_single(config, runs_dir=tmp_path / "runs")  # its first checkpoint is ~1 MB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert store.load().step == 1 and [e["step"] for e in store.entries()] == [1]
    assert sorted(p.name for p in store.directory.iterdir()) == ["manifest.json", "step-000000001.pt"]
    assert "\n" not in str(failed.value) and "checkpoints" in str(failed.value)
    (row,) = list_runs(tmp_path / "runs")
    assert row["status"] == "failed" and "File too large" in row["summary"]["error"]


# --- resume through the command ------------------------------------------------------------------


def test_resume_through_the_command_then_refuses_the_finished_run(stopped, uninterrupted, tmp_path):
    record = _copy_run(stopped, tmp_path / "runs")
    _truncate(_newest(record))

    out = runner.invoke(app, ["resume", record.id, "--runs-dir", str(tmp_path / "runs")])

    assert out.exit_code == 0, out.output
    assert "skipped a damaged checkpoint" in out.stdout and "resuming from step 10" in out.stdout
    assert record.read_summary()["status"] == "completed"
    weights = load_file(record.path / "model.safetensors")
    assert all(torch.equal(weights[name], uninterrupted[0][name]) for name in weights)
    before = (record.path / "summary.json").read_bytes()

    again = runner.invoke(app, ["resume", record.id, "--runs-dir", str(tmp_path / "runs")])

    assert again.exit_code == 2
    assert "already finished (completed after 40 steps)" in " ".join(again.output.split())
    assert (record.path / "summary.json").read_bytes() == before  # not retrained


@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tmp_path):
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(train={"steps": 200_000, "eval_every": 20, "threads": 1})))
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "RIBBED_RUNS_DIR": str(runs_dir), "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    process = subprocess.Popen([sys.executable, "-m", "ribbed", "run", str(config)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_checkpoint = processes.Deadline("first checkpoint", processes.limit(120, starts=1, work_s=1))
    while not list(runs_dir.glob("*/checkpoints/manifest.json")):
        first_checkpoint.check(process)
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = processes.finish(process, processes.limit(60))

    assert process.returncode == 130, output
    (row,) = list_runs(runs_dir)
    record = open_run(runs_dir, row["id"])
    summary = record.read_summary()
    assert row["status"] == "interrupted" and summary["status"] == "interrupted"
    step = summary["step"]
    checkpoint = record.checkpoint_dir / f"step-{step:09d}.pt"
    line = " ".join(output.split())
    assert f"interrupted at step {step}, checkpoint at {checkpoint}, resume with `ribbed resume {row['id']}`" in line
    assert "Traceback" not in output
    assert CheckpointStore(record.checkpoint_dir).load().step == step  # taken at the step boundary


def test_an_interrupted_comparison_resumes_reusing_its_finished_members(digits, tmp_path):
    comparison = {
        "kind": "comparison", "name": "cmp", "baseline": "adamw", "seeds": 1,
        "base": tiny_dict(train={"steps": 20, "eval_every": 10, "threads": 1}),
        "methods": {"adamw": {"optimizer": {"name": "adamw", "lr": 0.01}},
                    "sgd": {"optimizer": {"name": "sgd", "lr": 0.1}}},
    }
    from ribbed.config import config_from_dict

    cfg = config_from_dict(comparison)
    runs_dir = tmp_path / "runs"

    class StopSecond:
        def __init__(self):
            self.started = 0

        def start_run(self, label, steps):
            self.started += 1
            return StopAfter(12) if self.started == 2 else StopAfter(10**9)

        def end_run(self, label, entry):
            pass

        def message(self, text):
            pass

    with pytest.raises(KeyboardInterrupt):
        run_comparison(cfg, runs_dir=runs_dir, progress=StopSecond())
    (parent,) = list_runs(runs_dir, kind="comparison")
    assert parent["status"] == "interrupted"
    members = {row["method"]: row for row in list_runs(runs_dir, parent=parent["id"])}
    assert (members["adamw"]["status"], members["sgd"]["status"]) == ("completed", "interrupted")
    finished_summary = (Path(members["adamw"]["path"]) / "summary.json").read_bytes()

    out = runner.invoke(app, ["resume", parent["id"], "--runs-dir", str(runs_dir)])

    assert out.exit_code == 0, out.output
    assert f"reusing {members['adamw']['id']}" in out.stdout
    after = {row["method"]: row for row in list_runs(runs_dir, parent=parent["id"])}
    assert {m: r["id"] for m, r in after.items()} == {m: r["id"] for m, r in members.items()}  # no new runs
    assert {r["status"] for r in after.values()} == {"completed"}
    assert (Path(members["adamw"]["path"]) / "summary.json").read_bytes() == finished_summary
    assert open_run(runs_dir, parent["id"]).read_summary()["status"] == "completed"

    rerun = run_comparison(cfg, runs_dir=runs_dir)  # identical: reuses both members
    assert sorted(run["id"] for run in rerun.summary["runs"]) == sorted(r["id"] for r in after.values())
    assert len(list_runs(runs_dir, kind="run")) == 2


def test_a_run_whose_process_is_gone_is_listed_stale(tmp_path):
    runs_dir = tmp_path / "runs"
    record = create_run(runs_dir, name="killed", config={})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    meta = record.read_meta()
    record.meta_path.write_text(json.dumps({**meta, "pid": gone.pid, "pid_started": None}))

    assert list_runs(runs_dir)[0]["status"] == "stale"
    assert record.effective_status() == "stale"
    listed = runner.invoke(app, ["list", "--runs-dir", str(runs_dir)])
    assert "stale" in listed.output and "running" not in listed.output
    live = create_run(runs_dir, name="alive", config={})
    assert {row["id"]: row["status"] for row in list_runs(runs_dir)}[live.id] == "running"


# --- links ---------------------------------------------------------------------------------------


def test_resume_refuses_a_run_dir_with_links_out_of_it(stopped, tmp_path):
    record = _copy_run(stopped, tmp_path / "runs")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (record.path / "model.safetensors").symlink_to(outside)

    result = runner.invoke(app, ["resume", record.id, "--runs-dir", str(tmp_path / "runs")])

    assert result.exit_code == 2
    assert "model.safetensors is a symbolic link" in " ".join(result.output.split())
    assert outside.read_text() == "keep me"


def test_run_dir_writes_replace_links_instead_of_following_them(tmp_path):
    from ribbed.report import write_report

    record = create_run(tmp_path / "runs", name="linked", config={})
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    for name in ("summary.json", "report.html", "metrics.jsonl"):
        (record.path / name).symlink_to(outside)

    record.finish("completed", {"steps": 0})
    write_report({"kind": "run", "name": "x", "created": "", "command": "", "baseline": "adamw",
                  "primary_metric": {"name": "test_acc", "mode": "max"}, "runs": [], "aggregates": []},
                 record.path)
    with pytest.raises(OSError):
        record.append_metrics({"step": 1})

    assert outside.read_text() == "keep me"
    assert not (record.path / "summary.json").is_symlink() and not (record.path / "report.html").is_symlink()


# --- the index -----------------------------------------------------------------------------------


def _damage_index(runs_dir: Path, how: str) -> None:
    data = index_path(runs_dir).read_bytes()
    for path in runs_dir.glob("index.sqlite-*"):
        path.unlink()
    if how == "zero-length":
        index_path(runs_dir).write_bytes(b"")
    elif how == "truncated":
        index_path(runs_dir).write_bytes(data[: len(data) // 2])
    else:
        index_path(runs_dir).write_bytes(os.urandom(len(data)))


@pytest.mark.parametrize("how", ["zero-length", "truncated", "garbage"])
def test_a_damaged_index_is_reported_moved_aside_and_rebuilt(how, tmp_path, caplog):
    runs_dir = tmp_path / "runs"
    records = [create_run(runs_dir, name=f"run {i}", config={"i": i}) for i in range(3)]
    records[0].finish("completed", {"steps": 3})
    for record in records:  # older than a moment: a missing row is damage, not a run being created
        os.utime(record.meta_path, (time.time() - 60, time.time() - 60))
    _damage_index(runs_dir, how)

    with caplog.at_level(logging.WARNING, logger="ribbed.runs"):
        rows = list_runs(runs_dir)

    assert sorted(row["id"] for row in rows) == sorted(r.id for r in records)
    assert {row["id"]: row["status"] for row in rows}[records[0].id] == "completed"
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(index_path(runs_dir)) in warning and "\n" not in warning
    if how != "zero-length":
        assert "damaged" in warning and list(runs_dir.glob("index.sqlite.damaged-*"))
    create_run(runs_dir, name="after", config={})  # a new run is still recorded
    assert len(list_runs(runs_dir)) == 4


def test_a_damaged_index_does_not_stop_a_new_run_and_index_rebuild_repairs(tmp_path):
    runs_dir = tmp_path / "runs"
    create_run(runs_dir, name="before", config={})
    _damage_index(runs_dir, "garbage")
    create_run(runs_dir, name="after", config={})
    assert len(list_runs(runs_dir)) == 2

    _damage_index(runs_dir, "garbage")
    checked = runner.invoke(app, ["index", "--runs-dir", str(runs_dir)])
    assert checked.exit_code == 2 and "is damaged (file is not a database)" in " ".join(checked.output.split())
    rebuilt = runner.invoke(app, ["index", "--rebuild", "--runs-dir", str(runs_dir)])
    assert rebuilt.exit_code == 0 and "from 2 run dirs" in rebuilt.output
    assert len(list_runs(runs_dir)) == 2


def test_listing_never_writes_and_falls_back_to_the_run_dirs(tmp_path, monkeypatch, caplog):
    runs_dir = tmp_path / "runs"
    record = create_run(runs_dir, name="one", config={})
    record.finish("completed", {"steps": 1})
    with sqlite3.connect(index_path(runs_dir)) as conn:  # leave no WAL behind
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = index_path(runs_dir).read_bytes()
    list_runs(runs_dir)
    assert index_path(runs_dir).read_bytes() == before

    import ribbed.runs.records as records

    def read_only(*args, **kwargs):
        raise OSError(f"run index {index_path(runs_dir)}: attempt to write a readonly database")

    monkeypatch.setattr(records, "select_ids", read_only)
    with caplog.at_level(logging.WARNING, logger="ribbed.runs"):
        (row,) = list_runs(runs_dir)
    assert row["id"] == record.id and row["status"] == "completed" and row["summary"]["steps"] == 1
    assert "reading the run dirs instead" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_runs_dir_lists_and_fails_runs_in_one_line(tmp_path):
    runs_dir = tmp_path / "runs"
    create_run(runs_dir, name="one", config={}).finish("completed", {"steps": 1})
    runs_dir.chmod(0o555)
    try:
        listed = runner.invoke(app, ["list", "--runs-dir", str(runs_dir)])
        assert listed.exit_code == 0 and "completed" in listed.output
        config = tmp_path / "tiny.yaml"
        config.write_text(yaml.safe_dump(tiny_dict()))
        ran = runner.invoke(app, ["run", str(config), "--runs-dir", str(runs_dir)])
        assert ran.exit_code == 2 and str(runs_dir) in ran.output and "Permission denied" in ran.output
    finally:
        runs_dir.chmod(0o755)


# --- broken run files ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("config.yaml", "train: [unclosed", "not valid YAML"),
    ("run.json", "", "empty file"),
    ("summary.json", "", "empty file"),
    ("summary.json", '{"status": "compl', "not valid JSON"),
    ("metrics.jsonl", "", "empty, though the run finished 40 steps"),
    ("metrics.jsonl", 'garbage\n', "metrics.jsonl:1: not a JSON row"),
])
def test_broken_run_files_are_named_in_one_line(name, content, problem, stopped, digits, tmp_path):
    record = _copy_run(stopped, tmp_path / "runs")
    train(build_run(_config(), digits), record=record, resume=True)
    (record.path / name).write_text(content)

    for command in ("report", "show", "compare"):
        if command == "show" and name == "metrics.jsonl":
            continue  # show prints the summary only
        result = runner.invoke(app, [command, record.id, "--runs-dir", str(tmp_path / "runs")])
        assert result.exit_code == 2, (command, result.output)
        text = " ".join(result.output.split())
        assert str(record.path / name) in text and problem in text, (command, text)
        assert result.exception is None or isinstance(result.exception, SystemExit)


# --- CIFAR-10 batches ----------------------------------------------------------------------------


def _cifar_dir(tmp_path: Path, batch: bytes) -> Path:
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        (directory / name).write_bytes(good)
    (directory / "data_batch_2").write_bytes(batch)
    return directory


def _huge_array_pickle() -> bytes:
    """A valid-looking batch whose array header asks numpy for 1 TiB (2**40 bytes)."""
    class Huge:
        def __reduce__(self):
            return (np.empty(0).__reduce__()[0], (np.ndarray, (2**28, 4096), b"B"))
    return pickle.dumps({b"data": Huge(), b"labels": [0]}, protocol=4)


@pytest.mark.parametrize(("batch", "problem"), [
    (_huge_array_pickle(), "2^40"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [{"a": 1}, {"b": 2}]}), "labels"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}), "3 labels for 2 images"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "0..9"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8"),
])
def test_a_hostile_cifar10_batch_is_refused_before_allocating(batch, problem, tmp_path):
    directory = _cifar_dir(tmp_path, batch)
    started = time.monotonic()
    with pytest.raises(DatasetError) as caught:
        load_dataset("cifar10", path=str(directory))
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert str(directory / "data_batch_2") in message and problem in message and "\n" not in message


def test_checkpoint_manifest_damage_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save({"step": 1}, 1)
    store.manifest_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json: unreadable"):
        store.load()


# --- configs -------------------------------------------------------------------------------------


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines, previous = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'], "l0"
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*{previous}'] * width)}]")
        previous = f"l{level}"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("name", "text", "problem"), [
    ("flow-lists.yaml", "train: " + "[" * 3000 + "]" * 3000, "config nested"),
    ("flow-maps.yaml", "train: " + "{a: " * 600 + "1" + "}" * 600, "config nested"),
    ("arrays.toml", "x = " + "[" * 2000 + "]" * 2000, "config nested"),
    ("tables.toml", "x = " + "{a = " * 600 + "1" + "}" * 600, "config nested"),
    ("bomb.yaml", _alias_bomb(), "expands to more than 100000 values"),
    ("duplicate.yaml", "name: a\ntrain: {steps: 5}\nname: b\n", "key 'name' appears twice"),
    ("inf.yaml", "optimizer: {name: adamw, lr: .inf}\n", "optimizer.lr"),
    ("nan.yaml", "train: {target: {metric: val_acc, value: .nan}}\n", "train.target.value"),
    ("metric.yaml", "kind: comparison\nname: c\nbaseline: a\nmetric: test_accuracy\n"
                    "methods: {a: {optimizer: {name: adamw}}}\n", "test_accuracy"),
])
def test_hostile_configs_are_refused_quickly_in_one_line(name, text, problem, tmp_path):
    from ribbed.config import ConfigError, load_config

    path = tmp_path / name
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert time.monotonic() - started < 2
    assert problem in str(caught.value)


def test_a_name_too_long_for_the_filesystem_is_a_config_error(tmp_path):
    result = runner.invoke(app, ["run", "x" * 300, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "File name too long" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("model", "problem"), [
    ({"name": "mlp", "options": {"hidden": [10**6, 10**6]}}, "parameters, about"),
    ({"name": "gpt", "options": {"n_embd": 2**62, "n_head": 1}}, "overflow"),
])
def test_absurd_model_sizes_are_refused_before_allocating(model, problem, tmp_path):
    data = {"name": "text-char"} if model["name"] == "gpt" else {"name": "digits"}
    config = RunConfig.model_validate(tiny_dict(data=data, model=model, train={"threads": 1}))
    started = time.monotonic()
    with pytest.raises(ValueError, match="model.options") as caught:
        build_run(config)
    assert time.monotonic() - started < 30 and problem in str(caught.value)


def test_unknown_trackers_are_refused_before_the_record_exists(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(trackers=["jsonl", "bogus"], train={"threads": 1})))
    result = runner.invoke(app, ["run", str(config), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "trackers: got ['bogus']" in result.output
    assert not list((tmp_path / "runs").glob("*/run.json"))


def test_booleans_are_not_numbers(tmp_path):
    from ribbed.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"steps: got True \(a boolean\); allowed: an integer"):
        load_config(tiny_dict(train={"steps": True}))
    with pytest.raises(ConfigError, match=r"checkpoint_every: got True .* an integer or 'eval' or null"):
        load_config(tiny_dict(train={"checkpoint_every": True}))
    assert load_config(tiny_dict(train={"stop_at_target": True})).train.stop_at_target is True


def test_a_finite_blow_up_is_divergence_and_fails_a_single_run(tmp_path):
    config = tmp_path / "blowup.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(optimizer={"name": "sgd", "lr": 30.0}, train={"threads": 1})))

    result = runner.invoke(app, ["run", str(config), "--runs-dir", str(tmp_path / "runs")])

    assert result.exit_code == 1, result.output
    (row,) = list_runs(tmp_path / "runs")
    summary = row["summary"]
    assert row["status"] == "diverged" and summary["diverged_at"] == EVAL_EVERY
    assert math.isfinite(open_run(tmp_path / "runs", row["id"]).read_metrics()[0]["train_loss"])
    assert f"{row['id']}: diverged at step {EVAL_EVERY}" in " ".join(result.output.split())
    unchecked = RunConfig.model_validate(tiny_dict(optimizer={"name": "sgd", "lr": 30.0},
                                                   train={"threads": 1, "divergence_factor": None}))
    assert train(build_run(unchecked)).status == "completed"  # the rule can be switched off


@pytest.mark.parametrize("defer", [True, False])
def test_sigterm_is_an_interrupt_not_a_kill(defer):
    from ribbed.train.interrupts import InterruptGuard

    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what an earlier in-process launcher left
    with InterruptGuard(defer=defer) as guard:
        if defer:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert guard.requested and guard.signum == signal.SIGTERM  # noted, acted on at the next step
        else:  # a distributed rank: at once
            with pytest.raises(KeyboardInterrupt, match="SIGTERM received"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before  # the guard restores the handler it replaced


@pytest.mark.slow
def test_resume_nproc_continues_a_distributed_run_on_two_processes(stopped, tmp_path):
    record = _copy_run(stopped, tmp_path / "runs")
    config = yaml.safe_load(record.config_path.read_text())
    config["train"]["distributed"] = {"strategy": "ddp"}  # as `ribbed run --nproc 2` would have recorded it
    record.config_path.write_text(yaml.safe_dump(config))
    before = record.read_metrics()

    out = runner.invoke(app, ["resume", record.id, "--nproc", "2", "--runs-dir", str(tmp_path / "runs")])

    assert out.exit_code == 0, out.output
    assert record.read_summary()["status"] == "completed"
    rows = record.read_metrics()
    assert [row["step"] for row in rows] == [10, 20, 30, 40]
    assert rows[:2] == before[:2]  # resumed from step 20 (its rows, times included, kept), not redone
    assert not list((tmp_path / "runs").glob("*/run.json"))[1:]  # rank 1 wrote to scratch only


def test_errors_are_one_line_and_debug_adds_the_traceback(tmp_path):
    plain = runner.invoke(app, ["show", "nope", "--runs-dir", str(tmp_path)])
    assert plain.exit_code == 2 and plain.output.count("\n") == 1 and "Traceback" not in plain.output
    debug = runner.invoke(app, ["--debug", "show", "nope", "--runs-dir", str(tmp_path)])
    assert debug.exit_code == 2 and "Traceback" in debug.output and "RunNotFound" in debug.output
    assert debug.output.rstrip().splitlines()[-1] == plain.output.rstrip()


def _two_seeds(context, steps: int = 20):
    """A study of two tiny runs (seeds 0 and 1), for the resume test below."""
    from ribbed.experiments.studies import StudyResult, Table

    rows = []
    for seed in (0, 1):
        config = RunConfig.model_validate(tiny_dict(seed=seed, train={"steps": steps, "eval_every": 10, "threads": 1}))
        record, result = context.train(config, method="adamw", label=f"seed {seed}")
        rows.append([seed, record.id, result.status, result.final.get("test_acc"), len(result.history)])
    return StudyResult(tables=[Table("runs", ["seed", "id", "status", "test_acc", "rows"], rows)])


def test_an_interrupted_study_resumes_reusing_its_finished_runs(tmp_path):
    from ribbed.config import config_from_dict
    from ribbed.experiments.studies import STUDIES, register_study, run_study

    if "fault-two-seeds" not in STUDIES.describe():
        register_study("fault-two-seeds", "two tiny runs")(_two_seeds)
    runs_dir = tmp_path / "runs"

    class CtrlCInSecondRun:
        def __init__(self):
            self.started = 0

        def start_run(self, label, steps):
            self.started += 1
            second = self.started == 2

            class Press:
                def after_step(self, step, batch):
                    if second and step + 1 == 12:
                        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the guard defers it to the step's end
            return Press()

        def end_run(self, label, entry):
            pass

        def message(self, text):
            pass

    study = config_from_dict({"kind": "study", "name": "two", "study": "fault-two-seeds"})
    with pytest.raises(KeyboardInterrupt):
        run_study(study, runs_dir=runs_dir, progress=CtrlCInSecondRun())
    (parent,) = list_runs(runs_dir, kind="study")
    assert parent["status"] == "interrupted"
    first, second = sorted(list_runs(runs_dir, parent=parent["id"]), key=lambda row: row["seed"])
    assert (first["status"], second["status"]) == ("completed", "interrupted")
    assert second["summary"]["step"] == 12
    first_summary = (Path(first["path"]) / "summary.json").read_bytes()

    result = runner.invoke(app, ["resume", parent["id"], "--runs-dir", str(runs_dir)])

    assert result.exit_code == 0, result.output
    assert f"reusing {first['id']}" in result.output
    children = {row["id"]: row for row in list_runs(runs_dir, parent=parent["id"])}
    assert set(children) == {first["id"], second["id"]} and {r["status"] for r in children.values()} == {"completed"}
    assert (Path(first["path"]) / "summary.json").read_bytes() == first_summary  # not retrained
    summary = open_run(runs_dir, parent["id"]).read_summary()
    assert summary["status"] == "completed"
    (table,) = summary["tables"]
    assert [row[1] for row in table["rows"]] == [first["id"], second["id"]]
    assert [row[4] for row in table["rows"]] == [2, 2] and all(row[3] > 0.3 for row in table["rows"])
