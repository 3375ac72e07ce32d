"""The ZeRO comparison (``zero-compare``): DDP against ZeRO-1/2/3 on 2 and 4 processes.

For each process count, one launch of :mod:`ribbed.train.worker` trains the same run
under every strategy (torch's ZeroRedundancyOptimizer and FSDP / FSDP2, and DeepSpeed's
ZeRO stages when the ``deepspeed`` extra is installed), each a child record of the study.
Each run's metrics carry what the strategy measured on the busiest rank: bytes of
parameters, gradients and optimiser state held (peak over steps), step time, and bytes
handed to collectives per step. The study tabulates them with the ratio of model-state
memory to DDP's at the same process count and plots memory and step time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from ribbed.config import RunConfig, deep_merge
from ribbed.distributed.launch import launch
from ribbed.experiments.studies import FigureSpec, StudyResult, Table, register_study
from ribbed.report.plots import method_colors
from ribbed.runs import list_runs, open_run

__all__ = ["DEFAULT_STRATEGIES", "default_strategies", "measure_strategies", "zero_compare"]

# label -> train.distributed settings
DEFAULT_STRATEGIES: dict[str, dict[str, Any]] = {
    "ddp": {"strategy": "ddp"},
    "zero1": {"strategy": "zero1"},
    "zero2 (fsdp2)": {"strategy": "zero2"},
    "zero3 (fsdp2)": {"strategy": "zero3"},
    "zero2 (fsdp)": {"strategy": "zero2", "options": {"engine": "fsdp"}},
    "zero3 (fsdp)": {"strategy": "zero3", "options": {"engine": "fsdp"}},
}
DEEPSPEED_STRATEGIES: dict[str, dict[str, Any]] = {
    f"deepspeed stage {stage}": {"strategy": "deepspeed", "options": {"stage": stage}}
    for stage in (1, 2, 3)
}
MEMORY_KEYS = ("mem_params_mb", "mem_grads_mb", "mem_optim_mb")


def default_strategies() -> dict[str, dict[str, Any]]:
    """The torch strategies, plus DeepSpeed's ZeRO stages when DeepSpeed is installed."""
    if importlib.util.find_spec("deepspeed") is None:
        return dict(DEFAULT_STRATEGIES)
    return {**DEFAULT_STRATEGIES, **DEEPSPEED_STRATEGIES}


def measure_strategies(
    base: dict[str, Any], strategies: dict[str, dict[str, Any]], nproc: int, *,
    runs_dir: Path, work_dir: Path, parent: str | None = None,
) -> dict[str, dict[str, float]]:
    """Train ``base`` under each strategy on ``nproc`` processes; each run's last metrics row."""
    args = ["--runs-dir", str(runs_dir)] + (["--parent", parent] if parent else [])
    labels: dict[str, str] = {}
    for label, distributed in strategies.items():
        doc = deep_merge(base, {"name": f"zero-compare-{nproc}", "train": {"distributed": distributed}})
        config = RunConfig.model_validate(doc)  # reject a bad setting before launching
        method = f"{label} x{nproc}"
        path = work_dir / f"{len(labels):02d}-{nproc}.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
        args += ["--run", f"{method}={path}"]
        labels[method] = label
    launch(args, nproc, module="ribbed.train.worker")
    ids = {row["method"]: row["id"] for row in list_runs(runs_dir, parent=parent, limit=None)}
    rows = {}
    for method, label in labels.items():  # in the order the strategies were given
        record = open_run(runs_dir, ids[method])
        rows[label] = {**record.read_metrics()[-1], "run": record.id}
    return rows


