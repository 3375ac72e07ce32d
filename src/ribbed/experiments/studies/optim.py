"""Studies of the optimiser toolbox: the ``precision`` study.

``precision`` trains one run config in fp32, bf16 autocast and fp16 autocast with loss
scaling (the training loop's ``train.precision``), several seeds each, and reports for each
mode the test accuracy (mean and 95% interval), the step time of the training runs, and the
memory of a training step measured by :func:`ribbed.memory.profile.profile_training`:
bytes saved for backward and the step's peak resident memory. Under autocast the saved
bytes are the activations in the half type plus the half-precision copies of the weights
that the matrix products keep, so the saving grows with batch size. Parameters, gradients
and optimiser state stay in fp32 under autocast, so they are the same in every mode.

Whether a half mode is faster depends on the hardware: on a CPU only native instructions
(``avx512_bf16``, ``amx_bf16``, ``avx512_fp16``) make it so, and without them it is slower.
The study lists which of those flags the CPU advertises beside the measured times.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ribbed.config import ConfigError, RunConfig, config_from_dict, deep_merge
from ribbed.data import load_dataset
from ribbed.experiments.studies import FigureSpec, StudyContext, StudyResult, Table, register_study
from ribbed.memory.profile import profile_training
from ribbed.report import formatting as fmt
from ribbed.report.plots import method_colors
from ribbed.stats import mean_ci

__all__ = ["precision"]

MODES = ("fp32", "bf16", "fp16")
MIB = 2**20
HALF_PRECISION_FLAGS = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")


def cpu_half_precision_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str] | None:
    """The half-precision instruction flags this CPU advertises (Linux), ``None`` if unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in HALF_PRECISION_FLAGS if flag in flags]


def _mode_config(base: dict[str, Any], mode: str, seed: int) -> RunConfig:
    doc = deep_merge(base, {"train": {"precision": mode}, "seed": seed, "name": f"precision-{mode}"})
    try:
        config = config_from_dict({**doc, "kind": "run"})
    except ConfigError as exc:
        raise ConfigError(f"options.base: {exc}") from None
    assert isinstance(config, RunConfig)  # kind: run
    return config


def _check_modes(modes: Sequence[str]) -> None:
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"options.modes: got {list(modes)!r}; allowed: distinct values among {', '.join(MODES)}")


@register_study("precision", "fp32 vs bf16 vs fp16 (loss-scaled) training: accuracy, step time, "
                             "memory saved for backward, peak memory")
def precision(
    context: StudyContext,
    base: dict[str, Any],
    modes: Sequence[str] = MODES,
    seeds: Sequence[int] = (0, 1, 2),
    profile_steps: int = 20,
) -> StudyResult:
    """Train ``base`` (a run config) in each precision mode with each seed; measure memory.

    Args:
        context: the study's context (records, progress).
        base: the run config every mode trains (its ``train.precision`` is replaced).
        modes: precision modes to compare, the first being the reference for ratios.
        seeds: seeds of the training runs of each mode.
        profile_steps: steps of the separate memory/time profile of each mode.
    """
    _check_modes(modes)
    if not seeds:
        raise ValueError("options.seeds: got []; allowed: at least one seed")
    first = _mode_config(base, modes[0], seeds[0])
    dataset = load_dataset(first.data.name, seed=first.data.seed, val_fraction=first.data.val_fraction,
                           **first.data.options)
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        context.message(f"profiling {mode}: {profile_steps} steps")
        profile = profile_training(_mode_config(base, mode, seeds[0]), dataset, steps=profile_steps)
        runs = []
        for seed in seeds:
            record, result = context.train(_mode_config(base, mode, seed), method=mode, dataset=dataset,
                                           label=f"{mode} · seed {seed}")
            runs.append({"id": record.id, "seed": seed, "status": result.status,
                         "test_acc": result.final.get("test_acc"),
                         "ms_per_step": 1e3 * result.train_seconds / max(result.steps, 1)})
        results[mode] = {"profile": profile.as_dict(), "runs": runs}
    return StudyResult(
        tables=[_table(results, modes[0], first)],
        figures=[_figure(results, modes[0])],
        findings=_findings(results, modes[0]),
        data={"modes": results, "config": first.model_dump(mode="json")},
    )


