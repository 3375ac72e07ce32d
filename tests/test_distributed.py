"""Distributed strategies on 2 CPU processes (gloo) against single-process training.

One launch of ``ribbed.train.worker`` trains every case of :data:`CASES` on the same
tiny digits/MLP run (global batch 64, so each rank sees 32 rows); each case's per-step
losses must match the single-process run of the same config. Checkpoints cross the
boundary both ways, and killed or hanging ranks must fail the launch quickly and clearly.
"""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from ribbed.config import DistributedConfig, RunConfig
from ribbed.data import load_dataset
from ribbed.distributed import DistributedRunError, build_strategy, launch
from ribbed.distributed.communication import CommunicationCounter, sent_bytes
from ribbed.distributed.compression import sparsify
from ribbed.runs import create_run, list_runs, open_run
from ribbed.train import build_run, train
from tests import processes
from tests.conftest import tiny_dict

STEPS = 4
EXACT = 1e-5

# label -> (train.distributed settings, other sections, loss tolerance vs one process)
CASES = {
    "ddp": ({"strategy": "ddp"}, {}, EXACT),
    "ddp-accum": ({"strategy": "ddp"}, {"train": {"grad_accum": 2}}, EXACT),
    "zero1": ({"strategy": "zero1"}, {"train": {"clip_grad_norm": 0.5}}, EXACT),
    "zero2": ({"strategy": "zero2"}, {}, EXACT),
    "zero3": ({"strategy": "zero3"}, {"train": {"clip_grad_norm": 0.5}}, EXACT),
    "zero3-fsdp": ({"strategy": "zero3", "options": {"engine": "fsdp"}},
                   {"train": {"clip_grad_norm": 0.5}}, EXACT),
    # fp16 keeps ~3 significant digits of each gradient and bf16 ~2; AdamW normalises the
    # step, so the loss moves by at most ~lr per step more than the exact run.
    "fp16": ({"strategy": "ddp", "compression": "fp16"}, {}, 1e-3),
    "bf16": ({"strategy": "ddp", "compression": "bf16"}, {}, 2e-2),
    # sending every entry is exactly an all-reduce; PowerSGD at rank 1 is an approximation.
    "topk-all": ({"strategy": "ddp", "compression": "topk", "compression_options": {"ratio": 1.0}},
                 {}, EXACT),
    "topk": ({"strategy": "ddp", "compression": "topk", "compression_options": {"ratio": 0.1}},
             {}, 0.2),
    "powersgd": ({"strategy": "ddp", "compression": "powersgd"}, {}, 0.2),
}
CHECKPOINT_CASES = ("zero3", "zero1")
# A run cut at half its steps must see the learning rates of the full run: constant schedule.
CONSTANT = {"schedule": {"kind": "constant", "warmup_steps": 0}}
def case_config(distributed: dict, sections: dict, **train) -> RunConfig:
    doc = tiny_dict(optimizer={"name": "adamw", "lr": 0.01},
                    train={"steps": STEPS, "eval_every": 1, **train})
    for key, value in sections.items():
        doc[key] = {**doc[key], **value}
    doc["train"]["distributed"] = distributed
    return RunConfig.model_validate(doc)


def single_process(config: RunConfig) -> RunConfig:
    """The same run on one process (the default ``none`` strategy)."""
    return config.model_copy(update={"train": config.train.model_copy(
        update={"distributed": DistributedConfig()})})


def losses(history) -> list[float]:
    return [row["train_loss"] for row in history]


