"""The SQLite index of all runs in a runs directory: one row per run, read by ``ribbed list``.

The index is a cache of what the run directories say (each run's ``run.json`` and
``summary.json``); :func:`ribbed.runs.records.rebuild_index` regenerates it from them.
This module only stores and queries rows; it knows nothing about the directory layout.

Several processes write at once (two ``ribbed run`` in the same runs directory), so
every write is one short ``BEGIN IMMEDIATE`` transaction on a WAL-mode database with a
60 s busy timeout, and the whole attempt is retried while SQLite reports the database
locked or busy.

Damage is told apart from contention: a file SQLite cannot read as a database (garbage, a
truncated page, a malformed schema) raises :class:`IndexDamaged`, which the records layer
answers by moving the file aside and rebuilding the index from the run directories. Reads
open the database read-only and change nothing, so listing works in a read-only runs dir.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

INDEX_FILENAME = "index.sqlite"

COLUMNS = (
    "id",
    "name",
    "kind",
    "parent",
    "method",
    "dataset",
    "seed",
    "status",
    "created",
    "updated",
    "path",
    "summary_json",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT,
    kind TEXT,
    parent TEXT,
    method TEXT,
    dataset TEXT,
    seed INTEGER,
    status TEXT,
    created TEXT,
    updated TEXT,
    path TEXT,
    summary_json TEXT
)
"""

_BUSY_TIMEOUT_S = 60.0
_ATTEMPTS = 20
_BACKOFF_S = 0.05

_T = TypeVar("_T")


class IndexDamaged(RuntimeError):
    """The index file is not a readable SQLite database; ``path`` and ``cause`` say which and why."""

    def __init__(self, path: Path, cause: str):
        super().__init__(f"run index {path} is damaged ({cause})")
        self.path = path
        self.cause = cause

_UPSERT = (
    f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
)


def index_path(runs_dir: Path | str) -> Path:
    """Where the index of ``runs_dir`` lives."""
    return Path(runs_dir) / INDEX_FILENAME


def upsert_rows(runs_dir: Path | str, rows: Iterable[dict[str, Any]]) -> None:
    """Insert or replace ``rows`` (dicts keyed by :data:`COLUMNS`) in one transaction."""
    values = [_row_values(row) for row in rows]
    _with_retry(runs_dir, lambda conn: conn.executemany(_UPSERT, values), write=True)


def replace_all_rows(runs_dir: Path | str, rows: Iterable[dict[str, Any]]) -> None:
    """Make ``rows`` the whole content of the index, atomically."""
    values = [_row_values(row) for row in rows]

    def replace(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM runs")
        conn.executemany(_UPSERT, values)

    _with_retry(runs_dir, replace, write=True)


def select_rows(
    runs_dir: Path | str,
    *,
    kind: str | None = None,
    parent: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of the index, newest first, optionally filtered by ``kind`` and ``parent``.

    Each row is a dict of the columns with ``summary_json`` replaced by ``summary``, the
    parsed summary (``None`` while the run has not finished).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    clauses: list[str] = []
    params: list[str | int] = []
    for column, value in (("kind", kind), ("parent", parent)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    query = f"SELECT {', '.join(COLUMNS)} FROM runs {where} ORDER BY created DESC, id DESC"
    if limit is not None:
        query += " LIMIT ?"
        params.append(limit)
    fetched = _with_retry(
        runs_dir, lambda conn: conn.execute(query, params).fetchall(), write=False
    )
    return [_parse_row(values) for values in fetched]


def select_ids(runs_dir: Path | str) -> set[str]:
    """The ids the index holds."""
    fetched = _with_retry(runs_dir, lambda conn: conn.execute("SELECT id FROM runs").fetchall(), write=False)
    return {run_id for (run_id,) in fetched}


def check_readable(runs_dir: Path | str) -> None:
    """Raise :class:`IndexDamaged` unless every row of the index can be read."""
    _with_retry(runs_dir, lambda conn: conn.execute(f"SELECT {', '.join(COLUMNS)} FROM runs").fetchall(),
                write=False)


def _row_values(row: dict[str, Any]) -> tuple[Any, ...]:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown index columns {sorted(unknown)}; allowed: {list(COLUMNS)}")
    return tuple(row.get(column) for column in COLUMNS)


def _parse_row(values: tuple[Any, ...]) -> dict[str, Any]:
    row = dict(zip(COLUMNS, values, strict=True))
    summary_json = row.pop("summary_json")
    row["summary"] = None if summary_json is None else json.loads(summary_json)
    return row


def _connect(runs_dir: Path | str, write: bool) -> sqlite3.Connection:
    """Open the index in autocommit mode (transactions are explicit).

    A writer switches the file to WAL and creates the table; a reader opens it read-only
    (``mode=ro``) and writes nothing. A reader of an index without the table (an empty file)
    sees no rows.
    """
    path = index_path(runs_dir)
    if write:
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    else:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S,
                               isolation_level=None)
    try:
        if write:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
        elif not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='runs'").fetchone():
            conn.execute("CREATE TEMP TABLE runs (" + ", ".join(COLUMNS) + ")")
    except BaseException:
        conn.close()
        raise
    return conn


def _is_damage(error: sqlite3.DatabaseError) -> bool:
    """Whether ``error`` says the file is not a usable database (rather than busy or read-only)."""
    message = str(error).lower()
    return any(text in message for text in ("not a database", "malformed", "disk image", "file is encrypted",
                                            "no such column"))


def _is_busy(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


def _with_retry(
    runs_dir: Path | str, work: Callable[[sqlite3.Connection], _T], *, write: bool
) -> _T:
    """Run ``work`` on a fresh connection, in a ``BEGIN IMMEDIATE`` transaction if ``write``.

    The busy timeout already waits for other writers; the retry covers the cases where
    SQLite gives up anyway (e.g. while another process switches the file to WAL mode).
    """
    for attempt in range(_ATTEMPTS):
        try:
            conn = _connect(runs_dir, write)
            try:
                if write:
                    conn.execute("BEGIN IMMEDIATE")
                result = work(conn)
                if write:
                    conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                conn.close()
        except sqlite3.DatabaseError as error:
            if _is_damage(error):
                raise IndexDamaged(index_path(runs_dir), str(error)) from None
            if not isinstance(error, sqlite3.OperationalError) or not _is_busy(error) or attempt == _ATTEMPTS - 1:
                # read-only, disk full, I/O error: a plain OSError naming the file
                raise OSError(f"run index {index_path(runs_dir)}: {error}") from None
            time.sleep(_BACKOFF_S * (attempt + 1) * (1 + random.random()))
    raise AssertionError("unreachable: the last attempt returns or raises")
