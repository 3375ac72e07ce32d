"""Measurement studies: experiments whose result is tables and figures, not a leaderboard.

Memory against depth, step time against precision, coupling time against neuron count,
loss-landscape slices: each is a function registered under a name, taking a
:class:`StudyContext` and keyword options and returning a :class:`StudyResult`. The studies
live in this package, one module per domain they measure (``core`` for RIBBED, ``optim``,
``memory``, ``research``, ``distributed``, ``continual``), above every package they use;
:func:`ribbed.extensions.load_extensions` imports them all. A preset of
``kind: study`` names the function and its options; :func:`run_study` records it like any
run (config, environment, summary, report), saves its figures as PNG files beside the
summary, and writes the report. A study that trains models does so through
:meth:`StudyContext.train`, so every training run it makes is a full child record.

Example:
    >>> @register_study("hello", "a study with one table")
    ... def hello(context, size: int = 3):
    ...     return StudyResult(tables=[Table("squares", ["n", "n^2"], [[i, i * i] for i in range(size)])])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from matplotlib.figure import Figure

from ribbed.config import RunConfig, StudyConfig
from ribbed.extensions import load_extensions
from ribbed.registry import Registry

__all__ = [
    "STUDIES",
    "Table",
    "FigureSpec",
    "StudyContext",
    "StudyResult",
    "list_studies",
    "register_study",
    "run_study",
]

T = TypeVar("T")


@dataclass
class Table:
    """A result table: a title, column names, rows of plain values, and an optional note."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": list(self.columns),
                "rows": [list(row) for row in self.rows], "note": self.note}


@dataclass
class FigureSpec:
    """A matplotlib figure (built with ``matplotlib.figure.Figure``, no pyplot) and its caption."""

    name: str
    figure: Figure
    caption: str = ""


@dataclass
class StudyResult:
    """What a study returns: tables, figures, plain-language findings, and raw data (JSON)."""

    tables: list[Table] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyContext:
    """What a study may use: its record (for artefacts), the runs root, and progress output."""

    record: Any
    runs_dir: Path
    progress: Any = None
    resuming: bool = False  # ribbed resume: reuse this study's finished runs, resume its interrupted ones

    @property
    def artifacts(self) -> Path:
        """A folder in the study's record for files the study wants to keep."""
        path = self.record.path / "artifacts"
        path.mkdir(exist_ok=True)
        return path

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.message(text)

    def steps(self, items: Iterable[T], label: str, total: int | None = None) -> Iterator[T]:
        """Iterate ``items`` with a progress bar (one tick per item)."""
        if total is None:
            items = list(items)
            total = len(items)
        import torch

        from ribbed.train.hooks import HookList, StepBatch

        hooks = HookList(callbacks=[self.progress.start_run(label, total)] if self.progress is not None else [])
        no_batch = StepBatch(x=torch.empty(0), y=torch.empty(0), loss=0.0, micro_batches=0)  # items, not batches
        for index, item in enumerate(items):
            yield item
            hooks.after_step(index, no_batch)

    def train(self, config: RunConfig, *, method: str, dataset=None, label: str | None = None,
              callbacks: Sequence = ()):
        """Train ``config`` as a child record of this study; returns ``(record, TrainResult)``.

        ``callbacks`` are training hooks (``ribbed.train.hooks``): ``train`` attaches them to
        the run's parts, so they can read the model or optimiser while it trains.

        When the study resumes (``resuming``), a run without ``callbacks`` that this study
        already finished with the same config is not trained again: its record and result
        (summary, metric rows, final weights; see :func:`ribbed.train.loop.recorded_result`)
        are returned; one it had started resumes from its checkpoint. Runs with callbacks train
        anew, since their callbacks must see the whole run.
        """
        from ribbed.data import load_dataset
        from ribbed.runs import create_run
        from ribbed.runs.records import FINISHED, find_member
        from ribbed.train import build_run, train
        from ribbed.train.loop import recorded_result

        if dataset is None:
            dataset = load_dataset(config.data.name, seed=config.data.seed,
                                   val_fraction=config.data.val_fraction, **config.data.options)
        parts = build_run(config, dataset)
        recorded = config.model_dump(mode="json")
        record = (find_member(self.runs_dir, recorded, parent=self.record.id, anywhere=False)
                  if self.resuming and not callbacks else None)
        if record is not None and record.read_meta()["status"] in FINISHED:
            self.message(f"{label or method}: reusing {record.id} ({record.read_meta()['status']})")
            return record, recorded_result(record, parts)
        resume = record is not None
        if record is not None:
            record.set_status("running")
        else:
            record = create_run(
                self.runs_dir, name=config.name, config=recorded,
                parent=self.record.id, method=method,
                dataset=f"{config.data.name}/{config.model.name}", seed=config.seed,
            )
        callbacks = list(callbacks)
        if self.progress is not None:
            callbacks.append(self.progress.start_run(label or method, config.train.steps))
        try:
            result = train(parts, record=record, callbacks=callbacks, resume=resume)
        except BaseException as exc:
            record.record_error(exc, step=getattr(exc, "step", None))
            raise
        return record, result


STUDIES: Registry[StudyResult] = Registry("study", "study", positional=("context",))


def register_study(name: str, description: str):
    """Register ``fn(context, **options) -> StudyResult`` under ``name``."""
    return STUDIES.register(name, description)


def list_studies() -> dict[str, str]:
    load_extensions()
    return STUDIES.describe()


def run_study(config: StudyConfig, *, runs_dir: Path, progress=None, command: str = "", record=None):
    """Run study ``config.study`` with its options; record it and write its report.

    ``record``: the unfinished study record to continue (``ribbed resume``): the study runs
    again in it, reusing the runs it finished (see :meth:`StudyContext.train`).
    """
    from ribbed.experiments.harness import Outcome, _command, _now
    from ribbed.registry import check_options
    from ribbed.report import write_report
    from ribbed.runs import capture_environment, create_run

    load_extensions()
    entry = STUDIES.entry(config.study)
    check_options("options", config.study, entry.signature_of, config.options, STUDIES.positional)
    resuming = record is not None
    if resuming:
        record.set_status("running")
    else:
        record = create_run(runs_dir, name=config.name, kind="study", config=config.model_dump(mode="json"))
    context = StudyContext(record=record, runs_dir=Path(runs_dir), progress=progress, resuming=resuming)
    try:
        result = entry.factory(context, **config.options)
    except BaseException as exc:
        record.record_error(exc)
        raise
    figures_dir = record.path / "figures"
    figures_dir.mkdir(exist_ok=True)
    figures = []
    for index, spec in enumerate(result.figures, start=1):
        path = figures_dir / f"{index:02d}-{spec.name}.png"
        spec.figure.savefig(path, format="png", dpi=100, facecolor="white")
        figures.append({"file": str(path.relative_to(record.path)), "caption": spec.caption,
                        "alt": spec.name})
    summary = {
        "kind": "study",
        "id": record.id,
        "name": config.name,
        "study": config.study,
        "description": config.description,
        "created": _now(),
        "command": command or _command(),
        "options": config.options,
        "findings": result.findings,
        "tables": [table.as_dict() for table in result.tables],
        "figures": figures,
        "data": result.data,
        "environment": capture_environment(),
    }
    record.finish("completed", summary)
    html, md = write_report(summary, record.path)
    return Outcome(summary, record, html, md)
