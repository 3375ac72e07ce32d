"""Pipeline and tensor parallelism, and RIBBED under DDP, on 2 CPU processes (gloo).

One launch of this module as a ``ribbed.train.worker`` trains every case of
:data:`CASES` and the checkpoint round trips; each case's per-step losses must match the
single-process run of the same config with the same global batch:

* ``pipeline`` (GPipe, 1F1B) on the digits MLP and on the small GPT, whose tied embedding
  and LM head sit on different stages: up to :data:`PIPELINE` (micro-batches change the
  order of the gradient sums, nothing else);
* ``tensor`` on the small GPT: within :data:`EXACT`, as the issue asks;
* ``ddp`` with RIBBED: within :data:`RIBBED_DDP`, and its controllers identical on both ranks.
"""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch
import yaml

from ribbed.config import DistributedConfig, RunConfig
from ribbed.data import load_dataset
from ribbed.distributed import build_strategy, launch
from ribbed.distributed.communication import sent_bytes
from ribbed.distributed.pipeline import check_microbatches, check_split_points, even_split_points
from ribbed.distributed.strategy import require_backprop_fp32, require_whole_neurons
from ribbed.distributed.tensor_parallel import check_parallelisable, head_major_rows
from ribbed.nn import build_model
from ribbed.runs import create_run, list_runs, open_run
from ribbed.train import build_run, train
from tests.conftest import tiny_dict

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
EXACT = 1e-5
# Pipelining adds each gradient up over micro-batches: the same numbers added in another
# order, a few float32 ulps per step (measured: at most 5e-7 over these 4 steps).
PIPELINE = 1e-5
# RIBBED's activation features are averaged over the ranks' half-batches instead of taken
# over the whole batch (the mean agrees, the variance and entropy do not), so the step
# multipliers, and through them the losses, differ slightly. The residual controllers follow
# their features (the first design's saturated at a bound and did not): measured 1.1e-3 on the
# last validation loss (2.2171 against 2.2182) with features refreshed at every step.
RIBBED_DDP = 3e-3
TEXT_CHARS = 12_000

GPT = {"data": {"name": "text-char", "batch_size": 8, "val_fraction": 0.1,
                "options": {"block_size": 16, "path": None}},
       "model": {"name": "gpt", "options": {"n_layer": 2, "n_head": 4, "n_embd": 32}}}
RIBBED = {"optimizer": {"name": "ribbed", "lr": 0.01,
                        "options": {"feature_every": 1, "routing_every": 2}}}
CLIP = {"train": {"clip_grad_norm": 0.5}}

# label -> (train.distributed settings, other sections, loss tolerance vs one process)
CASES = {
    "gpipe-mlp": ({"strategy": "pipeline", "options": {"schedule": "gpipe", "microbatches": 4}},
                  {}, PIPELINE),
    "1f1b-mlp": ({"strategy": "pipeline", "options": {"schedule": "1f1b", "microbatches": 2}},
                 CLIP, PIPELINE),
    "gpipe-gpt": ({"strategy": "pipeline", "options": {"schedule": "gpipe", "microbatches": 2}},
                  {**GPT, "train": {"grad_accum": 2}}, PIPELINE),
    "1f1b-gpt": ({"strategy": "pipeline", "options": {"schedule": "1f1b", "microbatches": 4}},
                 {**GPT, **CLIP}, PIPELINE),
    "tensor-gpt": ({"strategy": "tensor"}, {**GPT, **CLIP}, EXACT),
    "ribbed-ddp": ({"strategy": "ddp"}, RIBBED, RIBBED_DDP),
}
CHECKPOINT_CASES = ("1f1b-gpt", "tensor-gpt")
CONSTANT = {"schedule": {"kind": "constant", "warmup_steps": 0}}
@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small slice of Python's bundled pydoc text: a GPT corpus that evaluates quickly."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("".join(pydoc_data.topics.topics.values())[:TEXT_CHARS])
    return str(path)


def case_config(distributed: dict, sections: dict, text: str, **train) -> RunConfig:
    doc = tiny_dict(optimizer={"name": "adamw", "lr": 0.01},
                    train={"steps": STEPS, "eval_every": 1, **train})
    for key, value in sections.items():
        doc[key] = {**doc[key], **value} if key != "data" else value
    if doc["data"]["name"] == "text-char":
        doc["data"] = {**doc["data"], "options": {**doc["data"]["options"], "path": text}}
    doc["train"]["distributed"] = distributed
    return RunConfig.model_validate(doc)


