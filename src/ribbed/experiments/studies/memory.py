"""The memory studies: ``checkpoint-sparse`` and ``moe-attention``.

Each study pairs measurements with a training comparison:

* ``checkpoint-sparse`` (the request's "gradient checkpointing + sparse backpropagation"):
  activation bytes, peak memory and step time of MLPs from 4 to 64 blocks under every
  checkpointing policy, crossed with top-k gradient sparsity; then a comparison of dense,
  sparse-gradient, RigL and lottery-ticket training on MNIST-1D for accuracy, sparsity and
  FLOPs; and, with a GPU, 2:4 semi-structured sparse matmuls.
* ``moe-attention`` (the request's "MoE and flash attention"): activation bytes and
  throughput of the small GPT against sequence length for every attention and feed-forward
  variant; then a comparison of the variants trained on ``text-char``.

The comparison is an ordinary comparison (``ribbed.experiments.harness.run_comparison``):
equal tuning budget (``tune: true`` reruns it), several seeds, its own record and report;
the study summarises it and links it by id.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from ribbed import stats
from ribbed.config import ComparisonConfig, ConfigError, config_from_dict
from ribbed.data import load_dataset
from ribbed.experiments.harness import method_run_config, run_comparison
from ribbed.experiments.studies import FigureSpec, StudyContext, StudyResult, Table, register_study
from ribbed.memory.sweeps import attention_sweep, depth_sweep
from ribbed.report import formatting as fmt
from ribbed.report.plots import draw_curve, method_colors
from ribbed.sparse import measure_semi_structured_linear

__all__ = ["checkpoint_sparse", "moe_attention"]

MB = 2**20


# ---------------------------------------------------------------------- shared pieces


def _comparison(doc: Mapping[str, Any]) -> ComparisonConfig:
    try:
        config = config_from_dict({"kind": "comparison", **doc})
    except ConfigError as exc:
        raise ConfigError(f"options.comparison: {exc}") from None
    if not isinstance(config, ComparisonConfig):
        raise ConfigError(f"options.comparison: got kind {config.kind!r}; allowed: a comparison (kind: comparison)")
    return config


def _run_comparison(context: StudyContext, config: ComparisonConfig, tune: bool):
    context.message(f"training comparison {config.name!r}: {len(config.methods)} methods x "
                    f"{len(config.seed_list)} seeds{' (tuning first)' if tune else ''}")
    return run_comparison(config, runs_dir=context.runs_dir, tune=tune, progress=context.progress)


def _final_row_means(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, float | None]:
    """Mean over completed runs of each key in the runs' last metrics row."""
    means = {}
    for key in keys:
        values = [run["history"][-1][key] for run in runs
                  if run["status"] == "completed" and run.get("history") and key in run["history"][-1]]
        means[key] = statistics.fmean(values) if values else None
    return means


def _by_method(summary: Mapping[str, Any]) -> dict[str, list[Mapping[str, Any]]]:
    grouped = stats.group_runs(summary["runs"], summary["baseline"])
    return next(iter(grouped.values()))


def _curves_figure(summary: Mapping[str, Any], keys: Sequence[str], name: str) -> FigureSpec:
    """One panel per metric key, one line per method (mean over seeds, min-max band)."""
    by_method = _by_method(summary)
    colors = method_colors(list(by_method))
    figure = Figure(figsize=(4.6 * len(keys), 3.4), layout="constrained")
    for index, key in enumerate(keys):
        ax = figure.add_subplot(1, len(keys), index + 1)
        for method, runs in by_method.items():
            draw_curve(ax, key, runs, colors[method], method)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize="small")
    return FigureSpec(name, figure, f"Training comparison {summary['name']} (record {summary['id']}): "
                      "mean over seeds, band min–max.")


AGGREGATE_COLUMNS = ("lr", "seeds", "verdict", "p")


def _aggregate_cells(summary: Mapping[str, Any], method: str) -> list[Any]:
    """Mean ± CI of the primary metric, then :data:`AGGREGATE_COLUMNS`, for one method."""
    row = next(r for r in summary["aggregates"] if r["method"] == method)
    p_value = fmt.p_value(row["p_value"]) if row["verdict"] != "baseline" else fmt.MISSING
    optimizer = next(iter(summary["methods"][method]["hyperparameters"].values()))
    return [fmt.estimate(row["mean"], row["ci_low"], row["ci_high"]), optimizer["lr"], row["n"],
            row["verdict"], p_value]


