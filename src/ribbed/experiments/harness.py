"""Run one config or a whole comparison, record everything, and write the report.

A comparison is methods x datasets x seeds around a base run. The procedure is fixed so
results are comparable: every method is (optionally) tuned with the same budget on the
validation split; then every method trains on every dataset with every seed, each run a
full record of its own; then the final test metrics are aggregated (mean, 95% CI, Welch's
test against the baseline) and the report is written. Everything that can be rejected
(names, options, sizes) is built and checked before the first record is written, so a bad
config never leaves a half-made comparison behind.
"""

from __future__ import annotations

import datetime as _dt
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ribbed import stats
from ribbed.config import (
    ComparisonConfig,
    ConfigError,
    DatasetEntry,
    RunConfig,
    StudyConfig,
    config_from_dict,
    deep_merge,
)
from ribbed.data import Dataset, load_dataset
from ribbed.experiments.tuning import apply_params, tune_method
from ribbed.runs import capture_environment, create_run
from ribbed.runs.records import FINISHED as FINISHED_RUN
from ribbed.train import Callback, build_run, train
from ribbed.train.hardware import process_threads

__all__ = [
    "Outcome", "Progress", "compare_records", "fairness_warnings", "fast_dev_config", "method_run_config",
    "run_comparison", "run_entry",
    "run_single", "summarize_records",
]


class Progress(Protocol):
    """What the harness tells a progress display (the CLI draws rich progress bars)."""

    def start_run(self, label: str, steps: int) -> Callback: ...

    def end_run(self, label: str, entry: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...


@dataclass
class Outcome:
    """A finished run or comparison: its summary, record and report paths."""

    summary: dict[str, Any]
    record: Any
    report_html: Path
    report_md: Path


def _command(record=None) -> str:
    """The command that made ``record`` (its ``env.json`` argv, written when it was created),
    so a report rewritten later (``ribbed report``) or after ``ribbed resume`` still says how
    to reproduce the run; this process's command line without a record or that file."""
    argv = list(sys.argv)
    if record is not None:
        try:
            recorded = json.loads(record.env_path.read_text(encoding="utf-8")).get("argv")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, list) and recorded and all(isinstance(a, str) for a in recorded):
            argv = recorded
    if argv and Path(argv[0]).name in ("ribbed", "__main__.py"):
        argv[0] = "ribbed"
    return shlex.join(argv)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_entry(record) -> dict[str, Any]:
    """One run as the summary/report sees it, read back from its record."""
    meta, config = record.read_meta(), record.read_config()
    summary = record.read_summary() or {}
    return {
        "id": record.id,
        "method": meta.get("method") or config["optimizer"]["name"],
        "dataset": meta.get("dataset") or f"{config['data']['name']}/{config['model']['name']}",
        "seed": meta.get("seed", config.get("seed")),
        "status": summary.get("status", meta["status"]),
        "final": summary.get("final", {}),
        "steps": summary.get("steps"),
        "steps_to_target": summary.get("steps_to_target"),
        "seconds_to_target": summary.get("seconds_to_target"),
        "train_seconds": summary.get("train_seconds"),
        "diverged_at": summary.get("diverged_at"),
        "history": record.read_metrics(),
    }


def summarize_records(
    records: Sequence, *, kind: str, name: str, baseline: str | None = None,
    record_id: str | None = None, metric: str = "test_acc", mode: str = "max",
) -> dict[str, Any]:
    """A report summary of finished runs read back from their records."""
    runs = [run_entry(record) for record in records]
    methods = list(dict.fromkeys(run["method"] for run in runs))
    baseline = baseline or methods[0]
    if baseline not in methods:
        raise ValueError(f"baseline: got {baseline!r}; allowed: one of the runs' methods {methods}")
    configs = {run["method"]: record.read_config() for run, record in zip(runs, records, strict=True)}
    target = (configs[methods[0]].get("train") or {}).get("target")
    return {
        "kind": kind,
        "id": record_id or records[0].id,
        "name": name,
        "created": _now(),
        "command": _command() if kind == "comparison" else _command(records[0]),
        "baseline": baseline,
        "primary_metric": {"name": metric, "mode": mode},
        "target": target,
        "methods": {m: {"hyperparameters": configs[m]["optimizer"]} for m in methods},
        "runs": runs,
        "aggregates": stats.aggregate(runs, baseline=baseline, metric=metric, mode=mode),
        "environment": capture_environment(),
    }


