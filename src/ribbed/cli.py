"""The ``ribbed`` command: run presets and configs, browse runs, compare them, write reports.

``ribbed run`` with no argument runs the default comparison. Every long job shows progress
bars; every finished job prints a results table and the path of its report.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # imported where used: ribbed.config loads pydantic and the registries
    from ribbed.config import ComparisonConfig, RunConfig, StudyConfig
    from ribbed.train.hooks import TrainingHook

app = typer.Typer(
    name="ribbed",
    help="RIBBED: neuron-coupled training, the backprop toolbox, and honest comparisons.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Redirected to a file or pipe, rich would wrap tables at 80 columns and cut every column to a
# few letters; a log file has room, so wide tables stay whole ($COLUMNS still wins).
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)

RunsDir = Annotated[
    Path | None,
    typer.Option("--runs-dir", help="Runs root (default: $RIBBED_RUNS_DIR or ./runs)."),
]


def _runs_dir(value: Path | None) -> Path:
    from ribbed.runs import default_runs_dir

    return value if value is not None else default_runs_dir()


_debug = False  # set by --debug: errors also show the traceback of the exception behind them


LIGHT_COMMANDS = {"presets", "datasets", "list", "show", "index"}
"""Commands that read files only: they answer without importing the registries' packages
(which load torch's distributed stack and take seconds); ``--help`` never loads them."""


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option(
        "--debug", help="On an error, also print the traceback behind its one-line message.")] = False,
) -> None:
    """RIBBED: neuron-coupled training, the backprop toolbox, and honest comparisons."""
    global _debug
    _debug = debug
    if ctx.invoked_subcommand not in LIGHT_COMMANDS:
        from ribbed.extensions import load_extensions

        load_extensions()


def _fail(message: str) -> NoReturn:
    """Print ``error: message`` as one line and exit 2; with ``--debug``, the traceback of the
    exception being handled (if any) comes first."""
    import sys
    import traceback

    if _debug and sys.exc_info()[1] is not None:
        console.print(traceback.format_exc(), highlight=False, markup=False, end="")
    # soft_wrap: one line however long (a path cut in two cannot be copied); the terminal wraps it
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code=2)


class RichProgress:
    """Progress bars for the harness: one for the whole job, one per run in progress (and one
    per study loop), each finished run summarised on a line of its own. A run's bar shows its
    loss (mean over the last ``train.log_every`` steps), steps/s and ETA; when the console is
    not a terminal (output redirected to a file or a pipe) bars are not redrawn, so every log
    interval is also printed as a plain line and a redirected run writes as it goes."""

    def __init__(self, progress: Progress, total_runs: int):
        self._progress = progress
        self._overall = progress.add_task("runs", total=total_runs)
        self._tasks: dict[str, Any] = {}

    def start_run(self, label: str, steps: int):
        for task_id in self._finished():
            self._progress.remove_task(task_id)
        task = self._tasks[label] = self._progress.add_task(label, total=steps)
        progress = self._progress

        from ribbed.train.hooks import TrainingHook

        class _Callback(TrainingHook):
            def after_step(self, step: int, batch) -> None:
                progress.update(task, completed=step + 1)

            def on_log(self, row: dict) -> None:
                progress.update(task, loss=row["loss"], rate=row["steps_per_s"])
                if not progress.console.is_terminal:
                    progress.console.print(_log_line(label, row), highlight=False, soft_wrap=True)

            def on_eval(self, row: dict) -> None:
                progress.update(
                    task, description=f"{label}  val_acc {row['val_acc']:.3f}", completed=row["step"]
                )

        return _Callback()

    def _finished(self) -> list:
        """Bars of earlier runs that are done (an outer bar, e.g. a study's, stays while open)."""
        return [task.id for task in self._progress.tasks
                if task.id != self._overall and task.total is not None and task.completed >= task.total]

    def end_run(self, label: str, entry: dict[str, Any]) -> None:
        task = self._tasks.pop(label, None)
        if task is not None:  # its line below replaces its bar
            self._progress.remove_task(task)
        self._progress.advance(self._overall)
        final = entry.get("final", {})
        status = entry.get("status")
        detail = f"test_acc {final['test_acc']:.4f}" if "test_acc" in final else status
        self._progress.console.print(f"  {label}: {detail}", highlight=False)

    def message(self, text: str) -> None:
        self._progress.console.print(text, highlight=False)


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _log_line(label: str, row: dict) -> str:
    """One plain progress line: ``adamw: step 100/3000  loss 0.8123  41.2 steps/s  eta 1m10s``."""
    return (f"{label}: step {row['step']}/{row['steps']}  loss {row['loss']:.4f}  "
            f"{row['steps_per_s']:.1f} steps/s  eta {_duration(row['eta_s'])}")


