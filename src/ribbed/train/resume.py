"""The checkpoints of one training run: what they hold, when they are taken, resuming from one.

:func:`ribbed.train.loop.train` keeps only the loop; this module decides the rest. A
checkpoint holds the states of the run's parts (model and optimiser through the strategy, so
it resumes under any strategy and in one process; scheduler, scaler, hooks, gradient method,
RNG) followed by the loop's :class:`Progress`, in that order (the layout every earlier
checkpoint has). Files and their integrity are :class:`~ribbed.train.checkpoint.CheckpointStore`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ribbed.train.checkpoint import CheckpointError, CheckpointStore
from ribbed.train.hooks import HookList

if TYPE_CHECKING:
    from ribbed.config import RunConfig
    from ribbed.distributed import Strategy
    from ribbed.runs.records import RunRecord
    from ribbed.train.loop import RunParts

__all__ = ["CHECKPOINT_KEYS", "Progress", "RunCheckpoints", "checkpoint_interval"]

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "plugins", "rng", "step",
                   "train_seconds", "history", "steps_to_target", "seconds_to_target")
"""What a checkpoint must hold to be resumed from (later additions are optional, for older files)."""


class Progress(NamedTuple):
    """The training loop's counters, the part of a checkpoint that is not a part's state."""

    step: int
    train_seconds: float
    history: list[dict[str, float]]
    steps_to_target: int | None
    seconds_to_target: float | None
    window_loss: float  # the running train_loss, so resumed rows equal the originals
    window_steps: int
    first_loss: float | None  # the first step's loss, the reference of train.divergence_factor

    @classmethod
    def start(cls) -> Progress:
        """The counters of a run at step 0."""
        return cls(0, 0.0, [], None, None, 0.0, 0, None)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        """The counters saved in checkpoint ``state`` (those added later default for older files)."""
        return cls(state["step"], state["train_seconds"], state["history"], state["steps_to_target"],
                   state["seconds_to_target"], state.get("window_loss", 0.0), state.get("window_steps", 0),
                   state.get("first_loss"))


def checkpoint_interval(config: RunConfig, strategy: Strategy) -> int | None:
    """Steps between checkpoints: ``train.checkpoint_every``, or ``eval_every`` for ``"eval"``
    (the default; ``None`` under a strategy that writes no checkpoints)."""
    every = config.train.checkpoint_every
    if every == "eval":
        return config.train.eval_every if strategy.writes_checkpoints else None
    return every


class RunCheckpoints:
    """The checkpoints of ``record``'s run of ``parts``; with no record, none are read or written.

    Opening removes what a process killed while writing left behind (files the manifest does not
    name). :meth:`restore` resumes, :meth:`maybe_save` saves every :attr:`every` steps and
    :meth:`save_interrupted` when a signal stops the run.
    """

    def __init__(self, parts: RunParts, record: RunRecord | None):
        self.parts, self.record = parts, record
        self.every = checkpoint_interval(parts.config, parts.strategy)
        self.store = CheckpointStore(record.checkpoint_dir) if record is not None else None
        if self.store is not None:
            self.store.remove_unlisted()

    def restore(self, hooks: HookList) -> Progress | None:
        """Load the newest usable checkpoint into the parts and ``hooks``; return its progress, or
        ``None`` when there is none (or no record).

        Under several processes every rank reads rank 0's checkpoint. Damaged checkpoints are
        skipped (each named to ``hooks.on_message``).

        Raises:
            CheckpointError: checkpoints exist but none is usable, or one that passed its checks
                does not load into the model (naming the file).
        """
        if self.record is None:
            return None
        store = CheckpointStore(self.parts.strategy.checkpoint_path(self.record.checkpoint_dir))
        loaded = store.load(self._check)
        if loaded is None:
            hooks.on_message(f"no checkpoint in {store.directory}: starting from step 0")
            return None
        for message in loaded.skipped:
            hooks.on_message(f"skipped a damaged checkpoint: {message}")
        state, parts = loaded.state, self.parts
        try:
            hooks.load_plugin_states(state["plugins"])  # first: a plug-in may reshape the model (growth)
            hooks.load_callback_states(state.get("callbacks", {}))
            parts.strategy.load_model_state_dict(parts.model, state["model"])
            parts.strategy.load_optimizer_state_dict(parts.model, parts.optimizer, state["optimizer"])
            parts.scheduler.load_state_dict(state["scheduler"])
            parts.precision.load_state_dict(state["scaler"])
            if state.get("gradient_method") is not None:
                method: Any = parts.gradient_method  # a stateful one has load_state_dict (GradientMethod)
                method.load_state_dict(state["gradient_method"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            detail = " ".join(str(error).split())[:300]
            raise CheckpointError(f"checkpoint {loaded.path}: does not fit this run ({detail})") from None
        hooks.on_message(f"resuming from step {loaded.step} ({loaded.path})")
        return Progress.from_state(state)

    def state(self, hooks: HookList, progress: Progress) -> dict[str, Any]:
        """The checkpoint of the parts and ``hooks`` now, at ``progress``."""
        parts, strategy = self.parts, self.parts.strategy
        return {
            "model": strategy.model_state_dict(parts.model),
            "optimizer": strategy.optimizer_state_dict(parts.model, parts.optimizer),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.precision.state_dict(),
            "plugins": hooks.plugin_states(),
            "callbacks": hooks.callback_states(),
            "gradient_method": (parts.gradient_method.state_dict()
                                if hasattr(parts.gradient_method, "state_dict") else None),
            "rng": torch.get_rng_state(),
            **progress._asdict(),
        }

    def maybe_save(self, hooks: HookList, progress: Progress) -> None:
        """Save a checkpoint if one is due at ``progress.step`` (every :attr:`every` steps)."""
        if self.store is not None and self.every and progress.step % self.every == 0:
            self.store.save(self.state(hooks, progress), progress.step)

    def save_interrupted(self, hooks: HookList, progress: Progress) -> Path | None:
        """The checkpoint of ``progress.step`` for a run a signal stops: the one saved at that step,
        else a new one; ``None`` when the run takes no checkpoints."""
        if self.store is None or not self.every:
            return None
        entries = self.store.entries()
        if entries and entries[0]["step"] == progress.step:
            return self.store.directory / entries[0]["file"]
        return self.store.save(self.state(hooks, progress), progress.step)

    def _check(self, state: dict[str, Any]) -> None:
        """Raise :class:`CheckpointError` when ``state`` cannot be this run's checkpoint: a key
        missing, a step outside ``0..train.steps``, a plug-in count or a weight shape that differ."""
        parts = self.parts
        missing = [key for key in CHECKPOINT_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"lacks {', '.join(missing)}")
        step, steps = state["step"], parts.config.train.steps
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= steps:
            raise CheckpointError(f"holds step {step!r}; allowed: 0..{steps} (train.steps)")
        if len(state["plugins"]) != len(parts.plugins):
            raise CheckpointError(f"holds {len(state['plugins'])} plug-in states, the run has {len(parts.plugins)}")
        if parts.plugins or not isinstance(state["model"], dict):
            return  # a plug-in may reshape the model (growth): its shapes are checked on loading
        expected = parts.strategy.model_state_dict(parts.model) if parts.strategy.world_size == 1 else None
        for name, tensor in (expected or {}).items():
            got = state["model"].get(name)
            if not isinstance(got, torch.Tensor):
                raise CheckpointError(f"lacks the weight {name!r}")
            if got.shape != tensor.shape:
                raise CheckpointError(
                    f"weight {name!r} has shape {list(got.shape)}, this run's model has {list(tensor.shape)}")