def _load(entry: DatasetEntry) -> Dataset:
    return load_dataset(
        entry.data.name, seed=entry.data.seed, val_fraction=entry.data.val_fraction,
        **entry.data.options,
    )


def _train_recorded(config: RunConfig, data: Dataset, *, runs_dir, progress, label, reuse: bool = False,
                    **record_kw):
    """Build (validated), create the record, train; a crash marks the record failed (or interrupted).

    ``reuse`` (comparison members): a finished run with exactly this config is used as it is,
    and an unfinished member of the same comparison is resumed from its checkpoint, instead
    of training anew (see :func:`ribbed.runs.records.find_member`).
    """
    from ribbed.runs.records import find_member

    parts = build_run(config, data)
    recorded = parts.config.model_dump(mode="json")
    record = find_member(runs_dir, recorded, parent=record_kw.get("parent")) if reuse else None
    resume = record is not None and record.read_meta()["status"] not in FINISHED_RUN
    if record is not None and not resume:
        if progress:
            progress.message(f"{label}: reusing {record.id} (same config, {record.read_meta()['status']})")
        return record
    if record is None:
        record = create_run(runs_dir, name=config.name, config=recorded, **record_kw)
    else:
        record.set_status("running")
    callbacks = [progress.start_run(label, config.train.steps)] if progress else []
    try:
        train(parts, record=record, callbacks=callbacks, resume=resume)
    except BaseException as exc:
        record.record_error(exc, step=getattr(exc, "step", None))
        raise
    return record


def _write(record, summary: dict) -> Outcome:
    from ribbed.report import write_report

    record.finish("completed", summary)
    html, md = write_report(summary, record.path)
    return Outcome(summary, record, html, md)


def run_single(config: RunConfig, *, runs_dir: Path, progress: Progress | None = None) -> Outcome:
    """Train one run config; record it and write its report."""
    dataset = load_dataset(
        config.data.name, seed=config.data.seed, val_fraction=config.data.val_fraction,
        **config.data.options,
    )
    label = f"{config.data.name}/{config.model.name}"
    record = _train_recorded(
        config, dataset, runs_dir=runs_dir, progress=progress, label=config.name,
        method=config.optimizer.name, dataset=label, seed=config.seed,
    )
    summary = summarize_records([record], kind="run", name=config.name)
    if progress:
        progress.end_run(config.name, summary["runs"][0])
    from ribbed.report import write_report

    html, md = write_report(summary, record.path)
    return Outcome(summary, record, html, md)


def method_run_config(
    comparison: ComparisonConfig, method_name: str, entry: DatasetEntry, seed: int,
    params: dict[str, Any] | None = None,
) -> RunConfig:
    """The run config of one method on one dataset with one seed.

    The base run with the dataset's own ``train`` settings merged in, then the method's
    ``overrides`` (they make the method what it is, so they win), then its dataset, model,
    optimiser (with tuned ``params``, by default the values the dataset records for it),
    gradient method and seed.
    """
    if params is None:
        params = entry.params.get(method_name, {})
    method = comparison.methods[method_name]
    doc = deep_merge(comparison.base.model_dump(mode="json"), {"train": entry.train})
    doc = deep_merge(doc, method.overrides)
    doc.update(
        name=f"{comparison.name}-{method_name}",
        seed=seed,
        data=deep_merge(entry.data.model_dump(mode="json"), method.overrides.get("data", {})),
        model=deep_merge(entry.model.model_dump(mode="json"), method.overrides.get("model", {})),
        optimizer=apply_params(method.optimizer, params).model_dump(mode="json"),
    )
    if method.gradient_method:
        doc["train"]["gradient_method"] = method.gradient_method
    try:
        config = config_from_dict(doc)
    except ConfigError as exc:
        raise ConfigError(f"method {method_name!r} (the base run with its overrides): {exc}") from None
    if not isinstance(config, RunConfig):
        raise ConfigError(f"method {method_name!r}: its overrides make the base run a {config.kind}; allowed: a run")
    return config