class _RunStatsColumn(ProgressColumn):
    """Loss and steps/s of a training bar, once its first log interval is done."""

    def render(self, task) -> Text:
        loss, rate = task.fields.get("loss"), task.fields.get("rate")
        if loss is None:
            return Text("")
        return Text(f"loss {loss:.4f}  {rate:.1f} steps/s")


def _progress_bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RunStatsColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )


def _format_ci(row: dict) -> str:
    mean, low, high = row.get("mean"), row.get("ci_low"), row.get("ci_high")
    if mean is None:
        return "-"
    if low is None or high is None or low != low:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {(high - low) / 2:.4f}"


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _results_table(summary: dict) -> Table:
    """The aggregates as a table; time is per step, measured within each run (not seconds to
    target, which depend on what else ran on the machine at the time)."""
    from ribbed.stats import group_runs, step_time_ms

    metrics = {row.get("metric") for row in summary.get("aggregates", [])}
    metric = summary.get("primary_metric", {}).get("name", "metric") if len(metrics) <= 1 else None
    table = Table(title=f"{summary.get('name')}: {metric or 'primary metric'} (mean ± 95% CI)")
    grouped = group_runs(summary.get("runs", []), summary.get("baseline"))
    for column in ("method", "dataset", metric or "metric", "reached target", "steps to target",
                   "ms/step", "p vs baseline", "verdict"):
        table.add_column(column)
    for row in summary.get("aggregates", []):
        table.add_row(
            str(row["method"]), str(row["dataset"]), ("" if metric else f"{row['metric']} ") + _format_ci(row),
            str(row.get("reached_target", "-")), _fmt(row.get("steps_to_target_mean"), ".0f"),
            _fmt(step_time_ms(grouped.get(row["dataset"], {}).get(row["method"], [])), ".3g"),
            _fmt(row.get("p_value"), ".3g"),
            str(row.get("verdict", "")),
        )
    return table


def _print_results(summary: dict) -> None:
    if summary.get("kind") != "study":
        console.print(_results_table(summary))
        return
    for line in summary.get("findings", []):
        console.print(f"- {line}", highlight=False)
    for spec in summary.get("tables", []):
        table = Table(title=spec["title"])
        for column in spec["columns"]:
            table.add_column(str(column))
        for row in spec["rows"]:
            table.add_row(*(_fmt(v, ".4g") if isinstance(v, float) else str(v) for v in row))
        console.print(table)


def _load(
    config: str | None, overrides: list[str]
) -> tuple[Path, RunConfig | ComparisonConfig | StudyConfig]:
    from ribbed.config import load_config
    from ribbed.experiments.presets import resolve_source

    source = resolve_source(config)
    return source, load_config(source, overrides)


