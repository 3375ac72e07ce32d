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
token ``NaN`` / ``Infinity``, which Python's :func:`json.loads` reads back as a float.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ribbed.runs.atomic import atomic_write_text
from ribbed.runs.environment import capture_environment
from ribbed.runs.index import index_path, replace_all_rows, select_rows, upsert_rows

RUNS_DIR_ENV = "RIBBED_RUNS_DIR"

FINAL_STATUSES = ("completed", "diverged", "failed", "interrupted")
STATUSES = ("running", *FINAL_STATUSES)

META_FILE = "run.json"
CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"

_SLUG_MAX_LEN = 40
_MAX_CANDIDATES = 10


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
        """The resolved config the run was created with."""
        return yaml.safe_load(self.config_path.read_text(encoding="utf-8")) or {}

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
        with open(self.metrics_path, "ab", buffering=0) as file:
            written = file.write(line)
            if written != len(line):
                raise OSError(f"short write to {self.metrics_path}: {written} of {len(line)} bytes")
            if fsync:
                os.fsync(file.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metric rows in order; a trailing partial line (a killed writer) is skipped."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").split("\n")
        complete = lines[:-1]  # the last piece has no newline: empty, or a partial line
        rows = []
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{self.metrics_path}:{number}: not a JSON row ({error})"
                ) from None
        return rows

    def truncate_metrics_after(self, step: int) -> None:
        """Keep only rows with ``row["step"] <= step`` (resuming from that checkpoint).

        Rewrites the file atomically, which also drops a partial trailing line.
        """
        if not self.metrics_path.exists():
            return
        kept = [row for row in self.read_metrics() if row["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(_dumps(row) + "\n" for row in kept))

    def set_status(self, status: str) -> None:
        """Record ``status`` (e.g. ``"running"`` again on resume) in ``run.json`` and the index."""
        _check_status(status, STATUSES)
        self._write_meta(status=status)
        self._sync_index()

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` and mark the run ``status`` (one of :data:`FINAL_STATUSES`)."""
        _check_status(status, FINAL_STATUSES)
        if "status" in summary:
            raise ValueError("pass the status as the 'status' argument, not inside the summary")
        atomic_write_text(self.summary_path, _dumps({"status": status, **summary}, indent=2))
        self._write_meta(status=status)
        self._sync_index()

    def index_row(self) -> dict[str, Any]:
        """This record's row for the index, built from ``run.json`` and ``summary.json``."""
        summary = self.read_summary()
        return {
            **self.read_meta(),
            "path": str(self.path),
            "summary_json": None if summary is None else _dumps(summary),
        }

    def _write_meta(self, **changes: Any) -> None:
        meta = {**self.read_meta(), **changes, "updated": _utc_now().isoformat()}
        atomic_write_text(self.meta_path, _dumps(meta, indent=2))

    def _sync_index(self) -> None:
        upsert_rows(self.runs_dir, [self.index_row()])


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
    """All records found in the directories of ``runs_dir`` (no index involved), by id."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return [
        RunRecord.load(path) for path in sorted(runs_dir.iterdir()) if (path / META_FILE).is_file()
    ]


def rebuild_index(runs_dir: Path | str) -> int:
    """Regenerate ``index.sqlite`` from the run directories; returns the number of rows."""
    rows = [record.index_row() for record in iter_records(runs_dir)]
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    replace_all_rows(runs_dir, rows)
    return len(rows)


def list_runs(
    runs_dir: Path | str,
    kind: str | None = None,
    parent: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Index rows, newest first, with the summary parsed into ``row["summary"]``.

    A missing index is rebuilt from the run directories first; a missing ``runs_dir``
    has no runs.
    """
    if not Path(runs_dir).is_dir():
        return []
    if not index_path(runs_dir).exists():
        if not iter_records(runs_dir):
            return []
        rebuild_index(runs_dir)
    return select_rows(runs_dir, kind=kind, parent=parent, limit=limit)


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
    return json.loads(path.read_text(encoding="utf-8"))