FAST_DEV_STEPS = 3


def fast_dev_config(
    config: RunConfig | ComparisonConfig | StudyConfig, steps: int = FAST_DEV_STEPS
) -> RunConfig | ComparisonConfig | StudyConfig:
    """A smoke test of ``config`` (Lightning's ``fast_dev_run``): every member (each method
    on each dataset) trains ``steps`` steps with one seed, evaluates once and is tested, with
    no tuning, so a broken method, option or dataset fails in seconds instead of at the end of
    a long job. Step counts set by a method's overrides are cut too. A study has no members
    to cut in general; its preset states ``fast_dev_options`` (a few steps, one seed, the
    smallest sizes), merged over its options."""
    if isinstance(config, StudyConfig):
        if not config.fast_dev_options:
            raise ConfigError(f"study {config.name!r} states no fast_dev_options, so --fast-dev-run "
                              "cannot shorten it; allowed: runs, comparisons, studies with fast_dev_options")
        doc = config.model_dump(mode="json")
        doc["options"] = deep_merge(doc["options"], doc["fast_dev_options"])
        return config_from_dict(doc)
    short = {"steps": steps, "eval_every": steps, "stop_at_target": False}
    if isinstance(config, RunConfig):
        return config_from_dict(deep_merge(config.model_dump(mode="json"), {"train": short}))
    doc = config.model_dump(mode="json")
    doc["base"] = deep_merge(doc["base"], {"train": short})
    doc["seeds"] = config.seed_list[:1]
    doc["tuning"]["always"] = False
    train_overrides = [method["overrides"].get("train") for method in doc["methods"].values()]
    train_overrides += [entry["train"] for entry in doc.get("datasets") or []]
    for overrides in train_overrides:
        if isinstance(overrides, dict):
            overrides.update({k: v for k, v in short.items() if k in overrides})
    return config_from_dict(doc)


def _params(tuned: dict[tuple[str, str], dict[str, Any]], entry: DatasetEntry, name: str) -> dict[str, Any]:
    """The values ``name`` runs with on ``entry``: tuned in this run, else the dataset's recorded ones."""
    if (name, entry.label) in tuned:
        return tuned[name, entry.label]["params"]
    return entry.params.get(name, {})


def _fixed_threads(comparison: ComparisonConfig) -> ComparisonConfig:
    """``threads: auto`` resolved once for the whole comparison, so every run of it (and the
    recorded config) uses the same count even if the machine's load changes meanwhile."""
    train_cfg = comparison.base.train
    if train_cfg.threads != "auto":
        return comparison
    base = comparison.base.model_copy(
        update={"train": train_cfg.model_copy(update={"threads": process_threads()})})
    return comparison.model_copy(update={"base": base})


