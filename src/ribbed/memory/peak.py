"""Peak memory of a piece of work: the process's resident set and, when a GPU is there, CUDA.

CPU tensors live in the process heap, so the peak CPU memory of training is the peak
resident set size (RSS). Linux keeps that peak as ``VmHWM`` in ``/proc/self/status`` and
resets it to the current RSS when ``5`` is written to ``/proc/self/clear_refs`` (Linux 4.0+,
``man 5 proc``); :func:`track_peak_memory` resets it, runs the block, and reports the peak
above the RSS at the start. Before the reset, glibc's ``malloc_trim`` hands freed heap back
to the system, so memory freed by earlier work is not silently reused and hidden from the
peak. Where the peak cannot be reset (not Linux, no ``/proc``), the process peak is
reported as ``None`` rather than a lifetime maximum that would not belong to the block.

On CUDA the allocator's own statistics are exact: ``torch.cuda.reset_peak_memory_stats``
and ``torch.cuda.max_memory_allocated``.

Example:
    >>> import torch
    >>> with track_peak_memory() as peak:
    ...     buffer = torch.ones(4_000_000)  # 16 MB
    >>> peak.process_bytes is None or peak.process_bytes > 8_000_000
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PeakMemory", "process_rss_bytes", "track_peak_memory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK_RSS = "5"


@dataclass
class PeakMemory:
    """Peak memory above the start of the block, in bytes; ``None`` where not measurable."""

    process_bytes: int | None = None
    cuda_bytes: int | None = None


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def process_rss_bytes() -> int | None:
    """The process's current resident set size, or ``None`` without ``/proc``."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _release_free_heap() -> None:
    """Return freed heap pages to the system (glibc only; a no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    malloc_trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def _reset_process_peak() -> bool:
    try:
        _CLEAR_REFS.write_text(_RESET_PEAK_RSS)
    except OSError:
        return False
    return True


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda") if device is None else torch.device(device)
    return device if device.type == "cuda" else None


@contextlib.contextmanager
def track_peak_memory(device: torch.device | str | None = None) -> Iterator[PeakMemory]:
    """Measure the peak process and CUDA memory of the ``with`` block.

    Args:
        device: the CUDA device to watch (default: the current one when CUDA is available);
            a CPU device watches no GPU.

    Yields:
        A :class:`PeakMemory`, filled in when the block ends.
    """
    cuda = _cuda_device(device)
    if cuda is not None:
        torch.cuda.synchronize(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        cuda_start = torch.cuda.memory_allocated(cuda)
    _release_free_heap()
    rss_start = process_rss_bytes() if _reset_process_peak() else None
    result = PeakMemory()
    yield result
    if rss_start is not None:
        peak_kib = _status_kib("VmHWM")
        result.process_bytes = None if peak_kib is None else max(0, peak_kib * 1024 - rss_start)
    if cuda is not None:
        torch.cuda.synchronize(cuda)
        result.cuda_bytes = torch.cuda.max_memory_allocated(cuda) - cuda_start
