"""Training checkpoints that resume exactly, load safely and are checked before they are used.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers (model,
optimiser, scheduler and scaler states, RNG state, loop counters, metric history), so it
loads with ``weights_only=True``: no arbitrary code runs when a checkpoint is opened.

A run's checkpoints live in its ``checkpoints/`` folder as ``step-<N>.pt`` files and a
``manifest.json`` that lists the last two with their step, size and SHA-256 (computed while
the file is written). The manifest is the commit point: a checkpoint file is written
atomically (``ribbed.runs.atomic``), then the manifest is replaced atomically to name it,
then files the manifest no longer names are deleted. A process killed (or a disk that fills
up) at any moment therefore leaves the previous manifest and the checkpoints it names
intact. On resume the newest checkpoint whose size, checksum and contents check out is
used; a damaged one is reported and the previous one tried (see :meth:`CheckpointStore.load`).

Final weights are also written as safetensors for use outside ribbed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch
from safetensors.torch import save as safetensors_bytes

from ribbed.runs.atomic import atomic_write_bytes, atomic_write_text, atomic_writer

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "LoadedCheckpoint",
    "load_checkpoint",
    "save_checkpoint",
    "save_weights",
]

MANIFEST_FILE = "manifest.json"
LEGACY_FILE = "last.pt"  # the single unverified checkpoint written before manifests existed
KEEP = 2
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, damaged, or does not fit the run."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> str:
    """Atomically write ``state`` (tensors and plain containers only) to ``path``.

    Returns the SHA-256 of the bytes written. A failed write (disk full, file size limit,
    read-only folder) raises :class:`OSError` naming ``path`` and the cause, and leaves any
    earlier file at ``path`` untouched.
    """
    path = Path(path)
    hashing = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as handle:
            hashing = _HashingWriter(handle)
            torch.save(state, hashing)  # type: ignore[arg-type]  # torch needs only write() and flush(), not IO
    except (OSError, RuntimeError) as error:
        # torch's zip writer hides a failed write behind "[enforce fail at inline_container.cc]"
        cause = hashing.error if hashing is not None and hashing.error is not None else error
        if isinstance(cause, OSError):
            raise OSError(cause.errno, f"cannot write checkpoint {path}: {cause.strerror or cause}") from None
        raise
    return hashing.sha256.hexdigest()


def load_checkpoint(path: str | Path, sha256: str | None = None, size: int | None = None) -> dict[str, Any]:
    """Load a checkpoint (``weights_only=True``), first checking its ``size`` and ``sha256`` if given.

    Raises:
        CheckpointError: the file is missing, has the wrong size or checksum, or is not a
            plain-tensor ``torch.save`` file (garbage, truncated, a TorchScript archive...).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if size is not None and path.stat().st_size != size:
        raise CheckpointError(
            f"checkpoint {path}: {path.stat().st_size} bytes, the manifest recorded {size} (truncated or replaced)"
        )
    if sha256 is not None and _file_sha256(path) != sha256:
        raise CheckpointError(f"checkpoint {path}: SHA-256 differs from the one recorded when it was written (damaged)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise CheckpointError(f"checkpoint {path}: not a loadable checkpoint ({_one_line(exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, expected a dict of states")
    return state


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint that passed every check: its file, its step, its state, and the newer
    checkpoints that were skipped because they were damaged (one message each)."""

    path: Path
    step: int
    state: dict[str, Any]
    skipped: list[str]


class CheckpointStore:
    """The checkpoints of one run in ``directory``: the last :data:`KEEP` ``step-<N>.pt`` files
    and the manifest that lists them (newest first) with their size and SHA-256.

    Example:
        >>> import tempfile, torch
        >>> store = CheckpointStore(tempfile.mkdtemp())
        >>> for step in (10, 20, 30):
        ...     _ = store.save({"step": step, "w": torch.ones(2) * step}, step)
        >>> [entry["step"] for entry in store.entries()]
        [30, 20]
        >>> store.load().step
        30
    """

    def __init__(self, directory: Path | str, keep: int = KEEP):
        if keep < 1:
            raise ValueError(f"keep: got {keep}; allowed: at least 1 checkpoint")
        self.directory = Path(directory)
        self.keep = keep

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_FILE

    def entries(self) -> list[dict[str, Any]]:
        """The manifest's entries, newest first (``file``, ``step``, ``bytes``, ``sha256``).

        Raises:
            CheckpointError: the manifest exists but is not the JSON this class writes.
        """
        if not self.manifest_path.is_file():
            return []
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            entries = manifest["checkpoints"]
            for entry in entries:
                if not (isinstance(entry["file"], str) and isinstance(entry["step"], int)
                        and isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str)):
                    raise TypeError("an entry lacks file/step/bytes/sha256")
                if Path(entry["file"]).name != entry["file"]:
                    raise ValueError(f"file {entry['file']!r} is not a name inside the folder")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"checkpoint manifest {self.manifest_path}: "
                                  f"unreadable ({_one_line(error)})") from None
        return entries

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step``, keep the newest :attr:`keep`, drop the rest.

        Raises:
            OSError: the file or the manifest could not be written (the message names the
                path and the cause); the checkpoints listed before stay usable.
        """
        path = self.directory / f"step-{step:09d}.pt"
        digest = save_checkpoint(path, state)
        try:
            previous = [entry for entry in self.entries() if entry["file"] != path.name]
        except CheckpointError:
            previous = []  # a damaged manifest is replaced by one naming the new checkpoint
        entry = {"file": path.name, "step": step, "bytes": path.stat().st_size, "sha256": digest}
        kept = [entry, *previous][: self.keep]
        try:
            atomic_write_text(self.manifest_path, json.dumps({"checkpoints": kept}, indent=2))
        except OSError as error:
            raise OSError(error.errno, f"cannot write checkpoint manifest {self.manifest_path}: "
                                       f"{error.strerror or error}") from None
        self.remove_unlisted()
        return path

    def remove_unlisted(self) -> None:
        """Delete checkpoint files and stray temporary files that the manifest does not name
        (left by a process killed between writing a checkpoint and its manifest)."""
        try:
            listed = {entry["file"] for entry in self.entries()}
        except CheckpointError:
            return  # keep everything while the manifest cannot be read
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            stray = path.name.startswith(".") and path.name.endswith(".tmp")
            unlisted = path.name.startswith("step-") and path.suffix == ".pt" and path.name not in listed
            if (stray or unlisted or (path.name == LEGACY_FILE and listed)) and not path.is_symlink():
                path.unlink(missing_ok=True)

    def has_checkpoints(self) -> bool:
        """Whether there is anything to resume from (possibly damaged)."""
        return self.manifest_path.is_file() or (self.directory / LEGACY_FILE).is_file()

    def load(self, check: Callable[[dict[str, Any]], None] | None = None) -> LoadedCheckpoint | None:
        """The newest checkpoint that loads and passes ``check``; ``None`` when there is none.

        ``check(state)`` raises :class:`CheckpointError` (or ``KeyError``/``ValueError``/
        ``TypeError``) when the state does not fit the run: missing keys, a step past the
        end. A damaged checkpoint is skipped with its reason in ``skipped``, and the older
        one is tried.

        Raises:
            CheckpointError: checkpoints exist but none is usable; the message names every
                file and what is wrong with it.
        """
        candidates = [
            (self.directory / entry["file"], entry["step"], entry["sha256"], entry["bytes"])
            for entry in self.entries()
        ]
        if not candidates and (self.directory / LEGACY_FILE).is_file():
            candidates = [(self.directory / LEGACY_FILE, None, None, None)]
        skipped: list[str] = []
        for path, step, sha256, size in candidates:
            try:
                if path.is_symlink():
                    raise CheckpointError(f"checkpoint {path}: is a symbolic link, refusing to follow it")
                state = load_checkpoint(path, sha256=sha256, size=size)
                if step is not None and state.get("step") != step:
                    raise CheckpointError(
                        f"checkpoint {path}: holds step {state.get('step')!r}, the manifest says {step}")
                if check is not None:
                    check(state)
            except CheckpointError as error:
                message = str(error)
                skipped.append(message if str(path) in message else f"checkpoint {path}: {message}")
                continue
            except (KeyError, ValueError, TypeError) as error:
                skipped.append(f"checkpoint {path}: does not fit this run ({_one_line(error)})")
                continue
            return LoadedCheckpoint(path=path, step=state["step"], state=state, skipped=skipped)
        if skipped:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(skipped))
        return None


class HasStateDict(Protocol):
    """A module, or a gathered state standing in for one (``ribbed.distributed.FullState``)."""

    def state_dict(self) -> dict[str, Any]: ...


def save_weights(path: str | Path, model: HasStateDict) -> None:
    """Write the model's tensors as safetensors (tied weights stored once, contiguous)."""
    seen: dict[int, str] = {}
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    atomic_write_bytes(path, safetensors_bytes(tensors))


class _HashingWriter:
    """A write-only file object that hashes what passes through it on its way to ``handle``."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None  # the first failed write (torch reports it vaguely)

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        try:
            return self._handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self._handle.flush()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "") if text else type(error).__name__

