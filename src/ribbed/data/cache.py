"""On-disk cache of arrays that are slow to build (generated or parsed datasets).

Files are ``.npz`` archives written atomically (``ribbed.runs.atomic``: a temporary file in
the cache directory renamed over the target). Concurrent processes therefore see either no
file or a complete one, never a half-written one.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import platformdirs

from ribbed.runs.atomic import atomic_writer

Arrays = dict[str, np.ndarray]


def cache_dir() -> Path:
    """Return the cache directory, creating it if needed.

    ``$RIBBED_CACHE_DIR`` when set, else the platform's user cache directory for ``ribbed``.
    """
    path = Path(os.environ.get("RIBBED_CACHE_DIR") or platformdirs.user_cache_dir("ribbed"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_arrays(filename: str, build: Callable[[], Arrays]) -> Arrays:
    """Return the arrays cached under ``filename``, building and caching them on a miss.

    A cache file that cannot be read (e.g. damaged by a full disk) is rebuilt.
    """
    path = cache_dir() / filename
    cached = _read_arrays(path)
    if cached is not None:
        return cached
    arrays = build()
    save_arrays_atomically(path, arrays)
    return arrays


def save_arrays_atomically(path: Path, arrays: Arrays) -> None:
    """Write ``arrays`` to ``path`` as ``.npz`` so readers never see a partial file."""
    with atomic_writer(path) as file:
        np.savez(file, **arrays)  # type: ignore[arg-type]  # numpy's stub lets **kwds reach allow_pickle


def _read_arrays(path: Path) -> Arrays | None:
    """Return the arrays stored in ``path``, or None when it is missing or unreadable."""
    try:
        with np.load(path) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