@app.command()
def run(
    config: Annotated[str | None, typer.Argument(help="Config file or preset name (default: 'default').")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: key.path=value (repeatable).")] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="Number of seeds (0..N-1).")] = None,
    tune: Annotated[bool, typer.Option(help="Rerun the equal-budget tuning before the final runs.")] = False,
    nproc: Annotated[int | None, typer.Option(
        min=1, help="Run on N processes with torchrun (set train.distributed.strategy); a rank that "
                    "hangs stops the command after train.distributed.timeout_s (default 300 s).")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads per process (train.threads; default auto: 1 on 2 cores or fewer, "
                    "else the idle cores).")] = None,
    fast_dev_run: Annotated[bool, typer.Option(
        "--fast-dev-run", help="Smoke test: a few steps of every method on every dataset, "
                               "one seed, no tuning (a study: its preset's fast_dev_options).")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Run a preset or config file: one run, a comparison of methods x datasets x seeds, or a study."""
    from ribbed.config import ComparisonConfig, ConfigError, MethodConfig, RunConfig, StudyConfig
    from ribbed.distributed.launch import worker_runs_dir
    from ribbed.experiments.harness import fast_dev_config, run_comparison, run_single
    from ribbed.experiments.studies import run_study

    try:
        overrides = list(set_ or [])
        _, cfg = _load(config, overrides)
        if isinstance(cfg, StudyConfig) and threads is not None:
            _fail(f"--threads applies to runs and comparisons; {cfg.name!r} is a study ({cfg.study}), "
                  "each of whose runs picks threads: auto")
        if fast_dev_run and (tune or nproc is not None):
            _fail("--fast-dev-run is a quick single-process check without tuning; "
                  "leave out --tune and --nproc")
        if threads is not None:
            overrides.append(f"train.threads={threads}")
            _, cfg = _load(config, overrides)
        if nproc is not None:
            _launch_workers(nproc, config, overrides, seeds, tune, runs_dir)
            return
        _quiet_unless_main_rank()
        if isinstance(cfg, StudyConfig) and (seeds is not None or tune):
            _fail("--seeds and --tune apply to runs and comparisons, not to studies")
        if seeds is not None:
            if isinstance(cfg, RunConfig):
                cfg = ComparisonConfig(
                    name=cfg.name, baseline=cfg.optimizer.name, seeds=seeds, base=cfg,
                    methods={cfg.optimizer.name: MethodConfig(optimizer=cfg.optimizer)},
                )
            else:
                cfg = cfg.model_copy(update={"seeds": seeds})
        if fast_dev_run:
            cfg = fast_dev_config(cfg)
        root = worker_runs_dir(_runs_dir(runs_dir))
        with _progress_bars() as bars:
            if isinstance(cfg, StudyConfig):
                outcome = run_study(cfg, runs_dir=root, progress=RichProgress(bars, 1))
            elif isinstance(cfg, ComparisonConfig):
                total = cfg.member_count
                outcome = run_comparison(cfg, runs_dir=root, tune=tune, progress=RichProgress(bars, total))
            else:
                if tune:
                    _fail("--tune needs a comparison config (with methods and search spaces)")
                outcome = run_single(cfg, runs_dir=root, progress=RichProgress(bars, 1))
    except (ConfigError, ValueError, LookupError, OSError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        _interrupted(exc, _runs_dir(runs_dir))
    _print_results(outcome.summary)
    console.print(f"record: {outcome.record.path}")
    console.print(f"report: {outcome.report_html}")
    console.print(f"summary: {outcome.report_md}")
    if outcome.summary.get("kind") == "run" and outcome.summary["runs"][0]["status"] != "completed":
        single = outcome.summary["runs"][0]  # a comparison contains its diverging methods and reports them
        at = f" at step {single['diverged_at']}" if single.get("diverged_at") is not None else ""
        console.print(f"{single['id']}: {single['status']}{at}", highlight=False)
        raise typer.Exit(code=1)


def _launch_workers(
    nproc: int, config: str | None, overrides: list[str], seeds: int | None, tune: bool,
    runs_dir: Path | None,
) -> None:
    """``ribbed run`` with the same arguments on ``nproc`` torchrun workers (distributed)."""
    from ribbed.distributed import DistributedRunError, launch

    args = ["run", *([config] if config else []), *(f"--set={item}" for item in overrides)]
    args += [f"--seeds={seeds}"] if seeds is not None else []
    args += ["--tune"] if tune else []
    args += [f"--runs-dir={runs_dir}"] if runs_dir is not None else []
    try:
        launch(args, nproc)
    except DistributedRunError as exc:
        _fail(str(exc))


def _resume_workers(nproc: int, record) -> None:
    """``record`` resumed on ``nproc`` torchrun workers (``ribbed.train.worker``): rank 0
    continues the record from its checkpoint, the other ranks read that checkpoint too."""
    from ribbed.distributed import DistributedRunError, launch

    label = record.read_meta().get("method") or "run"
    record.set_status("running")
    try:
        launch(["--runs-dir", str(record.runs_dir), "--run", f"{label}={record.config_path}",
                "--resume", f"{label}={record.path}"], nproc, module="ribbed.train.worker")
    except DistributedRunError as exc:
        _fail(f"{exc} ({record.id}: {record.effective_status()})")


def _quiet_unless_main_rank() -> None:
    """Workers other than rank 0 of a distributed run print nothing (rank 0 reports)."""
    from ribbed.distributed.process_group import launched_rank

    console.quiet = launched_rank() != 0


def _messages() -> TrainingHook:
    """A training hook that prints what the loop reports (checkpoints skipped, resumed from)."""
    from ribbed.train.hooks import TrainingHook

    class _Messages(TrainingHook):
        def on_message(self, text: str) -> None:
            console.print(text, highlight=False, markup=False)

    return _Messages()


def _interrupted(exc: KeyboardInterrupt, root: Path) -> NoReturn:
    """Say where an interrupted run stopped and how to continue it; exit 130 (Ctrl-C) or 143 (SIGTERM)."""
    from ribbed.runs import open_run
    from ribbed.train.interrupts import TrainingInterrupted

    if not isinstance(exc, TrainingInterrupted) or exc.run_id is None:
        console.print("interrupted", highlight=False)
        raise typer.Exit(code=130)
    target = exc.run_id
    try:  # a member of a comparison resumes through its comparison
        target = open_run(root, exc.run_id).read_meta().get("parent") or exc.run_id
    except (LookupError, ValueError, OSError):
        pass
    where = (f"checkpoint at {exc.checkpoint}" if exc.checkpoint is not None
             else "no checkpoint (train.checkpoint_every is null)")
    console.print(f"interrupted at step {exc.step}, {where}, resume with `ribbed resume {target}`",
                  highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code=exc.exit_code)


def _refuse_links(path: Path) -> None:
    """Refuse a run dir holding symbolic links: resuming writes there, and a link out of it would
    aim those writes (or the reads of checkpoints) at files elsewhere."""
    import os

    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            entry = Path(folder) / name
            if entry.is_symlink():
                _fail(f"{entry} is a symbolic link (to {os.readlink(entry)}); a run dir must hold only "
                      "its own files: replace the link with the file, or remove it, before resuming")


@app.command()
def resume(
    run_ref: Annotated[str, typer.Argument(help="Run or comparison id, unique id prefix, or directory.")],
    nproc: Annotated[int | None, typer.Option(
        min=1, help="Resume a distributed run on N processes with torchrun (as `ribbed run --nproc N` "
                    "started it).")] = None,
    runs_dir: RunsDir = None,
) -> None:
    """Continue an unfinished run from its last good checkpoint, to the same result as an
    uninterrupted run; or an unfinished comparison or study, reusing its finished runs.

    A finished run (completed or diverged) is refused, as is a run whose process still runs.
    """
    from ribbed.config import ComparisonConfig, ConfigError, RunConfig, StudyConfig, load_config
    from ribbed.experiments.harness import run_comparison, summarize_records
    from ribbed.report import write_report
    from ribbed.runs import open_run
    from ribbed.runs.records import FINISHED
    from ribbed.train import build_run, train
    from ribbed.train.checkpoint import CheckpointError

    root = _runs_dir(runs_dir)
    try:
        record = open_run(root, run_ref)
        meta, status = record.read_meta(), record.effective_status()
        if status == "running":
            _fail(f"{record.id} is still running (process {meta.get('pid')} on {meta.get('host')}); "
                  "stop it before resuming")
        if status in FINISHED:
            steps = (record.read_summary() or {}).get("steps")
            _fail(f"{record.id} already finished ({status}{f' after {steps} steps' if steps else ''}); "
                  "there is nothing to resume: start a new run with `ribbed run`")
        _refuse_links(record.path)
        cfg = load_config(record.read_config())
        if isinstance(cfg, ComparisonConfig):
            with _progress_bars() as bars:
                total = cfg.member_count
                outcome = run_comparison(cfg, runs_dir=record.runs_dir, progress=RichProgress(bars, total),
                                         record=record)
            _print_results(outcome.summary)
            console.print(f"report: {outcome.report_html}")
            return
        if isinstance(cfg, StudyConfig):
            from ribbed.experiments.studies import run_study

            with _progress_bars() as bars:
                outcome = run_study(cfg, runs_dir=record.runs_dir, progress=RichProgress(bars, 1), record=record)
            _print_results(outcome.summary)
            console.print(f"report: {outcome.report_html}")
            return
        if not isinstance(cfg, RunConfig):
            _fail(f"{record.id} is a {cfg.kind}; only runs, comparisons and studies resume")
        if nproc is not None:
            _resume_workers(nproc, record)
            html, _ = write_report(summarize_records([record], kind="run", name=cfg.name), record.path)
            console.print(f"{record.id}: {record.read_meta()['status']}\nreport: {html}")
            return
        parts = build_run(cfg)
        record.set_status("running")
    except (ConfigError, ValueError, LookupError, OSError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        _interrupted(exc, root)
    try:
        with _progress_bars() as bars:
            callback = RichProgress(bars, 1).start_run(record.id, cfg.train.steps)
            result = train(parts, record=record, callbacks=[callback, _messages()], resume=True)
    except KeyboardInterrupt as exc:
        record.record_error(exc, step=getattr(exc, "step", None))
        _interrupted(exc, root)
    except (CheckpointError, OSError, ValueError) as exc:
        status = record.record_error(exc)
        _fail(f"{exc} ({record.id} marked {status})")
    except BaseException as exc:
        record.record_error(exc)
        raise
    console.print(f"{record.id}: {result.status} after {result.steps} steps, final {result.final}")
    html, _ = write_report(summarize_records([record], kind="run", name=cfg.name), record.path)
    console.print(f"report: {html}")


@app.command("list")
def list_(
    kind: Annotated[str | None, typer.Option(help="Only 'run' or 'comparison' records.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 30,
    runs_dir: RunsDir = None,
) -> None:
    """List recorded runs and comparisons, newest first."""
    from ribbed.runs import list_runs

    rows = list_runs(_runs_dir(runs_dir), kind=kind, limit=limit)
    table = Table(title=f"runs in {_runs_dir(runs_dir)}")
    for column in ("id", "kind", "method", "dataset", "seed", "status", "test_acc"):
        table.add_column(column)
    for row in rows:
        final = (row.get("summary") or {}).get("final") or {}
        table.add_row(
            row["id"], row["kind"], row.get("method") or "", row.get("dataset") or "",
            "" if row.get("seed") is None else str(row["seed"]), row["status"],
            _fmt(final.get("test_acc"), ".4f"),
        )
    console.print(table)


@app.command()
def show(
    run_ref: Annotated[str, typer.Argument(help="Run id, unique id prefix, or run directory.")],
    runs_dir: RunsDir = None,
) -> None:
    """Show a record's config, status and results."""
    from ribbed.runs import open_run

    try:
        record = open_run(_runs_dir(runs_dir), run_ref)
        meta, status = record.read_meta(), record.effective_status()
        summary, config = record.read_summary() or {}, record.read_config()
    except (LookupError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"[bold]{record.id}[/] ({meta['kind']}, {status})  {record.path}")
    console.print_json(json.dumps(config))
    if summary.get("aggregates") or summary.get("kind") == "study":
        _print_results(summary)
    else:
        console.print_json(json.dumps({k: v for k, v in summary.items() if k != "history"}))


@app.command()
def compare(
    run_refs: Annotated[list[str], typer.Argument(help="Runs to compare (ids, prefixes, or directories).")],
    baseline: Annotated[str | None, typer.Option(help="Baseline method (default: the first run's).")] = None,
    name: Annotated[str, typer.Option(help="Name of the comparison record.")] = "compare",
    runs_dir: RunsDir = None,
) -> None:
    """Aggregate existing runs into a comparison record with a report."""
    from ribbed.experiments.harness import compare_records
    from ribbed.runs import open_run

    root = _runs_dir(runs_dir)
    try:
        records = [open_run(root, ref) for ref in run_refs]
        for record in records:
            record.check_files()
        outcome = compare_records(records, runs_dir=root, name=name, baseline=baseline)
    except (ValueError, LookupError, OSError) as exc:
        _fail(str(exc))
    if outcome.summary.get("warnings"):
        console.print("[bold yellow]warning:[/] these runs differ beyond the method:", highlight=False)
        for line in outcome.summary["warnings"]:
            console.print(f"  - {line}", highlight=False, markup=False)
    console.print(_results_table(outcome.summary))
    console.print(f"report: {outcome.report_html}")


@app.command()
def report(
    ref: Annotated[str, typer.Argument(help="Run or comparison id, prefix, or directory.")],
    runs_dir: RunsDir = None,
) -> None:
    """(Re)write the HTML and Markdown report of a run or comparison."""
    from ribbed.experiments.harness import summarize_records
    from ribbed.report import write_report
    from ribbed.runs import open_run

    try:
        record = open_run(_runs_dir(runs_dir), ref)
        record.check_files()
        summary = record.read_summary() or {}
        if record.kind not in ("comparison", "study") or ("runs" not in summary and "study" not in summary):
            summary = summarize_records([record], kind="run", name=record.read_meta().get("name", record.id))
        else:
            for run in summary.get("runs", []):  # the members the report reads
                open_run(record.runs_dir, run["id"]).check_files()
        html, md = write_report(summary, record.path)
    except (LookupError, ValueError, OSError) as exc:
        _fail(str(exc))
    console.print(f"report: {html}\nsummary: {md}")


@app.command()
def index(
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild the index from the run dirs.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Check the runs index (a cache of the run dirs), or rebuild it with --rebuild.

    A damaged index file is moved aside (``index.sqlite.damaged-<time>``) before rebuilding.
    """
    import sqlite3

    from ribbed.runs import rebuild_index
    from ribbed.runs.index import IndexDamaged, check_readable, index_path

    root = _runs_dir(runs_dir)
    if not root.is_dir():
        _fail(f"--runs-dir: {root} is not a directory")
    try:
        if rebuild:
            console.print(f"rebuilt {index_path(root)} from {rebuild_index(root)} run dirs", highlight=False)
            return
        if not index_path(root).exists():
            _fail(f"{index_path(root)}: no index yet (`ribbed list` or `ribbed index --rebuild` builds it)")
        check_readable(root)
    except IndexDamaged as exc:
        _fail(f"{exc}; run `ribbed index --rebuild` (it moves the file aside)")
    except (OSError, sqlite3.Error) as exc:
        _fail(f"{index_path(root)}: {exc}")
    console.print(f"{index_path(root)}: readable", highlight=False)


@app.command()
def evaluate(
    run_ref: Annotated[str, typer.Argument(help="Run id, unique id prefix, or run directory.")],
    data: Annotated[str | None, typer.Option(
        help="Another dataset to test on (default: the run's own); its inputs and classes must fit the model.")] = None,
    split: Annotated[str, typer.Option(help="Split to test: test, val or train.")] = "test",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override of the run's config before loading, e.g. data.options.path=DIR (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Test a finished run's saved weights (model.safetensors) on its data or another, without retraining."""
    from ribbed.config import ConfigError
    from ribbed.experiments.evaluate import evaluate_run
    from ribbed.runs import open_run

    try:
        result = evaluate_run(open_run(_runs_dir(runs_dir), run_ref), data=data, split=split,
                              overrides=set_ or [])
    except (ConfigError, ValueError, LookupError) as exc:
        _fail(str(exc))
    if as_json:
        console.print_json(json.dumps(result))
        return
    table = Table(title=f"{result['run']}: saved weights on {result['dataset']} ({result['split']} split)")
    for column in ("samples", "loss", "acc", "recorded loss", "recorded acc"):
        table.add_column(column)
    table.add_row(str(result["samples"]), _fmt(result["loss"], ".4f"), _fmt(result["acc"], ".4f"),
                  _fmt(result.get("recorded_loss"), ".4f"), _fmt(result.get("recorded_acc"), ".4f"))
    console.print(table)


@app.command()
def datasets() -> None:
    """List the datasets (all offline) and their options."""
    from ribbed.data import list_datasets

    table = Table(title="datasets")
    table.add_column("name")
    table.add_column("description")
    for name, description in list_datasets().items():
        table.add_row(name, description)
    console.print(table)


@app.command()
def presets() -> None:
    """List the experiment presets that `ribbed run NAME` accepts."""
    from ribbed.experiments.presets import list_presets

    table = Table(title="presets (durations on 2 idle CPU cores unless stated)")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    table.add_column("takes")
    for name, info in list_presets().items():
        table.add_row(name, info.summary, info.duration or "not stated")
    console.print(table)


def main() -> None:
    """The ``ribbed`` command. Warnings of the run store (an index repaired, a run dir skipped)
    print as ``warning: ...`` lines; Ctrl-C before or after training prints ``interrupted``
    and exits 130 (during training, the command says where the run stopped)."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    store_log = logging.getLogger("ribbed.runs")
    store_log.addHandler(handler)
    store_log.propagate = False
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        raise SystemExit(130) from None