def single_process(config: RunConfig) -> RunConfig:
    """The same run on one process, without test plug-ins."""
    return config.model_copy(update={"train": config.train.model_copy(
        update={"distributed": DistributedConfig(), "plugins": []})})


def losses(history) -> list[float]:
    return [row["train_loss"] for row in history]


def write_config(path, config: RunConfig) -> str:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return str(path)


def ribbed_case(text: str, state_dir) -> RunConfig:
    distributed, sections, _ = CASES["ribbed-ddp"]
    return case_config(distributed, sections, text,
                       plugins=[{"name": "test-save-controllers", "options": {"directory": str(state_dir)}}])


@pytest.fixture(scope="module")
def launched(tmp_path_factory, text_file):
    """Train every case and the checkpoint round trips (both ways) in one 2-process launch."""
    root = tmp_path_factory.mktemp("parallel")
    runs = root / "runs"
    args = ["--runs-dir", str(runs)]
    for label, (distributed, sections, _) in CASES.items():
        config = (ribbed_case(text_file, root / "controllers") if label == "ribbed-ddp"
                  else case_config(distributed, sections, text_file))
        args += ["--run", f"{label}={write_config(root / f'{label}.yaml', config)}"]
    for label in CHECKPOINT_CASES:
        distributed, sections, _ = CASES[label]
        # parallel -> single: a parallel run that checkpoints half-way
        half = case_config(distributed, {**sections, **CONSTANT}, text_file,
                           checkpoint_every=STEPS // 2, steps=STEPS // 2)
        args += ["--run", f"{label}-to-single={write_config(root / f'{label}-half.yaml', half)}"]
        # single -> parallel: a single-process record, resumed on two ranks
        record = create_run(runs, name="halfway", config=single_process(half).model_dump(mode="json"),
                            method=f"single-to-{label}")
        train(build_run(single_process(half)), record=record)
        resumed = case_config(distributed, {**sections, **CONSTANT}, text_file, checkpoint_every=STEPS // 2)
        record.path.joinpath("config.yaml").write_text(yaml.safe_dump(resumed.model_dump(mode="json")))
        args += ["--run", f"single-to-{label}={write_config(root / f'{label}-full.yaml', resumed)}",
                 "--resume", f"single-to-{label}={record.path}"]
    launch(args, nproc=2, module="tests.test_distributed_parallel")
    records = {row["method"]: open_run(runs, row["id"]) for row in list_runs(runs, limit=1000)}
    return records, root / "controllers"


@pytest.mark.parametrize("label", list(CASES))
def test_parallel_strategy_follows_the_single_process_loss(launched, text_file, label):
    distributed, sections, tolerance = CASES[label]
    config = case_config(distributed, sections, text_file)
    expected = train(build_run(single_process(config)), evaluate_test=False).history
    record = launched[0][label]
    assert record.read_summary()["status"] == "completed"
    got = record.read_metrics()
    assert len(got) == STEPS
    for step, (ours, reference) in enumerate(zip(losses(got), losses(expected), strict=True)):
        assert abs(ours - reference) <= tolerance, (label, step, ours, reference)
    assert got[-1]["val_loss"] == pytest.approx(expected[-1]["val_loss"], abs=tolerance)


def test_each_rank_holds_its_part_of_the_model(launched):
    """Per-rank memory shows the split: a pipeline stage has gradients and optimiser state for
    its own layers only; tensor parallelism holds half of each block's big matrices."""
    records = launched[0]
    ddp = records["ribbed-ddp"].read_metrics()[-1]
    single_mlp_params = ddp["mem_params_mb"]
    for label in ("gpipe-mlp", "1f1b-mlp"):
        row = records[label].read_metrics()[-1]
        assert row["mem_params_mb"] == pytest.approx(single_mlp_params)  # the replica
        assert row["mem_grads_mb"] < 0.8 * row["mem_params_mb"]
        assert row["mem_optim_mb"] < 0.8 * 2 * row["mem_params_mb"]
        assert row["comm_mb_per_step"] > 0
    pipelined, tensor = records["1f1b-gpt"].read_metrics()[-1], records["tensor-gpt"].read_metrics()[-1]
    assert tensor["mem_params_mb"] < 0.8 * pipelined["mem_params_mb"]
    # Megatron: one all-reduce of the [8, 16, 32] float32 activations per sub-layer forward,
    # and one of their gradient backward: 2 blocks x 2 sub-layers x 2 = 8 x 16 KiB per step
    # (plus the few bytes of the gradient-norm reductions of clipping).
    assert tensor["comm_mb_per_step"] == pytest.approx(8 * 16 / 1024, rel=0.05)


def test_ribbed_controllers_are_identical_on_every_rank(launched):
    directory = launched[1]
    rank0, rank1 = (torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert rank0["bank"].keys() == rank1["bank"].keys()
    for name, tensor in rank0["bank"].items():
        assert torch.equal(tensor, rank1["bank"][name]), name
    assert torch.equal(rank0["multiplier"], rank1["multiplier"])
    assert torch.equal(rank0["assignment"], rank1["assignment"])
    assert not torch.equal(rank0["multiplier"], torch.ones_like(rank0["multiplier"]))  # it learned


@pytest.mark.parametrize("label", CHECKPOINT_CASES)
def test_checkpoints_cross_between_parallel_and_single_process(launched, text_file, label):
    distributed, sections, _ = CASES[label]
    full = case_config(distributed, {**sections, **CONSTANT}, text_file, checkpoint_every=STEPS // 2)
    reference = losses(train(build_run(single_process(full)), evaluate_test=False).history)
    # parallel checkpoint -> single-process resume, to the end
    halfway = launched[0][f"{label}-to-single"]
    halfway.path.joinpath("config.yaml").write_text(yaml.safe_dump(single_process(full).model_dump(mode="json")))
    resumed = train(build_run(single_process(full)), record=halfway, resume=True)
    # single-process checkpoint -> parallel resume, to the end
    crossed = launched[0][f"single-to-{label}"]
    assert crossed.read_summary()["status"] == "completed"
    for history in (resumed.history, crossed.read_metrics()):
        assert len(history) == STEPS
        for ours, expected in zip(losses(history), reference, strict=True):
            assert ours == pytest.approx(expected, abs=CASES[label][2])


# --------------------------------------------------------------- pieces, in one process


def _gpt(**options):
    return build_model("gpt", input_shape=(8,), num_classes=11, task="language-modeling",
                       **{"n_layer": 2, "n_head": 4, "n_embd": 16, **options})


def _mlp():
    return build_model("mlp", input_shape=(8,), num_classes=3, task="classification", hidden=[4, 4])


def test_head_major_rows_give_each_shard_whole_heads_of_q_k_and_v():
    n_embd, shards = 8, 2  # 4 heads of 2 rows in each of q, k, v
    rows = head_major_rows(n_embd, shards)
    assert sorted(rows.tolist()) == list(range(3 * n_embd))
    q, k, v = (torch.arange(part * n_embd, (part + 1) * n_embd) for part in range(3))
    half = n_embd // shards
    assert rows[:3 * half].tolist() == [*q[:half].tolist(), *k[:half].tolist(), *v[:half].tolist()]
    assert rows[3 * half:].tolist() == [*q[half:].tolist(), *k[half:].tolist(), *v[half:].tolist()]
    assert torch.equal(rows[torch.argsort(rows)], torch.arange(3 * n_embd))


def test_dtensor_collectives_are_counted_once():
    """DTensor communicates through ``_c10d_functional`` ops; their wrappers send nothing."""
    functional = torch.ops._c10d_functional
    x = torch.zeros(10)  # 40 bytes
    assert sent_bytes(functional.all_reduce.default, (x, "sum", "0"), {}) == 40
    assert sent_bytes(functional.all_gather_into_tensor.default, (x, 2, "0"), {}) == 40
    assert sent_bytes(functional.wait_tensor.default, (x,), {}) == 0
    assert sent_bytes(functional._wrap_tensor_autograd.default, (x,), {}) == 0


def test_even_split_points_spread_the_blocks():
    assert even_split_points(_gpt(n_layer=4), 2) == ["blocks.2"]
    assert even_split_points(_gpt(n_layer=4), 4) == ["blocks.1", "blocks.2", "blocks.3"]


def test_bad_pipeline_settings_are_named():
    with pytest.raises(ValueError, match=r"schedule: got 'zb'; allowed: gpipe, 1f1b"):
        build_strategy(DistributedConfig(strategy="pipeline", options={"schedule": "zb"}))
    with pytest.raises(ValueError, match=r"microbatches: got 0; allowed: an integer >= 1"):
        build_strategy(DistributedConfig(strategy="pipeline", options={"microbatches": 0}))
    with pytest.raises(ValueError, match=r"split_points: got 'blocks.1'; allowed: a list"):
        build_strategy(DistributedConfig(strategy="pipeline", options={"split_points": "blocks.1"}))
    with pytest.raises(ValueError, match=r"3 pipeline stages .* need at least 3 blocks.* has 2 in model.blocks"):
        even_split_points(_mlp(), 3)
    with pytest.raises(ValueError, match=r"split_points: got \['blocks.9'\] for 2 stages.*\['blocks.9'\] are not"):
        check_split_points(_mlp(), ["blocks.9"], 2)
    with pytest.raises(ValueError, match=r"split_points: got \['blocks.1', 'head'\] for 2 stages; allowed: 1 "):
        check_split_points(_mlp(), ["blocks.1", "head"], 2)
    with pytest.raises(ValueError, match=r"microbatches: got 3; allowed: a divisor of .* = 64"):
        check_microbatches("gpipe", 3, 64, 2)
    with pytest.raises(ValueError, match=r"microbatches: got 2 with schedule '1f1b'; allowed: at least .* \(4\)"):
        check_microbatches("1f1b", 2, 64, 4)
    with pytest.raises(ValueError, match=r"'pipeline' needs at least 2 ranks"):
        check_microbatches("gpipe", 2, 64, 1)


def test_bad_tensor_parallel_settings_are_named():
    with pytest.raises(ValueError, match=r"model.options.n_head: got 4; allowed .* 3 ranks: a multiple of 3"):
        check_parallelisable(_gpt(n_head=4, n_embd=12), 3)
    with pytest.raises(ValueError, match=r"model.name: got MLP; allowed with strategy 'tensor': gpt"):
        check_parallelisable(_mlp(), 2)
    with pytest.raises(ValueError,
                       match=r"feed_forward: block 0 has MoEFeedForward; allowed with strategy 'tensor': mlp"):
        check_parallelisable(_gpt(feed_forward="moe"), 2)
    check_parallelisable(_gpt(), 2)


def test_model_splitting_strategies_refuse_what_they_do_not_support(tiny_config):
    from ribbed.core import RIBBED
    from ribbed.optim import build_optimizer

    with pytest.raises(ValueError,
                       match=r"optimizer.name: got 'ribbed' with strategy 'tensor'.*allowed with ribbed: strategy ddp"):
        require_whole_neurons(RIBBED(_mlp(), lr=0.01), "ribbed", "tensor")
    wrapped = build_optimizer("trust_ratio", _mlp(), lr=0.01, base="ribbed")  # declares what its base needs
    with pytest.raises(ValueError, match=r"optimizer.name: got 'trust_ratio' with strategy 'zero3'"):
        require_whole_neurons(wrapped, "trust_ratio", "zero3")
    require_whole_neurons(torch.optim.AdamW(_mlp().parameters()), "adamw", "tensor")
    with pytest.raises(ValueError, match=r"train.precision: got 'bf16'; allowed with strategy 'pipeline': 'fp32'"):
        require_backprop_fp32(tiny_config(train={"precision": "bf16"}), "pipeline")
    config = tiny_config(train={"gradient_method": "forward-gradient",
                                "distributed": {"strategy": "tensor"}})
    with pytest.raises(ValueError,
                       match=r"train.gradient_method: got 'forward-gradient'; allowed with strategy 'tensor'"):
        build_run(config, load_dataset("digits"))


# --------------------------------------------------------------- the worker


class SaveControllers:
    """A plug-in that saves each rank's RIBBED controllers after the last step."""

    def __init__(self, directory: str):
        self.directory = directory

    def attach(self, parts):
        self.rank, self.optimizer, self.last = parts.strategy.rank, parts.optimizer, parts.config.train.steps - 1

    def before_step(self, step, batch): ...

    def after_step(self, step, batch):
        if step == self.last:
            from pathlib import Path

            Path(self.directory).mkdir(parents=True, exist_ok=True)
            controllers = self.optimizer.controllers
            torch.save({"bank": controllers.bank.state_dict(), "multiplier": controllers.multiplier,
                        "assignment": controllers.clusters.assignment},
                       Path(self.directory) / f"rank{self.rank}.pt")

    def metrics(self):
        return {}

    def state_dict(self):
        return {}


if __name__ == "__main__":
    from ribbed.train import register_plugin
    from ribbed.train.worker import main

    register_plugin("test-save-controllers", "save each rank's RIBBED controllers (tests only)")(SaveControllers)
    main()
