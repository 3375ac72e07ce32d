"""Start ``N`` worker processes with torchrun's own machinery and report a failure clearly.

:func:`launch` is what ``ribbed run --nproc N`` calls: it runs ``python -m ribbed <args>``
(or another module) on ``N`` local workers through ``torch.distributed.launcher``'s
``elastic_launch``, the engine behind ``torchrun --standalone``, with no restarts. When a
worker fails (an exception, a crash, a kill), torchrun's agent stops the others and
:class:`DistributedRunError` says which rank failed and how. A worker that hangs instead of
dying is caught by the process-group timeout (``train.distributed.timeout_s``): its peers'
collectives raise, they exit, and the agent stops the rest.

Every worker runs the same command; rank 0 writes the records under the runs root, the
others write theirs to a scratch directory removed when they exit (:func:`worker_runs_dir`),
so the files of a distributed run look like those of a single process.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from ribbed.distributed.process_group import is_launched, launched_rank

__all__ = ["DistributedRunError", "describe_failure", "launch", "worker_runs_dir"]

MONITOR_INTERVAL_S = 0.1


class DistributedRunError(RuntimeError):
    """A distributed run failed: which rank(s), and how."""


def describe_failure(exc: ChildFailedError) -> str:
    """One line per failed rank: its exit code or the signal that killed it."""
    lines = []
    for rank, failure in sorted(exc.failures.items()):
        if failure.exitcode < 0:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        else:
            how = f"exited with code {failure.exitcode}"
        detail = failure.message if isinstance(failure.message, str) else ""
        lines.append(f"rank {rank} (pid {failure.pid}) {how}" + (f": {detail}" if detail else ""))
    return "; ".join(lines)


def launch(args: Sequence[str], nproc: int, *, module: str = "ribbed") -> None:
    """Run ``python -m module *args`` on ``nproc`` local workers; raise if any of them fails.

    Raises:
        ValueError: ``nproc`` below 1.
        DistributedRunError: a worker failed; the other workers were stopped.
    """
    if nproc < 1:
        raise ValueError(f"--nproc: got {nproc}; allowed: a positive number of processes")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=MONITOR_INTERVAL_S,
    )
    try:
        elastic_launch(config, sys.executable)("-m", module, *args)
    except ChildFailedError as exc:
        raise DistributedRunError(
            f"distributed run on {nproc} processes failed: {describe_failure(exc)}; "
            "the other ranks were stopped"
        ) from None


def worker_runs_dir(root: Path) -> Path:
    """``root`` on rank 0 (or outside a launch); a scratch directory on the other ranks."""
    if not is_launched() or launched_rank() == 0:
        return root
    scratch = Path(tempfile.mkdtemp(prefix=f"ribbed-rank{launched_rank()}-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return scratch