@register_study("zero-compare", "DDP vs ZeRO-1/2/3 (torch and DeepSpeed): per-rank memory, step time, bytes sent")
def zero_compare(
    context, *, run: dict[str, Any], nprocs: Sequence[int] = (2, 4),
    strategies: dict[str, dict[str, Any]] | None = None,
) -> StudyResult:
    """``run``: the base run config (its ``train.distributed`` is set per strategy);
    ``nprocs``: process counts; ``strategies``: label -> ``train.distributed`` settings
    (default: :func:`default_strategies`)."""
    strategies = dict(strategies) if strategies else default_strategies()
    if "ddp" not in strategies:
        raise ValueError(f"strategies: got {sorted(strategies)}; allowed: any set that includes 'ddp' (the baseline)")
    results: dict[int, dict[str, dict[str, float]]] = {}
    for nproc in nprocs:
        context.message(f"zero-compare: {len(strategies)} strategies on {nproc} processes")
        results[nproc] = measure_strategies(
            run, strategies, nproc, runs_dir=context.runs_dir, work_dir=context.artifacts,
            parent=context.record.id,
        )
    table_rows = []
    for nproc, by_label in results.items():
        ddp_total = by_label["ddp"]["mem_model_state_mb"]
        for label, row in by_label.items():
            table_rows.append([
                label, nproc, *(round(row[key], 4) for key in MEMORY_KEYS),
                round(row["mem_model_state_mb"], 4), round(row["mem_model_state_mb"] / ddp_total, 3),
                round(row["step_seconds"] * 1e3, 2), round(row["comm_mb_per_step"], 4),
                round(row["val_loss"], 4), row["run"],
            ])
    table = Table(
        "Per-rank model state (busiest rank), step time and bytes sent",
        ["strategy", "processes", "params MB", "grads MB", "optimizer MB", "model state MB",
         "x DDP", "step ms", "sent MB/step", "val loss", "run"],
        table_rows,
        note="Memory: bytes of the distinct storages each rank holds, peak over steps, largest "
             "rank. Sent: tensor bytes this rank handed to collectives per step (payload, not "
             "wire traffic). Step time: mean over the last evaluation window, processes sharing "
             "this machine's cores.",
    )
    return StudyResult(
        tables=[table],
        figures=[_memory_figure(results), _time_figure(results)],
        findings=_findings(results),
        data={str(nproc): rows for nproc, rows in results.items()},
    )


def _findings(results: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    lines = []
    for nproc, by_label in results.items():
        ddp = by_label["ddp"]
        for label, row in by_label.items():
            if label == "ddp":
                continue
            lines.append(
                f"{nproc} processes, {label}: model state {row['mem_model_state_mb'] / ddp['mem_model_state_mb']:.2f}x "
                f"DDP's per rank, step time {row['step_seconds'] / ddp['step_seconds']:.2f}x, "
                f"bytes sent {row['comm_mb_per_step'] / ddp['comm_mb_per_step']:.2f}x."
            )
    return lines


def _memory_figure(results) -> FigureSpec:
    fig = Figure(figsize=(5.5 * len(results), 4), layout="constrained")
    colors = method_colors(list(MEMORY_KEYS))
    for index, (nproc, by_label) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), index + 1)
        labels = list(by_label)
        bottom = np.zeros(len(labels))
        for key in MEMORY_KEYS:
            values = np.array([by_label[label][key] for label in labels])
            ax.bar(labels, values, bottom=bottom, color=colors[key],
                   label=key.removeprefix("mem_").removesuffix("_mb"))
            bottom += values
        ax.set_title(f"{nproc} processes")
        ax.set_ylabel("MB per rank (busiest)")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    return FigureSpec("memory", fig, "Model-state memory per rank: parameters, gradients, optimiser state.")


def _time_figure(results) -> FigureSpec:
    fig = Figure(figsize=(5.5 * len(results), 4), layout="constrained")
    for index, (nproc, by_label) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), index + 1)
        labels = list(by_label)
        ax.bar(labels, [by_label[label]["step_seconds"] * 1e3 for label in labels], color="tab:gray")
        ax.set_title(f"{nproc} processes")
        ax.set_ylabel("ms per step")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    return FigureSpec("step-time", fig, "Mean step time (CPU processes sharing this machine's cores).")