def _summary(entry: dict[str, Any]) -> dict[str, Any]:
    done = [r for r in entry["runs"] if r["status"] == "completed" and r["test_acc"] is not None]
    accuracy = mean_ci([r["test_acc"] for r in done]) if done else (None, None, None)
    return {
        "accuracy": accuracy,
        "n": len(done),
        "failed": len(entry["runs"]) - len(done),
        "ms_per_step": statistics.median(r["ms_per_step"] for r in entry["runs"]),
        "saved_mib": entry["profile"]["activation_bytes"] / MIB,
        "peak_mib": (entry["profile"]["peak_process_bytes"] or 0) / MIB or None,
    }


def _ratio(value: float | None, reference: float | None) -> str:
    return fmt.MISSING if not value or not reference else f"{value / reference:.2f}x"


def _table(results: dict[str, dict], reference: str, config: RunConfig) -> Table:
    ref = _summary(results[reference])
    rows = []
    for mode, entry in results.items():
        s = _summary(entry)
        rows.append([mode, fmt.estimate(*s["accuracy"]), f"{s['n']} ({s['failed']} diverged)",
                     f"{s['ms_per_step']:.2f}", _ratio(s["ms_per_step"], ref["ms_per_step"]),
                     f"{s['saved_mib']:.2f}", _ratio(s["saved_mib"], ref["saved_mib"]),
                     fmt.number(s["peak_mib"], 3), _ratio(s["peak_mib"], ref["peak_mib"])])
    return Table(
        f"Precision modes on {config.data.name}/{config.model.name}, {config.train.steps} steps",
        ["Mode", "test_acc (mean ± 95% CI)", "Seeds", "ms/step", f"vs {reference}", "Saved for backward MiB",
         f"vs {reference}", "Peak step MiB", f"vs {reference}"],
        rows,
        note="ms/step: median over seeds of training time / steps of the recorded runs (evaluation excluded). "
             "Saved for backward: bytes autograd keeps from one batch's forward pass for its backward pass, "
             "parameters excluded: the activations and, under autocast, the half-precision weight copies. "
             "Peak: the process's "
             f"resident-set peak above its start over {results[reference]['profile']['steps']} profiled steps. "
             "Parameters, gradients and optimiser state stay fp32 in every mode.",
    )


def _figure(results: dict[str, dict], reference: str) -> FigureSpec:
    summaries = {mode: _summary(entry) for mode, entry in results.items()}
    colors = method_colors(list(summaries))
    figure = Figure(figsize=(12, 3.4), layout="constrained")
    panels = (("ms_per_step", "step time (ms)"), ("saved_mib", "saved for backward (MiB)"))
    for index, (key, title) in enumerate(panels):
        ax = figure.add_subplot(1, 3, index + 1)
        ax.bar(list(summaries), [s[key] for s in summaries.values()], color=[colors[m] for m in summaries])
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    ax = figure.add_subplot(1, 3, 3)
    for position, (mode, s) in enumerate(summaries.items()):
        mean, low, high = s["accuracy"]
        if mean is None:
            continue
        error = [[mean - low], [high - mean]] if low == low else None  # nan bounds: one seed
        ax.errorbar([position], [mean], yerr=error, fmt="o", color=colors[mode], capsize=4)
    ax.set_xticks(range(len(summaries)), list(summaries))
    ax.set_title("test accuracy (mean, 95% CI)")
    ax.grid(alpha=0.3, axis="y")
    return FigureSpec("precision", figure, f"Step time, memory saved for backward and accuracy per precision mode "
                                           f"(ratios against {reference} in the table).")


def _findings(results: dict[str, dict], reference: str) -> list[str]:
    ref = _summary(results[reference])
    lines = []
    for mode, entry in results.items():
        if mode == reference:
            continue
        s = _summary(entry)
        speed = s["ms_per_step"] / ref["ms_per_step"]
        memory = s["saved_mib"] / ref["saved_mib"] if ref["saved_mib"] else float("nan")
        pace = "slower" if speed > 1 else "faster"
        lines.append(
            f"{mode}: a step takes {speed:.2f}x the time of {reference} ({pace}); what a step saves for "
            f"backward takes {memory:.2f}x the memory; test accuracy {fmt.estimate(*s['accuracy'])} against "
            f"{fmt.estimate(*ref['accuracy'])} in {reference}"
            + (f"; {s['failed']} run(s) diverged" if s["failed"] else "") + "."
        )
    flags = cpu_half_precision_flags()
    if flags is not None:
        lines.append("This CPU advertises " + (", ".join(flags) if flags else "none") + " of the half-precision "
                     f"instruction flags {', '.join(HALF_PRECISION_FLAGS)}; a half mode without its flag computes "
                     "through conversions to fp32.")
    return lines
