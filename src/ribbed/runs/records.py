"""Run records: one directory per training run (or comparison of runs) under a runs root.

Layout of ``<runs_dir>/<id>/``::

    run.json         identity and status: id, name, kind, parent, method, dataset, seed,
                     status, created, updated (the source of truth for the index row)
    config.yaml      the resolved config, as given to :func:`create_run`
    env.json         :func:`~ribbed.runs.environment.capture_environment` at creation
    metrics.jsonl    one JSON object per line, each with a ``"step"``
    checkpoints/     written by the trainer
    summary.json     ``{"status": ..., **summary}`` once the run finished

Every whole-file write is atomic; metric rows are appended with a single ``write`` call.
``<runs_dir>/index.sqlite`` (see :mod:`ribbed.runs.index`) holds one row per record and
can be regenerated from the directories with :func:`rebuild_index`.

JSON files are written with ``allow_nan=True``: a diverged loss is stored as the bare
token ``NaN`` / ``Infinity``, which Python's :func:`json.loads` reads back as a float. A file
that is empty or not JSON raises :class:`RunFileError`, which names the file and the problem.

While a run is ``running``, ``run.json`` also names the process that runs it (``pid``,
``host``, ``pid_started``); a running run whose process is gone is reported ``stale`` by
:func:`list_runs` and :meth:`RunRecord.effective_status` (killed, or lost to a power cut).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ribbed.runs.atomic import atomic_write_text
from ribbed.runs.environment import capture_environment
from ribbed.runs.index import (
    COLUMNS,
    IndexDamaged,
    check_readable,
    index_path,
    replace_all_rows,
    select_ids,
    select_rows,
    upsert_rows,
)

RUNS_DIR_ENV = "RIBBED_RUNS_DIR"

FINAL_STATUSES = ("completed", "diverged", "failed", "interrupted")
STATUSES = ("running", *FINAL_STATUSES)
STALE = "stale"  # shown, never stored: "running" in run.json, but its process is gone
FINISHED = ("completed", "diverged")  # nothing left to resume

_log = logging.getLogger(__name__)

META_FILE = "run.json"
CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"

_SLUG_MAX_LEN = 40
_MAX_CANDIDATES = 10


class RunFileError(ValueError):
    """A run file (``run.json``, ``summary.json``, ``metrics.jsonl``) that is empty or not JSON."""


class RunNotFound(LookupError):
    """No run, or more than one, matches a reference; ``candidates`` lists likely ids."""

    def __init__(self, message: str, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates


def default_runs_dir() -> Path:
    """The runs root: ``$RIBBED_RUNS_DIR`` if set, else ``./runs``."""
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs").expanduser()


@dataclass(frozen=True)
class RunRecord:
    """Handle on one run directory; get one from :func:`create_run` or :func:`open_run`."""

    id: str
    path: Path
    runs_dir: Path
    kind: str

    @classmethod
    def load(cls, path: Path | str) -> RunRecord:
        """The record stored in directory ``path`` (which must contain ``run.json``)."""
        path = Path(path).resolve()
        meta = _read_json(path / META_FILE)
        return cls(id=meta["id"], path=path, runs_dir=path.parent, kind=meta["kind"])

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def env_path(self) -> Path:
        return self.path / ENV_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    def read_meta(self) -> dict[str, Any]:
        """The contents of ``run.json``: identity, status and timestamps."""
        return _read_json(self.meta_path)

    def read_config(self) -> dict[str, Any]:
        """The resolved config the run was created with.

        Raises:
            RunFileError: ``config.yaml`` is missing, not YAML, or not a mapping (named in the message).
        """
        try:
            config = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunFileError(f"{self.config_path}: missing (every run dir holds its config)") from None
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise RunFileError(f"{self.config_path}: not valid YAML ({' '.join(str(error).split())[:200]})") from None
        if config is not None and not isinstance(config, dict):
            raise RunFileError(f"{self.config_path}: holds a {type(config).__name__}, expected a mapping")
        return config or {}

    def read_summary(self) -> dict[str, Any] | None:
        """``{"status": ..., **summary}`` as passed to :meth:`finish`; ``None`` before that."""
        if not self.summary_path.exists():
            return None
        return _read_json(self.summary_path)

    def append_metrics(self, row: dict[str, Any], *, fsync: bool = False) -> None:
        """Append ``row`` (which must have a ``"step"``) as one line of ``metrics.jsonl``.

        The line goes out in a single unbuffered ``write`` on an ``O_APPEND`` file, so a
        concurrent reader or a killed process sees whole lines, except possibly a
        truncated last one, which :meth:`read_metrics` skips. ``fsync=True`` also
        forces it to disk (slower; for rows that must survive a power cut).
        """
        if "step" not in row:
            raise ValueError(f"a metrics row needs a 'step' key, got keys {sorted(row)}")
        line = (_dumps(row) + "\n").encode("utf-8")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)  # never through a link
        try:
            with open(os.open(self.metrics_path, flags, 0o644), "ab", buffering=0) as file:
                written = file.write(line)
                if written != len(line):
                    raise OSError(f"short write to {self.metrics_path}: {written} of {len(line)} bytes")
                if fsync:
                    os.fsync(file.fileno())
        except OSError as error:
            if error.errno is None:
                raise
            raise OSError(error.errno, f"cannot append to {self.metrics_path}: {error.strerror}") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metric rows in order; a trailing partial line (a killed writer) is skipped.

        Raises:
            RunFileError: a complete line is not a JSON object with a ``"step"`` (the
                message names the file, the line and the problem).
        """
        if not self.metrics_path.exists():
            return []
        try:
            text = self.metrics_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise RunFileError(f"{self.metrics_path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        complete = text.split("\n")[:-1]  # the last piece has no newline: empty, or a partial line
        rows = []
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RunFileError(f"{self.metrics_path}:{number}: not a JSON row ({error})") from None
            if not isinstance(row, dict) or "step" not in row:
                raise RunFileError(f"{self.metrics_path}:{number}: a row must be a JSON object with a 'step'")
            rows.append(row)
        return rows

    def check_files(self) -> None:
        """Raise :class:`RunFileError` when a finished run's files cannot back a report:
        ``summary.json`` unreadable, or ``metrics.jsonl`` missing or empty although the run
        trained and evaluated (so a report would be silently empty)."""
        summary = self.read_summary()
        metrics = self.read_metrics()
        if self.kind != "run" or summary is None or summary.get("status") not in FINISHED:
            return
        if summary.get("steps") and not metrics:
            state = "empty" if self.metrics_path.exists() else "missing"
            raise RunFileError(
                f"{self.metrics_path}: {state}, though the run finished {summary['steps']} steps "
                "(its evaluation rows are lost; the report would have no curves)"
            )

    def truncate_metrics_after(self, step: int) -> None:
        """Keep only rows with ``row["step"] <= step`` (resuming from that checkpoint).

        Rewrites the file atomically, which also drops a partial trailing line.
        """
        if not self.metrics_path.exists():
            return
        kept = [row for row in self.read_metrics() if row["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(_dumps(row) + "\n" for row in kept))

    def remove_stray_files(self) -> list[Path]:
        """Delete the temporary files (``.<name>.*.tmp``) that an atomic write killed midway left
        in the run dir; returns them. Call only while no other process writes this run."""
        stray = [path for path in self.path.glob(".*.tmp") if path.is_file() and not path.is_symlink()]
        for path in stray:
            path.unlink(missing_ok=True)
        return stray

    def set_status(self, status: str) -> None:
        """Record ``status`` (e.g. ``"running"`` again on resume) in ``run.json`` and the index.

        ``"running"`` also records this process (see :meth:`effective_status`).
        """
        _check_status(status, STATUSES)
        self._write_meta(status=status, **(_this_process() if status == "running" else {}))
        self._sync_index()

    def effective_status(self) -> str | None:
        """The recorded status, or ``"stale"`` for a ``running`` run whose process is gone
        (``None`` for a ``run.json`` without one)."""
        return effective_status(self.read_meta())

    def record_error(self, error: BaseException, **details: Any) -> str:
        """Finish the run after ``error`` stopped it: ``interrupted`` for a ``KeyboardInterrupt``
        (Ctrl-C, SIGTERM), else ``failed``; the summary holds the error in one line and
        ``details`` (e.g. the step reached). Returns the status written.

        When even that cannot be written (a full disk, a read-only folder) the reason is
        logged and the run is left as it was (``list`` then shows it ``stale``).
        """
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        text = " ".join(str(error).split()) or type(error).__name__
        try:
            self.finish(status, {"error": f"{type(error).__name__}: {text}", **details})
        except OSError as write_error:
            _log.warning("could not mark %s %s: %s", self.path, status, write_error)
        return status

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` and mark the run ``status`` (one of :data:`FINAL_STATUSES`)."""
        _check_status(status, FINAL_STATUSES)
        if "status" in summary:
            raise ValueError("pass the status as the 'status' argument, not inside the summary")
        atomic_write_text(self.summary_path, _dumps({"status": status, **summary}, indent=2))
        self._write_meta(status=status)
        self._sync_index()

    def index_row(self, with_summary: bool = True) -> dict[str, Any]:
        """This record's row for the index, built from ``run.json`` and ``summary.json``."""
        summary = self.read_summary() if with_summary else None
        meta = self.read_meta()
        return {
            **{column: meta.get(column) for column in COLUMNS if column in meta},
            "path": str(self.path),
            "summary_json": None if summary is None else _dumps(summary),
        }

    def _write_meta(self, **changes: Any) -> None:
        meta = {**self.read_meta(), **changes, "updated": _utc_now().isoformat()}
        atomic_write_text(self.meta_path, _dumps(meta, indent=2))

    def _sync_index(self) -> None:
        try:
            upsert_rows(self.runs_dir, [self.index_row()])
        except IndexDamaged as damage:
            repair_index(self.runs_dir, damage)  # the rebuilt index holds this record too


def create_run(
    runs_dir: Path | str,
    *,
    name: str,
    kind: str = "run",
    config: dict[str, Any],
    parent: str | None = None,
    method: str | None = None,
    dataset: str | None = None,
    seed: int | None = None,
) -> RunRecord:
    """Create a new run directory under ``runs_dir`` and register it as ``"running"``.

    The id is ``<UTC YYYYmmdd-HHMMSS>-<slug of name>-<6 random hex>``; creating the
    directory is exclusive, so two processes starting in the same second still get
    distinct ids. ``parent`` is the id of the comparison this run belongs to.

    Example:
        >>> import tempfile
        >>> rec = create_run(tempfile.mkdtemp(), name="MLP baseline", config={"lr": 0.1})
        >>> rec.append_metrics({"step": 0, "loss": 2.3})
        >>> rec.finish("completed", {"final_loss": 2.3})
        >>> rec.read_summary()
        {'status': 'completed', 'final_loss': 2.3}
    """
    if not kind:
        raise ValueError("kind must be a non-empty string such as 'run' or 'comparison'")
    runs_dir = Path(runs_dir).resolve()
    if parent is not None and not (runs_dir / parent / META_FILE).is_file():
        raise ValueError(f"parent {parent!r} is not a record in {runs_dir}")
    config_text = yaml.safe_dump(config, sort_keys=False)  # fails before anything is created
    runs_dir.mkdir(parents=True, exist_ok=True)

    created = _utc_now()
    path = _make_unique_dir(runs_dir, f"{created:%Y%m%d-%H%M%S}-{slugify(name)}")
    meta = {
        "id": path.name,
        "name": name,
        "kind": kind,
        "parent": parent,
        "method": method,
        "dataset": dataset,
        "seed": seed,
        "status": "running",
        "created": created.isoformat(),
        "updated": created.isoformat(),
        **_this_process(),
    }
    atomic_write_text(path / CONFIG_FILE, config_text)
    atomic_write_text(path / ENV_FILE, _dumps(capture_environment(), indent=2))
    (path / CHECKPOINT_DIR).mkdir()
    atomic_write_text(path / META_FILE, _dumps(meta, indent=2))  # last: marks the dir a run

    record = RunRecord(id=path.name, path=path, runs_dir=runs_dir, kind=kind)
    record._sync_index()
    return record


def open_run(runs_dir: Path | str, ref: str) -> RunRecord:
    """The record ``ref`` names: a run directory path, an id, or a unique id prefix.

    Raises:
        RunNotFound: nothing matches, or a prefix matches several ids; the message and
            ``candidates`` list up to 10 ids the user may have meant.
    """
    runs_dir = Path(runs_dir)
    for path in (Path(ref), runs_dir / ref):
        if ref and (path / META_FILE).is_file():
            return RunRecord.load(path)

    ids = [record.id for record in iter_records(runs_dir)]
    matches = [run_id for run_id in ids if ref and run_id.startswith(ref)]
    if len(matches) == 1:
        return RunRecord.load(runs_dir / matches[0])
    if matches:
        shown = sorted(matches, reverse=True)[:_MAX_CANDIDATES]
        raise RunNotFound(
            f"{ref!r} matches {len(matches)} runs in {runs_dir}; give more of the id: "
            + ", ".join(shown),
            shown,
        )
    candidates = _close_ids(ref, ids)
    hint = f"; did you mean: {', '.join(candidates)}" if candidates else ""
    raise RunNotFound(f"no run matches {ref!r} in {runs_dir}{hint}", candidates)


def iter_records(runs_dir: Path | str) -> list[RunRecord]:
    """All records found in the directories of ``runs_dir`` (no index involved), by id.

    A directory whose ``run.json`` cannot be read is skipped with a warning naming it.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    records = []
    for path in sorted(_run_dirs(runs_dir)):
        try:
            records.append(RunRecord.load(path))
        except (RunFileError, KeyError, OSError) as error:
            _log.warning("skipping run dir %s: %s", path, error)
    return records


def _run_dirs(runs_dir: Path) -> list[Path]:
    return [path.parent for path in runs_dir.glob(f"*/{META_FILE}") if path.is_file()]


def _rows_from_dirs(runs_dir: Path | str) -> list[dict[str, Any]]:
    return _index_rows(iter_records(runs_dir))


def _index_rows(records: list[RunRecord]) -> list[dict[str, Any]]:
    """Index rows of ``records``; a damaged summary is warned about and left out of its row."""
    rows = []
    for record in records:
        try:
            rows.append(record.index_row())
        except RunFileError as error:
            _log.warning("%s", error)
            rows.append({**record.index_row(with_summary=False)})
    return rows


def rebuild_index(runs_dir: Path | str) -> int:
    """Regenerate ``index.sqlite`` from the run directories; returns the number of rows.

    A damaged index file is moved aside first (see :func:`repair_index`).
    """
    rows = _rows_from_dirs(runs_dir)
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    try:
        replace_all_rows(runs_dir, rows)
    except IndexDamaged:
        _move_aside(index_path(runs_dir))
        replace_all_rows(runs_dir, rows)
    return len(rows)


def repair_index(runs_dir: Path | str, damage: IndexDamaged) -> Path | None:
    """Move a damaged index aside (``index.sqlite.damaged-<time>``) and rebuild it from the
    run directories; says so in one warning line. Returns where the bad file went (``None``
    when another process had already repaired it)."""
    try:
        check_readable(runs_dir)
        return None  # repaired meanwhile by another process
    except IndexDamaged:
        pass
    moved = _move_aside(index_path(runs_dir))
    count = rebuild_index(runs_dir)
    _log.warning("%s; moved it to %s and rebuilt the index from %d run dirs", damage, moved, count)
    return moved


def _move_aside(path: Path) -> Path:
    """Rename the index and its WAL/shared-memory files to ``<name>.damaged-<UTC time>``."""
    suffix = f".damaged-{_utc_now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    target = path.with_name(path.name + suffix)
    for extra in ("", "-wal", "-shm"):
        source = path.with_name(path.name + extra)
        if source.exists():
            os.replace(source, path.with_name(path.name + suffix + extra))
    return target


def list_runs(
    runs_dir: Path | str,
    kind: str | None = None,
    parent: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Index rows, newest first, with the summary parsed into ``row["summary"]``.

    The index is a cache of the run directories, and is repaired here: a missing one is
    built; a damaged one is moved aside and rebuilt (one warning line); runs it lacks (an
    emptied file, a process killed between writing ``run.json`` and the index) are added
    (with a warning when the run is older than a few seconds, since that means damage).
    When the index cannot be read or written at all (a read-only runs dir), the rows come
    straight from the run directories. A ``running`` row whose process is gone shows
    ``"stale"``. A missing ``runs_dir`` has no runs.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    try:
        rows = _indexed_rows(runs_dir, kind=kind, parent=parent, limit=limit)
    except OSError as error:
        _log.warning("%s; reading the run dirs instead", error)
        rows = _filter_rows(_rows_from_dirs(runs_dir), kind=kind, parent=parent, limit=limit)
    for row in rows:
        if row["status"] == "running":
            row["status"] = _effective_status_at(Path(row["path"]))
    return rows


def _effective_status_at(path: Path) -> str | None:
    try:
        return effective_status(_read_json(path / META_FILE))
    except (RunFileError, OSError):
        return "running"


def _indexed_rows(runs_dir: Path, **query: Any) -> list[dict[str, Any]]:
    on_disk = {path.name: path for path in _run_dirs(runs_dir)}
    if not on_disk and not index_path(runs_dir).exists():
        return []
    try:
        if not index_path(runs_dir).exists():
            rebuild_index(runs_dir)
        missing = set(on_disk) - select_ids(runs_dir)
        if missing:
            _add_missing(runs_dir, [on_disk[run_id] for run_id in sorted(missing)])
        return select_rows(runs_dir, **query)
    except IndexDamaged as damage:
        repair_index(runs_dir, damage)
        return select_rows(runs_dir, **query)


_JUST_CREATED_S = 10.0


def _add_missing(runs_dir: Path, paths: list[Path]) -> None:
    """Index runs whose directories exist but whose rows do not."""
    records = []
    for path in paths:
        try:
            records.append(RunRecord.load(path))
        except (RunFileError, KeyError, OSError) as error:
            _log.warning("skipping run dir %s: %s", path, error)
    rows = _index_rows(records)
    old = [r for r in records if _utc_now().timestamp() - r.meta_path.stat().st_mtime > _JUST_CREATED_S]
    if old:
        _log.warning("run index %s lacked %d of the runs in %s; added them from their run dirs",
                     index_path(runs_dir), len(old), runs_dir)
    upsert_rows(runs_dir, rows)


def _filter_rows(rows: list[dict[str, Any]], *, kind: str | None, parent: str | None,
                 limit: int | None) -> list[dict[str, Any]]:
    """What :func:`~ribbed.runs.index.select_rows` would return, from rows built in memory."""
    chosen = [row for row in rows if (kind is None or row.get("kind") == kind)
              and (parent is None or row.get("parent") == parent)]
    chosen.sort(key=lambda row: (row.get("created") or "", row.get("id") or ""), reverse=True)
    result = []
    for row in chosen[:limit]:
        row = {column: row.get(column) for column in COLUMNS}
        summary_json = row.pop("summary_json")
        row["summary"] = None if summary_json is None else json.loads(summary_json)
        result.append(row)
    return result


def find_member(runs_dir: Path | str, config: dict[str, Any], parent: str | None = None,
                anywhere: bool = True) -> RunRecord | None:
    """A run of ``runs_dir`` that a comparison or study can use instead of training ``config`` again.

    The newest finished (completed or diverged) run whose recorded config equals ``config``
    exactly (of any parent, or only of ``parent`` unless ``anywhere``); failing that, an
    unfinished one (interrupted, failed, stale) of ``parent`` with that config, to resume in
    place. ``None`` when there is neither.
    """
    rows = [row for row in list_runs(runs_dir, kind="run") if row.get("name") == config.get("name")]
    unfinished = None
    for row in rows:
        record = RunRecord(id=row["id"], path=Path(row["path"]), runs_dir=Path(runs_dir).resolve(), kind="run")
        try:
            same = record.read_config() == config
        except (OSError, RunFileError):
            continue
        if not same:
            continue
        if row["status"] in FINISHED and (anywhere or row.get("parent") == parent):
            return record
        if unfinished is None and parent is not None and row.get("parent") == parent and row["status"] != "running":
            unfinished = record
    return unfinished


def slugify(name: str) -> str:
    """Lower-case ``name`` to ``[a-z0-9-]`` (at most 40 characters) for use in an id."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:_SLUG_MAX_LEN].rstrip("-")
    return slug or "run"


def _make_unique_dir(runs_dir: Path, stem: str) -> Path:
    """Create ``runs_dir/<stem>-<6 hex>`` exclusively, drawing new hex on a collision."""
    while True:
        path = runs_dir / f"{stem}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def _close_ids(ref: str, ids: list[str]) -> list[str]:
    """Ids containing ``ref``, then ids that look like it, then the newest ones."""
    newest_first = sorted(ids, reverse=True)
    containing = [run_id for run_id in newest_first if ref and ref in run_id]
    similar = difflib.get_close_matches(ref, newest_first, n=_MAX_CANDIDATES, cutoff=0.5)
    ranked = dict.fromkeys([*containing, *similar, *newest_first])
    return list(ranked)[:_MAX_CANDIDATES]


def _this_process() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_started": _process_start(os.getpid())}


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def effective_status(meta: dict[str, Any]) -> str | None:
    """``meta["status"]``, or ``"stale"`` when it says ``running`` but the process it names on
    this host is gone (or its pid now belongs to another process). A run on another host, or
    one recorded before processes were, is taken at its word; ``None`` when ``meta`` records no
    status."""
    status = meta.get("status")
    pid = meta.get("pid")
    if status != "running" or not isinstance(pid, int) or meta.get("host") != socket.gethostname():
        return status
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return STALE
    except PermissionError:
        pass  # alive, owned by someone else
    started = meta.get("pid_started")
    if started is not None and _process_start(pid) not in (None, started):
        return STALE
    return status


def _check_status(status: str, allowed: tuple[str, ...]) -> None:
    if status not in allowed:
        raise ValueError(f"status must be one of {list(allowed)}, got {status!r}")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _to_json(value: Any) -> Any:
    """``json.dumps`` fallback: NumPy/PyTorch scalars via ``.item()``, paths as strings."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"cannot store {type(value).__name__} in a run record as JSON: {value!r}")


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, allow_nan=True, default=_to_json, indent=indent)


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; :class:`RunFileError` names the file when it is empty or broken."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RunFileError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise RunFileError(f"{path}: empty file (expected a JSON object)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunFileError(f"{path}: not valid JSON "
                           f"({error.msg} at line {error.lineno}, column {error.colno})") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path}: holds a JSON {type(value).__name__}, expected an object")
    return value
