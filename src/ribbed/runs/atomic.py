"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The data goes to a temporary file in the target's directory (so the final rename stays
on one filesystem), is flushed and fsynced, then ``os.replace`` swaps it in. A process
killed midway leaves at most a stray ``.<name>.*.tmp`` file, never a truncated target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_NEW_FILE_MODE = 0o644


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically.

    The parent directory must exist. An existing file keeps its permission bits; a new
    one gets ``0o644`` (``mkstemp`` alone would leave it readable by the owner only).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "state.bin"
        >>> atomic_write_bytes(target, b"\\x00\\x01")
        >>> target.read_bytes()
        b'\\x00\\x01'
    """
    path = Path(path)
    mode = path.stat().st_mode & 0o7777 if path.exists() else _NEW_FILE_MODE
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))