def run_comparison(
    comparison: ComparisonConfig,
    *,
    runs_dir: Path,
    tune: bool = False,
    progress: Progress | None = None,
    record=None,
) -> Outcome:
    """Tune (``tune`` or ``tuning.always``), train every method x dataset x seed, aggregate, report.

    Members are reused when a finished run with the same config exists (a re-run of an
    identical comparison trains nothing again). ``record``: the unfinished comparison record
    to continue (``ribbed resume``); its tuning is redone (seeded, so to the same result),
    its finished members reused and its interrupted ones resumed from their checkpoints.
    """
    tune = tune or comparison.tuning.always
    comparison = _fixed_threads(comparison)
    names = list(comparison.methods)
    datasets = {entry.label: (entry, _load(entry)) for entry in comparison.dataset_entries}
    members = {label: comparison.entry_methods(entry) for label, (entry, _) in datasets.items()}
    for label, (entry, dataset) in datasets.items():  # reject bad settings before writing anything
        for name in members[label]:
            build_run(method_run_config(comparison, name, entry, comparison.seed_list[0]), dataset)

    if record is None:
        record = create_run(
            runs_dir, name=comparison.name, kind="comparison", config=comparison.model_dump(mode="json")
        )
    else:  # resumed: finished members are reused, unfinished ones resume
        record.set_status("running")
        (record.path / "tuning.sqlite").unlink(missing_ok=True)
    try:
        tuned: dict[tuple[str, str], dict[str, Any]] = {}
        if tune:
            for label, (entry, dataset) in datasets.items():
                tuning = comparison.entry_tuning(entry)
                for name in members[label]:
                    if progress:
                        progress.message(
                            f"tuning {name} on {label}: {tuning.grid} grid + {tuning.trials} sampler trials"
                        )
                    tuned[name, label] = tune_method(
                        method_name=name,
                        method=comparison.methods[name],
                        run_config=method_run_config(comparison, name, entry, tuning.seed),
                        dataset=dataset,
                        tuning=tuning,
                        storage_path=record.path / "tuning.sqlite",
                        study_name=f"{name}@{label}",
                    )
        runs = []
        for label, (entry, dataset) in datasets.items():
            for name in members[label]:
                params = tuned.get((name, label), {}).get("params")
                for seed in comparison.seed_list:
                    config = method_run_config(comparison, name, entry, seed, params)
                    run_label = f"{name} · {label} · seed {seed}"
                    child = _train_recorded(
                        config, dataset, runs_dir=runs_dir, progress=progress, label=run_label,
                        parent=record.id, method=name, dataset=label, seed=seed, reuse=True,
                    )
                    run = run_entry(child)
                    runs.append(run)
                    if progress:
                        progress.end_run(run_label, run)
    except BaseException as exc:
        record.record_error(exc)
        raise

    target = comparison.base.train.target
    per_dataset: dict[str, dict[str, Any]] = {}
    for label, (entry, _) in datasets.items():
        metric, mode = comparison.entry_metric(entry)
        entry_target = method_run_config(comparison, comparison.baseline, entry, comparison.seed_list[0]).train.target
        per_dataset[label] = {"methods": members[label], "metric": metric, "mode": mode,
                              "target": entry_target.model_dump() if entry_target else None}
    summary = {
        "kind": "comparison",
        "id": record.id,
        "name": comparison.name,
        "description": comparison.description,
        "created": _now(),
        "command": _command(record),
        "baseline": comparison.baseline,
        "primary_metric": {"name": comparison.metric, "mode": comparison.mode},
        "target": target.model_dump() if target else None,
        "datasets": per_dataset,
        "seeds": comparison.seed_list,
        "methods": {
            name: {
                "hyperparameters": {
                    label: apply_params(
                        comparison.methods[name].optimizer, _params(tuned, datasets[label][0], name),
                    ).model_dump()
                    for label in datasets if name in members[label]
                },
                "tuning": (
                    {label: tuned[name, label] for label in datasets if name in members[label]} if tune
                    else {"source": comparison.tuning.source}
                ),
            }
            for name in names
        },
        "runs": runs,
        "aggregates": [
            row
            for label, spec in per_dataset.items()
            for row in stats.aggregate([run for run in runs if run["dataset"] == label], baseline=comparison.baseline,
                                       metric=spec["metric"], mode=spec["mode"])
        ],
        "environment": capture_environment(),
    }
    return _write(record, summary)