def _comparison_data(summary: Mapping[str, Any], outcome) -> dict[str, Any]:
    return {"id": summary["id"], "report": str(outcome.report_html), "aggregates": summary["aggregates"]}


def _verdict_findings(summary: Mapping[str, Any]) -> list[str]:
    metric = summary["primary_metric"]["name"]
    lines = []
    for row in summary["aggregates"]:
        if row["verdict"] == "baseline":
            continue
        lines.append(f"{row['method']}: {metric} {fmt.estimate(row['mean'], row['ci_low'], row['ci_high'])} "
                     f"over {row['n']} seeds, {row['verdict']} against {summary['baseline']} "
                     f"({fmt.p_clause(row['p_value'])}).")
    return lines


def _line_figure(rows: Sequence[Mapping[str, Any]], *, x: str, series: str, panels: Sequence[tuple[str, str]],
                 name: str, caption: str, log_x: bool = True) -> FigureSpec:
    """Panels of ``y`` against ``x``, one line per value of ``series`` (log-log axes)."""
    figure = Figure(figsize=(4.6 * len(panels), 3.6), layout="constrained")
    names = list(dict.fromkeys(row[series] for row in rows))
    colors = method_colors(names)
    for index, (key, title) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), index + 1)
        for label in names:
            points = sorted((row[x], row[key]) for row in rows if row[series] == label and row[key] is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=colors[label], label=str(label))
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    figure.axes[0].legend(fontsize="small")
    return FigureSpec(name, figure, caption)


def _mb(value: int | None) -> float | str:
    return fmt.MISSING if value is None else value / MB


def _ratio(value: float, baseline: Mapping[str, Any] | None, key: str) -> float | str:
    return fmt.MISSING if baseline is None else value / baseline[key]


def _or_missing(value: Any) -> Any:
    return fmt.MISSING if value is None else value


# ---------------------------------------------------------------------- checkpoint-sparse


def _measurement_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    baseline = {(r["depth"], r["sparsity"]): r for r in rows if r["policy"] == "none"}
    table = []
    for row in rows:
        plain = baseline.get((row["depth"], row["sparsity"]))
        table.append([
            row["depth"], row["policy"], row["sparsity"], _mb(row["activation_bytes"]),
            _ratio(row["activation_bytes"], plain, "activation_bytes"),
            _mb(row["peak_process_bytes"]), row["step_seconds"] * 1e3,
            _ratio(row["step_seconds"], plain, "step_seconds"),
        ])
    return table


def _depth_findings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    deepest = max(row["depth"] for row in rows)
    at = {(r["policy"], r["sparsity"]): r for r in rows if r["depth"] == deepest}
    plain = at.get(("none", 0.0))
    if plain is None:
        return []
    lines = []
    for (policy, sparsity), row in at.items():
        if (policy == "none") == (not sparsity):  # each policy dense, and sparsity without checkpointing
            continue
        setting = f"policy {policy}" if policy != "none" else f"top-k gradient sparsity {sparsity:g}"
        lines.append(f"Depth {deepest}, {setting}: {row['activation_bytes'] / plain['activation_bytes']:.2f}x "
                     f"the activation bytes and {row['step_seconds'] / plain['step_seconds']:.2f}x the step "
                     "time of dense training without checkpointing.")
    return lines


def _sparse_training_table(summary: Mapping[str, Any]) -> Table:
    keys = ("weight_sparsity", "flops_fraction", "grad_density")
    rows = []
    for method, runs in _by_method(summary).items():
        means = _final_row_means(runs, keys)
        rows.append([method, *_aggregate_cells(summary, method),
                     *(_or_missing(means[key]) for key in keys)])
    metric = summary["primary_metric"]["name"]
    return Table(
        f"Accuracy, sparsity and FLOPs ({metric}, comparison {summary['id']})",
        ["method", f"{metric} (mean ± 95% CI)", *AGGREGATE_COLUMNS, "weight sparsity",
         "training FLOPs vs dense", "gradient density"],
        rows,
        note="Weight sparsity and FLOPs from the last metrics row (mean over seeds). FLOPs are counted "
             "with torch.utils.flop_counter and scaled by each layer's density, as if sparse kernels "
             "were used; dense kernels run here, so wall time does not fall with them. Gradient density "
             "is the share of gradient entries the optimiser sees under top-k sparsification.",
    )


def _semi_structured(findings: list[str]) -> Table | None:
    result = measure_semi_structured_linear()
    if result is None:
        findings.append("2:4 semi-structured sparsity: not measured, it needs an NVIDIA GPU "
                        "(torch.sparse.to_sparse_semi_structured has no CPU kernel).")
        return None
    return Table("2:4 semi-structured matmul (fp16, 4096 x 4096 x 4096)", list(result),
                 [list(result.values())])


