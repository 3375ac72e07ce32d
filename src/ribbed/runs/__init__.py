"""Run records: a directory per run (config, environment, metrics, checkpoints, summary),
a SQLite index of all runs, and the trackers that report metrics while a run trains.

Example:
    >>> import tempfile
    >>> from ribbed.runs import create_run, list_runs
    >>> runs_dir = tempfile.mkdtemp()
    >>> record = create_run(runs_dir, name="baseline", config={"lr": 0.1}, seed=0)
    >>> record.finish("completed", {"test_acc": 0.9})
    >>> [row["status"] for row in list_runs(runs_dir)]
    ['completed']
"""

from ribbed.runs.atomic import atomic_write_bytes, atomic_write_text
from ribbed.runs.environment import capture_environment
from ribbed.runs.records import (
    FINAL_STATUSES,
    STATUSES,
    RunNotFound,
    RunRecord,
    create_run,
    default_runs_dir,
    iter_records,
    list_runs,
    open_run,
    rebuild_index,
)
from ribbed.runs.trackers import (
    TRACKERS,
    JsonlTracker,
    Tracker,
    TrackerUnavailable,
    build_tracker,
)

__all__ = [
    "FINAL_STATUSES",
    "STATUSES",
    "TRACKERS",
    "JsonlTracker",
    "RunNotFound",
    "RunRecord",
    "Tracker",
    "TrackerUnavailable",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_tracker",
    "capture_environment",
    "create_run",
    "default_runs_dir",
    "iter_records",
    "list_runs",
    "open_run",
    "rebuild_index",
]
