"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The data goes to a temporary file in the target's directory (so the final rename stays
on one filesystem), is flushed and fsynced, then ``os.replace`` swaps it in. A process
killed midway leaves at most a stray ``.<name>.*.tmp`` file, never a truncated target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_NEW_FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_writer(path: Path | str) -> Iterator[BinaryIO]:
    """A binary file handle whose contents replace ``path`` atomically when the block ends.

    If the block raises, the temporary file is removed and ``path`` is left as it was. The
    parent directory must exist. A symbolic link at ``path`` is replaced by the new file,
    never written through, so a write cannot land outside the directory. An existing file
    keeps its permission bits; a new one gets ``0o644`` (``mkstemp`` alone would leave it
    readable by the owner only).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "state.bin"
        >>> with atomic_writer(target) as handle:
        ...     _ = handle.write(b"\\x00\\x01")
        >>> target.read_bytes()
        b'\\x00\\x01'
    """
    path = Path(path)
    regular = path.exists() and not path.is_symlink()  # a link is replaced, its target left alone
    mode = path.stat().st_mode & 0o7777 if regular else _NEW_FILE_MODE
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_writer`).

    Raises:
        OSError: the write failed (disk full, file size limit, read-only folder); the message
            names ``path`` and the cause, and ``path`` is left as it was.
    """
    try:
        with atomic_writer(path) as handle:
            handle.write(data)
    except OSError as error:
        if str(path) in str(error):
            raise
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from None


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))