def write_config(path, config: RunConfig) -> str:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return str(path)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, digits):
    """Train every case (and the checkpoint round trips) in one 2-process launch."""
    root = tmp_path_factory.mktemp("distributed")
    runs = root / "runs"
    args = ["--runs-dir", str(runs)]
    for label, (distributed, sections, _) in CASES.items():
        args += ["--run", f"{label}={write_config(root / f'{label}.yaml', case_config(distributed, sections))}"]
    for label in CHECKPOINT_CASES:
        distributed = CASES[label][0]
        # distributed -> single: a distributed run that checkpoints half-way
        config = case_config(distributed, CONSTANT, checkpoint_every=STEPS // 2, steps=STEPS // 2)
        args += ["--run", f"{label}-to-single={write_config(root / f'{label}-half.yaml', config)}"]
        # single -> distributed: a single-process record, resumed on two ranks
        halfway = single_process(config)
        record = create_run(runs, name="halfway", config=halfway.model_dump(mode="json"),
                            method=f"single-to-{label}")
        train(build_run(halfway, digits), record=record)
        resumed = case_config(distributed, CONSTANT, checkpoint_every=STEPS // 2)
        record.path.joinpath("config.yaml").write_text(yaml.safe_dump(resumed.model_dump(mode="json")))
        args += ["--run", f"single-to-{label}={write_config(root / f'{label}-full.yaml', resumed)}",
                 "--resume", f"single-to-{label}={record.path}"]
    launch(args, nproc=2, module="ribbed.train.worker")
    return {row["method"]: open_run(runs, row["id"]) for row in list_runs(runs, limit=1000)}


@pytest.mark.parametrize("label", list(CASES))
def test_strategy_follows_the_single_process_loss(launched, digits, label):
    distributed, sections, tolerance = CASES[label]
    config = case_config(distributed, sections)
    expected = train(build_run(single_process(config), digits), evaluate_test=False)
    record = launched[label]
    assert record.read_summary()["status"] == "completed"
    got = record.read_metrics()
    assert len(got) == STEPS
    for step, (ours, reference) in enumerate(zip(losses(got), losses(expected.history), strict=True)):
        assert abs(ours - reference) <= tolerance, (label, step, ours, reference)
    if tolerance > EXACT:  # compression must actually change something, or the test is vacuous
        assert any(abs(a - b) > 1e-7 for a, b in zip(losses(got), losses(expected.history), strict=True))
    assert got[-1]["val_loss"] == pytest.approx(expected.history[-1]["val_loss"], abs=max(tolerance, 1e-5))


def test_each_rank_reports_memory_and_communication(launched):
    rows = {label: launched[label].read_metrics()[-1] for label in CASES}
    for label, row in rows.items():
        assert row["comm_mb_per_step"] > 0, label
        assert row["mem_model_state_mb"] > 0, label
    ddp, zero1, zero3 = rows["ddp"], rows["zero1"], rows["zero3"]
    # ZeroRedundancyOptimizer partitions whole tensors, so the busiest rank holds more than half
    assert zero1["mem_optim_mb"] < 0.7 * ddp["mem_optim_mb"]
    assert zero1["mem_params_mb"] == ddp["mem_params_mb"] and zero1["mem_grads_mb"] == ddp["mem_grads_mb"]
    assert zero3["mem_model_state_mb"] <= 0.55 * ddp["mem_model_state_mb"]
    assert rows["fp16"]["comm_mb_per_step"] == pytest.approx(ddp["comm_mb_per_step"] / 2, rel=0.01)
    assert rows["topk"]["comm_mb_per_step"] < ddp["comm_mb_per_step"] / 2
    assert rows["powersgd"]["comm_mb_per_step"] < ddp["comm_mb_per_step"] / 2


@pytest.mark.parametrize("label", CHECKPOINT_CASES)
def test_checkpoints_cross_between_distributed_and_single_process(launched, digits, label):
    distributed = CASES[label][0]
    reference = losses(train(build_run(single_process(case_config(distributed, CONSTANT)), digits),
                             evaluate_test=False).history)
    # distributed checkpoint -> single-process resume, to the end
    halfway = launched[f"{label}-to-single"]
    continued = single_process(case_config(distributed, CONSTANT, checkpoint_every=STEPS // 2))
    halfway.path.joinpath("config.yaml").write_text(yaml.safe_dump(continued.model_dump(mode="json")))
    resumed = train(build_run(continued, digits), record=halfway, resume=True)
    # single-process checkpoint -> distributed resume, to the end
    crossed = launched[f"single-to-{label}"]
    assert crossed.read_summary()["status"] == "completed"
    for history in (resumed.history, crossed.read_metrics()):
        assert len(history) == STEPS
        for ours, expected in zip(losses(history), reference, strict=True):
            assert ours == pytest.approx(expected, abs=EXACT)


def _failing_launch(tmp_path, fault: str, timeout_s: float) -> tuple[str, float]:
    config = case_config({"strategy": "ddp", "timeout_s": timeout_s}, {}, steps=200, plugins=[
        {"name": "test-fault", "options": {"fault": fault, "at_step": 3}}])
    path = write_config(tmp_path / "fault.yaml", config)
    started = time.perf_counter()
    with pytest.raises(DistributedRunError) as info:
        launch(["--runs-dir", str(tmp_path / "runs"), "--run", f"fault={path}"], nproc=2,
               module="tests.test_distributed")
    return str(info.value), time.perf_counter() - started


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_clearly_and_quickly(tmp_path):
    message, seconds = _failing_launch(tmp_path, "kill", timeout_s=300)
    assert "rank 1" in message and "SIGKILL" in message
    assert "the other ranks were stopped" in message
    quickly = processes.limit(60, starts=2, work_s=2)  # two ranks start; far below the 300-s collective timeout
    assert seconds < min(quickly.seconds, 150), f"{seconds:.0f} s; allowed {quickly}, at most 150 s"


@pytest.mark.slow
def test_a_hanging_rank_times_out_instead_of_hanging(tmp_path):
    message, seconds = _failing_launch(tmp_path, "hang", timeout_s=2)
    assert "rank 0" in message and "exited with code 1" in message
    quickly = processes.limit(60, starts=2, work_s=4)
    assert seconds < quickly.seconds, f"{seconds:.0f} s; allowed {quickly}"


# --------------------------------------------------------------- pieces, in one process


def test_a_distributed_strategy_outside_a_launch_says_how_to_launch():
    config = case_config({"strategy": "ddp"}, {})
    with pytest.raises(ValueError, match=r"train.distributed.strategy.*--nproc N"):
        build_run(config)


def test_unknown_strategy_option_and_compression_are_named():
    with pytest.raises(ValueError, match=r"train.distributed.strategy: unknown .* 'zero9'.*allowed: .*zero3"):
        build_strategy(DistributedConfig(strategy="zero9"))
    with pytest.raises(ValueError, match=r"train.distributed.options: unknown option\(s\) \['stage'\].*engine"):
        build_strategy(DistributedConfig(strategy="zero3", options={"stage": 3}))
    with pytest.raises(ValueError, match=r"engine.*'fsdp3'.*allowed: fsdp2, fsdp"):
        build_strategy(DistributedConfig(strategy="zero3", options={"engine": "fsdp3"}))
    with pytest.raises(ValueError, match=r"compression: got 'fp16' with strategy 'zero3'; allowed: 'none'.*ddp, zero1"):
        build_strategy(DistributedConfig(strategy="zero3", compression="fp16"))
    from ribbed.distributed.compression import COMPRESSIONS

    with pytest.raises(ValueError, match=r"train.distributed.compression: unknown .* 'zip'.*allowed: .*topk"):
        COMPRESSIONS.build("zip")
    with pytest.raises(ValueError, match=r"ratio: got 0; allowed: 0 < ratio <= 1"):
        COMPRESSIONS.build("topk", ratio=0)


@pytest.mark.parametrize("k", [1, 7, 100])
def test_sparsify_keeps_the_largest_entries_and_loses_nothing(k):
    tensor = torch.randn(100, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    indices, values, rest = sparsify(tensor, k)
    assert torch.equal(rest.index_add(0, indices, values), tensor)
    assert values.abs().min() >= rest.abs().max()
    assert int((rest != 0).sum()) == 100 - k


def test_sent_bytes_follow_each_collective_kind():
    ops = torch.ops.c10d
    x = torch.zeros(10)  # 40 bytes
    assert sent_bytes(ops.allreduce_.default, ([x, x], None, None, None, False, 0), {}) == 80
    assert sent_bytes(ops._allgather_base_.default, (torch.zeros(20), x, None, False, 0), {}) == 40
    assert sent_bytes(ops._reduce_scatter_base_.default, (x[:5], x, None, None, False, 0), {}) == 40
    assert sent_bytes(ops.recv_.default, ([x], None, 0, 0), {}) == 0
    assert isinstance(CommunicationCounter().total_bytes, int)


# --------------------------------------------------------------- the fault worker


class FaultAt:
    """A plug-in that makes rank 1 die (``kill``) or stop answering (``hang``) at a step."""

    def __init__(self, fault: str, at_step: int):
        self.fault, self.at_step = fault, at_step

    def attach(self, parts):
        self.rank = parts.strategy.rank

    def before_step(self, step, batch):
        import os
        import signal

        if self.rank == 1 and step == self.at_step:
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)

    def after_step(self, step, batch): ...

    def metrics(self):
        return {}

    def state_dict(self):
        return {}


if __name__ == "__main__":
    from ribbed.train import register_plugin
    from ribbed.train.worker import main

    register_plugin("test-fault", "kill or hang rank 1 at a step (tests only)")(FaultAt)
    main()
