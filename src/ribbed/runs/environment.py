"""What a run ran on: interpreter, hardware, library versions, git state, command line.

Written to each run's ``env.json`` so a result can be traced to the code and machine that
produced it. Every probe degrades to ``None`` instead of raising: recording the
environment must never be the reason a run fails.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

KEY_PACKAGES = (
    "numpy",
    "scipy",
    "scikit-learn",
    "mnist1d",
    "pydantic",
    "optuna",
    "matplotlib",
    "ribbed",
)

_GIT_TIMEOUT_S = 5.0
_CPUINFO = Path("/proc/cpuinfo")


def capture_environment() -> dict[str, Any]:
    """A JSON-serialisable description of the current process and machine.

    Keys: ``time_utc``, ``argv``, ``python`` (version, implementation, executable),
    ``platform``, ``hostname``, ``cpu`` (model, count), ``torch`` (version, cpu_capability,
    cuda_available, cuda_version, devices), ``packages`` (name -> version or None), ``git`` with ``cwd``
    and ``ribbed`` entries (``{"root", "commit", "dirty"}`` or None outside a repository).
    """
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(),
        "argv": list(sys.argv),
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": {"model": cpu_model(), "count": os.cpu_count()},
        "torch": _torch_info(),
        "packages": {name: package_version(name) for name in KEY_PACKAGES},
        "git": {
            "cwd": git_state(Path.cwd()),
            "ribbed": git_state(Path(__file__).resolve().parent),
        },
    }


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None if it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state(directory: Path) -> dict[str, Any] | None:
    """``{"root", "commit", "dirty"}`` of the git work tree holding ``directory``.

    None when ``directory`` is not in a work tree or git is unavailable. ``commit`` is
    None in a repository without commits; ``dirty`` counts changes to tracked files only,
    so an untracked ``runs/`` folder does not mark every run dirty.
    """
    root = _git(directory, "rev-parse", "--show-toplevel")
    if root is None:
        return None
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    return {
        "root": root,
        "commit": _git(directory, "rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
    }


def _git(directory: Path, *args: str) -> str | None:
    """Stripped stdout of ``git <args>`` run in ``directory``; None on any failure."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def cpu_description() -> str:
    """The CPU model and the vector instruction set torch's kernels use on it (``AVX512``,
    ``AVX2``, ...): what a published timing must name, since the same code runs at different
    relative speeds on machines with and without AVX-512."""
    import torch

    return f"{cpu_model() or 'unknown CPU'} ({torch.backends.cpu.get_cpu_capability()} kernels)"


def cpu_model() -> str | None:
    """The CPU model name from /proc/cpuinfo (Linux), else what ``platform`` reports."""
    try:
        for line in _CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _torch_info() -> dict[str, Any]:
    # Imported here so that `import ribbed.runs` (e.g. for `ribbed list`) stays fast.
    try:
        import torch
    except ImportError:
        return {"version": None, "cpu_capability": None, "cuda_available": False, "cuda_version": None,
                "devices": []}
    cuda_available = torch.cuda.is_available()
    try:
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except RuntimeError:  # a broken driver can fail here even after is_available()
        devices = None
    return {
        "version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX512, AVX2...: the kernels in use
        "cuda_available": cuda_available,
        "cuda_version": torch.version.cuda,
        "devices": devices,
    }
