"""Ctrl-C and SIGTERM during training: finish the step, checkpoint, then stop with a clear word.

A ``KeyboardInterrupt`` raised in the middle of a step could land inside ``optimizer.step()``
with half the parameters updated, so a checkpoint taken then would not resume exactly. While
an :class:`InterruptGuard` is active, the first SIGINT or SIGTERM only sets a flag; the loop
checks it between steps, saves a checkpoint of the state it has reached, and raises
:class:`TrainingInterrupted` carrying the step and the checkpoint's path. A second signal
interrupts at once (the plain ``KeyboardInterrupt``), for a step that never ends.

Ranks of a distributed run cannot agree on a step boundary without communicating, so there
(``defer=False``) a signal interrupts at once; SIGTERM, the launcher's way of stopping its
workers, then raises ``KeyboardInterrupt`` too instead of killing the process outright, so
the run's record is marked ``interrupted`` and temporary folders are cleaned up.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["InterruptGuard", "TrainingInterrupted"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None  # what signal.signal returns


class TrainingInterrupted(KeyboardInterrupt):
    """Training of run ``run_id`` stopped by a signal at a step boundary; ``checkpoint`` is where
    it can resume from (``None``: checkpoints are off).

    ``exit_code`` is what a command should exit with: 128 + the signal's number (130 for Ctrl-C).
    """

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT,
                 run_id: str | None = None):
        self.step = step
        self.checkpoint = checkpoint
        self.run_id = run_id
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + int(signum)
        where = f"checkpoint at {checkpoint}" if checkpoint is not None else "no checkpoint written"
        super().__init__(f"interrupted ({self.signal_name}) at step {step}, {where}")


class InterruptGuard:
    """Defer SIGINT/SIGTERM to the next step boundary while the block runs (see the module doc).

    Does nothing when ``enabled`` is false or when not on the main thread (only it may set
    signal handlers), so the plain ``KeyboardInterrupt`` applies there. With ``defer=False``
    both signals raise ``KeyboardInterrupt`` at once. The previous handlers come back when
    the block ends.

    Example:
        >>> with InterruptGuard() as guard:
        ...     guard.requested
        False
    """

    def __init__(self, enabled: bool = True, defer: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.defer = defer
        self.signum: int | None = None
        self._previous: dict[int, _Handler] = {}

    @property
    def requested(self) -> bool:
        """Whether a signal arrived since the block started."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None or not self.defer:  # the second one, or no deferring: stop now
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")
        self.signum = signum

    def __enter__(self) -> InterruptGuard:
        if self.enabled:
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