@register_study("checkpoint-sparse", "activation memory and step time against depth for each "
                "checkpointing policy x gradient sparsity; accuracy and FLOPs of sparse training")
def checkpoint_sparse(
    context: StudyContext,
    dataset: str = "mnist1d",
    depths: Sequence[int] = (4, 8, 16, 32, 64),
    width: int = 256,
    batch_size: int = 128,
    policies: Sequence[str] = ("none", "every", "every-4", "sqrt", "selective"),
    sparsities: Sequence[float] = (0.0, 0.9, 0.99),
    steps: int = 5,
    comparison: Mapping[str, Any] | None = None,
    tune: bool = False,
) -> StudyResult:
    """Measure the depth sweep, then (if ``comparison`` is given) run the sparse-training
    comparison it describes."""
    training = _comparison(comparison) if comparison is not None else None
    data = load_dataset(dataset)
    rows = depth_sweep(data, depths=depths, width=width, batch_size=batch_size, policies=policies,
                       sparsities=sparsities, steps=steps, progress=context.steps)
    dense = [row for row in rows if row["sparsity"] == 0.0] or rows
    figures = [_line_figure(
        dense, x="depth", series="policy", name="memory-and-time-against-depth",
        panels=[("activation_bytes", "activation bytes saved for backward"),
                ("peak_process_bytes", "peak process memory above start (bytes)"),
                ("step_seconds", "step time (s)")],
        caption=f"MLP of width {width}, batch {batch_size} on {dataset}, dense gradients. Activation "
                "bytes are exact; peak memory includes weights' gradients and AdamW state; time is the "
                f"median of {steps - 1} steps on this machine.")]
    sparse_rows = [dict(row, series=f"{row['policy']} / sparsity {row['sparsity']:g}") for row in rows
                   if row["policy"] == "none"]
    figures.append(_line_figure(
        sparse_rows, x="depth", series="series", name="gradient-sparsity-cost",
        panels=[("step_seconds", "step time (s)"), ("peak_process_bytes", "peak process memory (bytes)")],
        caption="Top-k gradient sparsification with error feedback, no checkpointing: its cost in "
                "time (one top-k over all gradients) and memory (the error-feedback buffer)."))
    findings = _depth_findings(rows)
    tables = [Table(
        "Activation memory, peak memory and step time",
        ["depth", "policy", "gradient sparsity", "activation MB", "vs none", "peak MB", "step ms",
         "time vs none"],
        _measurement_rows(rows),
        note="'vs none' compares with no checkpointing at the same depth and sparsity. Peak MB is the "
             "process's peak resident memory above its start (Linux VmHWM), including one evaluation.",
    )]
    data_out: dict[str, Any] = {"measurements": rows}
    semi = _semi_structured(findings)
    if semi is not None:
        tables.append(semi)
        data_out["semi_structured"] = semi.rows[0]
    if training is not None:
        outcome = _run_comparison(context, training, tune)
        summary = outcome.summary
        tables.append(_sparse_training_table(summary))
        figures.append(_curves_figure(summary, ["val_acc", "val_loss"], "sparse-training-curves"))
        findings += _verdict_findings(summary)
        data_out["comparison"] = _comparison_data(summary, outcome)
    return StudyResult(tables=tables, figures=figures, findings=findings, data=data_out)


# ---------------------------------------------------------------------- moe-attention


