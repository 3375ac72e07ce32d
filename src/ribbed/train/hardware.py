"""Where a run computes: its device and its number of CPU threads.

Both are settings of ``train`` (``device``, ``threads``) whose default, ``auto``, is resolved
here once per run and recorded in the run's summary, because results depend on them (the
same seed gives different floating-point sums with 1 and 2 threads).

``device: auto`` picks CUDA, then Apple's MPS, then the CPU, as Lightning and Accelerate do.

``threads: auto`` exists because torch's default (one intra-op thread per core) is the worst
choice on a small machine shared with other jobs: on 2 busy cores a step of the default run
took 25-46 times longer with 2 threads than with 1, as the threads wait for each other. The
rule:

1. ``$OMP_NUM_THREADS`` set: torch already follows it, so keep torch's count (the user chose).
2. 2 cores or fewer: 1 thread (a second thread saves little on tiny models and costs a lot
   as soon as anything else runs).
3. Otherwise the cores the 1-minute load average leaves idle (``cores - round(load)``),
   at least 1 and at most torch's default.

The rule is applied once per process, so every run of a process (a comparison's members, the
tests) uses the same count even as the load changes; a run records the count it used and a
resumed run takes that one. Two processes compared bit for bit should set ``threads`` (the
count can differ between them on a machine with more than 2 cores).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import torch

__all__ = ["auto_threads", "available_devices", "process_threads", "resolve_device", "resolve_threads"]

_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before any run changes it


def available_devices() -> list[str]:
    """The device types this process can use, best first (``cuda``, ``mps``, ``cpu``)."""
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return [*devices, "cpu"]


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device: ``auto`` is the first of :func:`available_devices`;
    a named accelerator that is not there is an error naming what is."""
    available = available_devices()
    if name == "auto":
        return torch.device(available[0])
    if name not in available:
        raise ValueError(
            f"train.device: got {name!r} but no {name.upper()} device is available; "
            f"allowed here: {', '.join([*available, 'auto'])}"
        )
    return torch.device(name)


def auto_threads(cores: int | None = None, load: float | None = None, env: Mapping[str, str] | None = None) -> int:
    """The thread count ``threads: auto`` gives (the rule in the module docstring).

    ``cores``, ``load`` (1-minute load average) and ``env`` default to this machine's; tests
    pass their own.
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").strip():
        return _TORCH_DEFAULT_THREADS
    if cores is None:
        cores = os.cpu_count() or 1
    if cores <= 2:
        return 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this platform: assume idle
            load = 0.0
    return max(1, min(_TORCH_DEFAULT_THREADS, cores - round(load)))


@functools.lru_cache(maxsize=1)
def process_threads() -> int:
    """``threads: auto`` for this process: :func:`auto_threads` on this machine, taken once."""
    return auto_threads()


def resolve_threads(setting: int | str) -> int:
    """Apply ``train.threads`` to this process (``torch.set_num_threads``); return the count."""
    threads = process_threads() if setting == "auto" else int(setting)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