NOT_COMPARED = ("name", "seed", "trackers")


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 3}}`` as ``{"train.steps": 3}`` (lists and scalars are leaves)."""
    if not isinstance(doc, dict):
        return {prefix: doc}
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _values(values: Sequence[Any]) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values))


def fairness_warnings(runs: Sequence[dict[str, Any]], configs: Sequence[dict[str, Any]]) -> list[str]:
    """What differs between compared runs beyond the method, one line each; empty when the
    comparison is like for like.

    Runs are compared per dataset (the report compares methods per dataset): any setting
    outside the optimiser that differs (steps, schedule, batch size, precision, threads,
    device...), seeds that differ between methods, a method missing on a dataset another
    method ran on, an optimiser setting that differs between runs of one method, and
    learning rates that differ between methods (a fair comparison only if each was tuned with
    the same budget, which the records of separate runs cannot show).
    """
    warnings: list[str] = []
    all_methods = list(dict.fromkeys(run["method"] for run in runs))
    by_dataset: dict[str, list[tuple[dict, dict]]] = {}
    for run, config in zip(runs, configs, strict=True):
        by_dataset.setdefault(run["dataset"], []).append((run, _flatten(config)))
    for dataset, members in by_dataset.items():
        where = f" on {dataset}" if len(by_dataset) > 1 else ""
        methods = list(dict.fromkeys(run["method"] for run, _ in members))
        missing = [m for m in all_methods if m not in methods]
        if missing:
            warnings.append(f"no run of {', '.join(missing)}{where}")
        keys = list(dict.fromkeys(key for _, flat in members for key in flat))
        for key in keys:
            if key.split(".")[0] in NOT_COMPARED:
                continue
            per_method = {m: [flat.get(key) for run, flat in members if run["method"] == m] for m in methods}
            if key.startswith("optimizer."):
                for method, values in per_method.items():
                    if len({repr(v) for v in values}) > 1:
                        warnings.append(f"{key} differs within {method}{where}: {_values(values)}")
                if key == "optimizer.lr" and len({repr(v) for vs in per_method.values() for v in vs}) > 1:
                    warnings.append(
                        f"learning rates differ{where}: "
                        + "; ".join(f"{m} {_values(vs)}" for m, vs in per_method.items())
                        + " (fair only if each was tuned with the same budget)")
                continue
            if len({repr(v) for vs in per_method.values() for v in vs}) > 1:
                warnings.append(f"{key} differs{where}: "
                                + "; ".join(f"{m} {_values(vs)}" for m, vs in per_method.items()))
        seeds = {m: sorted(run["seed"] for run, _ in members if run["method"] == m) for m in methods}
        if len({tuple(s) for s in seeds.values()}) > 1:
            warnings.append(f"seeds differ{where}: "
                            + "; ".join(f"{m} {_values(s)}" for m, s in seeds.items()))
    return warnings


def compare_records(records: Sequence, *, runs_dir: Path, name: str, baseline: str | None = None) -> Outcome:
    """Aggregate already finished runs into a new comparison record with its report.

    The summary's ``warnings`` list what differs between the runs beyond the method
    (:func:`fairness_warnings`); the command prints them and the report shows them.
    """
    if not records:
        raise ValueError("compare: give at least one run")
    unfinished = [r.id for r in records if (r.read_summary() or {}).get("status") is None]
    if unfinished:
        raise ValueError(f"compare: runs {unfinished} have not finished")
    summary = summarize_records(records, kind="comparison", name=name, baseline=baseline)
    summary["warnings"] = fairness_warnings(summary["runs"], [r.read_config() for r in records])
    record = create_run(
        runs_dir, name=name, kind="comparison",
        config={"compare": [r.id for r in records], "baseline": summary["baseline"]},
    )
    summary["id"] = record.id
    return _write(record, summary)