def _training_rows(config: ComparisonConfig, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Tokens per second of each training run, from its steps, batch, block size and time."""
    entry = config.dataset_entries[0]
    block_size = load_dataset(entry.data.name, seed=entry.data.seed, val_fraction=entry.data.val_fraction,
                              **entry.data.options).input_shape[0]
    rows = []
    for run in summary["runs"]:
        run_config = method_run_config(config, run["method"], entry, run["seed"])
        tokens = run["steps"] * run_config.data.batch_size * block_size
        rows.append({"method": run["method"], "seed": run["seed"], "status": run["status"],
                     "tokens_per_second": tokens / run["train_seconds"] if run["train_seconds"] else math.nan})
    return rows


def _moe_training_table(summary: Mapping[str, Any], training: Sequence[Mapping[str, Any]]) -> Table:
    rows = []
    for method, runs in _by_method(summary).items():
        speeds = [r["tokens_per_second"] for r in training if r["method"] == method and r["status"] == "completed"]
        mean, low, high = stats.mean_ci(speeds) if speeds else (None, None, None)
        means = _final_row_means(runs, ("moe_max_load", "moe_dropped"))
        rows.append([method, *_aggregate_cells(summary, method), fmt.estimate(mean, low, high),
                     _or_missing(means["moe_max_load"]), _or_missing(means["moe_dropped"])])
    metric = summary["primary_metric"]["name"]
    return Table(
        f"Training ({metric}, comparison {summary['id']})",
        ["method", f"{metric} (mean ± 95% CI)", *AGGREGATE_COLUMNS, "tokens/s (mean ± 95% CI)",
         "max expert load (x even)", "dropped choices"],
        rows,
        note="Tokens per second count training steps only (evaluation excluded). Expert load and dropped "
             "routing choices are from the last metrics row of MoE runs (moe-load plug-in).",
    )


def _sweep_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    naive = {(r["feed_forward"], r["length"]): r for r in rows if r["attention"] == "naive"}
    table = []
    for row in rows:
        base = naive.get((row["feed_forward"], row["length"]))
        table.append([row["attention"], row["feed_forward"], row["length"], _mb(row["activation_bytes"]),
                      _ratio(row["activation_bytes"], base, "activation_bytes"),
                      _mb(row["peak_process_bytes"]), row["tokens_per_second"]])
    return Table("Activation memory and throughput against sequence length",
                 ["attention", "feed-forward", "length", "activation MB", "vs naive", "peak MB",
                  "tokens/s (fwd+bwd)"], table,
                 note="Whole model, one forward and backward pass; activation bytes exact, tokens/s the "
                      "median of the repeats on this machine.")


def _sweep_findings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    longest = max(row["length"] for row in rows)
    at = {(r["attention"], r["feed_forward"]): r for r in rows if r["length"] == longest}
    lines = []
    for (attention, feed_forward), row in at.items():
        naive = at.get(("naive", feed_forward))
        if naive is None or attention == "naive":
            continue
        lines.append(f"Length {longest}, {feed_forward} feed-forward: {attention} keeps "
                     f"{row['activation_bytes'] / naive['activation_bytes']:.3f}x naive attention's "
                     f"activation bytes at {row['tokens_per_second'] / naive['tokens_per_second']:.2f}x its "
                     "tokens per second.")
    return lines


@register_study("moe-attention", "activation memory and throughput of the small GPT against sequence "
                "length for every attention x feed-forward; training comparison on text-char")
def moe_attention(
    context: StudyContext,
    lengths: Sequence[int] = (128, 256, 512, 1024, 2048, 4096),
    attentions: Sequence[str] = ("naive", "sdpa", "linear", "performer", "local"),
    feed_forwards: Sequence[str] = ("mlp", "moe"),
    model: Mapping[str, Any] | None = None,
    attention_options: Mapping[str, Mapping[str, Any]] | None = None,
    feed_forward_options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 1,
    repeats: int = 2,
    comparison: Mapping[str, Any] | None = None,
    tune: bool = False,
) -> StudyResult:
    """Sweep sequence lengths, then (if ``comparison`` is given) run the training comparison."""
    training_config = _comparison(comparison) if comparison is not None else None
    rows = attention_sweep(
        lengths=lengths, attentions=attentions, feed_forwards=feed_forwards,
        model_options=model or {"n_layer": 1, "n_head": 4, "n_embd": 64},
        attention_options=attention_options, feed_forward_options=feed_forward_options,
        batch_size=batch_size, repeats=repeats, progress=context.steps,
    )
    for row in rows:
        row["variant"] = f"{row['attention']} / {row['feed_forward']}"
    figures = [_line_figure(
        rows, x="length", series="variant", name="memory-and-throughput-against-length",
        panels=[("activation_bytes", "activation bytes saved for backward"),
                ("tokens_per_second", "tokens per second (forward + backward)")],
        caption="Small GPT, one forward and backward pass per length, random tokens.")]
    tables = [_sweep_table(rows)]
    findings = _sweep_findings(rows)
    data: dict[str, Any] = {"sweep": rows}
    if training_config is not None:
        outcome = _run_comparison(context, training_config, tune)
        summary = outcome.summary
        training = _training_rows(training_config, summary)
        tables.append(_moe_training_table(summary, training))
        figures.append(_curves_figure(summary, ["val_loss", "train_loss"], "training-curves"))
        findings += _verdict_findings(summary)
        data.update(training=training, comparison=_comparison_data(summary, outcome))
    return StudyResult(tables=tables, figures=figures, findings=findings, data=data)
