"""One hook family for the training loop: registry plug-ins and user callbacks alike.

A :class:`TrainingHook` overrides only the hooks it needs (Lightning's ``Callback`` and
Hugging Face's ``TrainerCallback`` are the model). In the order they fire:

========================  ==============================================================
``attach(parts)``         once, with the run's ``RunParts`` (plug-ins: by ``build_run``;
                          callbacks: by ``train`` before a checkpoint is restored)
``load_state_dict(s)``    on resume, the state :meth:`~TrainingHook.state_dict` saved
``before_step(step, b)``  the gradients of step ``step`` (0-based) are complete and at
                          their true scale (after accumulation and loss-scale removal,
                          before clipping); the optimiser has not stepped
``after_step(step, b)``   the optimiser and the schedule have taken step ``step``
``on_log(row)``           every ``train.log_every`` steps and at the last: ``step``,
                          ``steps``, ``loss`` (mean since the last log), ``steps_per_s``,
                          ``eta_s``
``metrics()``             values joining each evaluation row
``on_eval(row)``          the evaluation row, complete
``on_message(text)``      what the loop reports (checkpoint skipped, resumed from)
``state_dict()``          with every checkpoint, so a resumed run is exact
========================  ==============================================================

``b`` is a :class:`StepBatch`: the rows this process trained on at that step, and their loss,
so a hook never re-draws the batch. The loop calls one :class:`HookList`: the plug-ins of
``train.plugins`` (config order), then the ``callbacks`` given to ``train`` (their order).
Plug-ins' states go into checkpoints by position, callbacks' by :attr:`TrainingHook.state_key`.

Compatibility, and why a shim rather than an error: a callback need not subclass
:class:`TrainingHook` (any object with some of the hooks works, as the old ``Callback``
protocol did), and two old signatures still run, each with a ``DeprecationWarning`` when the
hook list is built: ``on_step(step, loss)`` of the old ``Callback`` (called from
``after_step`` with the number of steps done) and plug-ins' ``before_step(step)`` /
``after_step(step)`` without the batch. The signature is read once, not at every step, and
supporting it costs one adapter, so code written for the old hooks keeps its meaning instead
of breaking at the first step. What cannot be meant is refused: a method that looks like a
hook (``on_*``, ``before_*``, ``after_*``) but is none of them (``on_steps``) is a
``TypeError`` naming it and the allowed hooks, at class definition for a subclass and when
the hook list is built for any other object; so is an object with no hook at all.
"""

from __future__ import annotations

import difflib
import inspect
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HOOKS", "HookList", "StepBatch", "TrainingHook"]

HOOKS = ("attach", "before_step", "after_step", "on_log", "on_eval", "on_message",
         "metrics", "state_dict", "load_state_dict")
"""Every hook a :class:`TrainingHook` may implement."""

COMPATIBLE = {"on_step": "after_step"}
"""Old hook names still accepted, each with its replacement."""

_LOOKS_LIKE_A_HOOK = re.compile(r"^(on|before|after)_")


@dataclass(frozen=True)
class StepBatch:
    """What the loop knows of a step when it calls ``before_step`` and ``after_step``.

    Attributes:
        x: this process's inputs of the step (all micro-batches, in order).
        y: their labels (targets).
        loss: the step's mean training loss (over micro-batches and processes).
        micro_batches: how many micro-batches ``x`` was split into (``train.grad_accum``).
    """

    x: torch.Tensor
    y: torch.Tensor
    loss: float
    micro_batches: int = 1


def _misnamed(names: Sequence[str], owner: str) -> None:
    """Raise ``TypeError`` for the first of ``names`` that looks like a hook and is none."""
    allowed = (*HOOKS, *COMPATIBLE)
    for name in names:
        if _LOOKS_LIKE_A_HOOK.match(name) and name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"{owner}: method {name!r} is not a training hook{hint}; "
                            f"allowed: {', '.join(HOOKS)} (and {', '.join(COMPATIBLE)}, deprecated)")


class TrainingHook:
    """Base class of training plug-ins and callbacks: every hook is a no-op (module docstring)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _misnamed([name for name, value in vars(cls).items() if callable(value)], f"class {cls.__qualname__}")

    @property
    def state_key(self) -> str:
        """The key of this callback's state in checkpoints (override when a run holds two
        callbacks of one class that both keep state)."""
        return type(self).__qualname__

    def attach(self, parts) -> None:
        """Called once with the run's ``RunParts`` (model, optimiser, data, config)."""

    def before_step(self, step: int, batch: StepBatch) -> None:
        """Gradients of step ``step`` (0-based) are ready; the optimiser has not stepped."""

    def after_step(self, step: int, batch: StepBatch) -> None:
        """The optimiser and schedule have taken step ``step``."""

    def on_log(self, row: dict[str, float]) -> None:
        """Progress every ``train.log_every`` steps (module docstring)."""

    def on_eval(self, row: dict[str, float]) -> None:
        """An evaluation row, metrics of every hook included."""

    def on_message(self, text: str) -> None:
        """A line the loop reports."""

    def metrics(self) -> dict[str, float]:
        """Values to add to the next evaluation row."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


StepHook = Callable[[int, StepBatch], None]


def _step_hook(hook: Any, name: str) -> StepHook | None:
    """``hook.<name>`` as ``(step, batch)``, adapting the old ``(step)`` signature."""
    method = getattr(hook, name, None)
    if method is None or getattr(type(hook), name, None) is getattr(TrainingHook, name):
        return None  # the base's no-op
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):
        return method
    for arguments, adapted in (((0, None), method), ((0,), lambda step, batch: method(step))):
        try:
            signature.bind(*arguments)
        except TypeError:
            continue
        if adapted is not method:
            warnings.warn(f"{type(hook).__qualname__}.{name}(step) is deprecated; define "
                          f"{name}(step, batch) (ribbed.train.hooks.StepBatch)", DeprecationWarning, stacklevel=5)
        return adapted
    raise TypeError(f"{type(hook).__qualname__}.{name}{signature}: allowed: {name}(step, batch)")


def _legacy_on_step(hook: Any) -> StepHook:
    warnings.warn(f"{type(hook).__qualname__}.on_step(step, loss) is deprecated; define "
                  "after_step(step, batch) (step is 0-based, the loss is batch.loss)", DeprecationWarning, stacklevel=5)
    return lambda step, batch: hook.on_step(step + 1, batch.loss)


class HookList:
    """The hooks of one run, checked once, called in order: ``plugins`` then ``callbacks``.

    Raises:
        TypeError: a method that looks like a hook and is none, an object with no hook, a
            step hook whose signature takes neither ``(step, batch)`` nor ``(step)``, a
            callback with both ``after_step`` and the old ``on_step``.
        ValueError: two stateful callbacks with one :attr:`TrainingHook.state_key`.
    """

    def __init__(self, plugins: Sequence[Any] = (), callbacks: Sequence[Any] = ()):
        self.plugins, self.callbacks = list(plugins), list(callbacks)
        self.hooks = self.plugins + self.callbacks
        self._before: list[StepHook] = []
        self._after: list[StepHook] = []
        self._calls: dict[str, list[Callable]] = {name: [] for name in ("on_log", "on_eval", "on_message", "metrics")}
        for hook in self.hooks:
            self._add(hook)
        keys = [self._key(callback) for callback in self.callbacks if self._stateful(callback)]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"callbacks: {len(keys)} keep state under the keys {keys}; allowed: distinct keys "
                             f"(give each callback of class {repeated[0]} its own state_key)")

    def _add(self, hook: Any) -> None:
        owner = f"hook {type(hook).__qualname__}"
        allowed = (*HOOKS, *COMPATIBLE)
        names = [name for name in dir(hook) if (_LOOKS_LIKE_A_HOOK.match(name) or name in allowed)
                 and callable(getattr(hook, name, None))]
        _misnamed(names, owner)
        if not isinstance(hook, TrainingHook) and not any(name in allowed for name in names):
            raise TypeError(f"{owner}: has none of the training hooks; allowed: {', '.join(HOOKS)}")
        before, after = _step_hook(hook, "before_step"), _step_hook(hook, "after_step")
        if callable(getattr(hook, "on_step", None)):
            if after is not None:
                raise TypeError(f"{owner}: defines both after_step and the old on_step; allowed: after_step")
            after = _legacy_on_step(hook)
        if before is not None:
            self._before.append(before)
        if after is not None:
            self._after.append(after)
        for name, calls in self._calls.items():
            method = getattr(hook, name, None)
            if callable(method):
                calls.append(method)

    @property
    def touch_gradients(self) -> bool:
        """Whether a hook may read or change gradients before the step (then they are unscaled
        first): any plug-in, or a callback with ``before_step``."""
        return bool(self.plugins) or bool(self._before)

    def attach_callbacks(self, parts) -> None:
        """``attach(parts)`` of each callback (plug-ins were attached by ``build_run``)."""
        for callback in self.callbacks:
            if callable(getattr(callback, "attach", None)):
                callback.attach(parts)

    def before_step(self, step: int, batch: StepBatch) -> None:
        for call in self._before:
            call(step, batch)

    def after_step(self, step: int, batch: StepBatch) -> None:
        for call in self._after:
            call(step, batch)

    def on_log(self, row: dict[str, float]) -> None:
        for call in self._calls["on_log"]:
            call(row)

    def on_eval(self, row: dict[str, float]) -> None:
        for call in self._calls["on_eval"]:
            call(row)

    def on_message(self, text: str) -> None:
        for call in self._calls["on_message"]:
            call(text)

    def metrics(self) -> dict[str, float]:
        row: dict[str, float] = {}
        for call in self._calls["metrics"]:
            row.update(call())
        return row

    @staticmethod
    def _stateful(callback: Any) -> bool:
        method = getattr(type(callback), "state_dict", None)
        return callable(method) and method is not TrainingHook.state_dict

    @staticmethod
    def _key(callback: Any) -> str:
        return getattr(callback, "state_key", type(callback).__qualname__)

    def plugin_states(self) -> list[dict[str, Any]]:
        return [plugin.state_dict() for plugin in self.plugins]

    def callback_states(self) -> dict[str, dict[str, Any]]:
        """Each stateful callback's state under its :attr:`~TrainingHook.state_key`."""
        return {self._key(callback): callback.state_dict() for callback in self.callbacks if self._stateful(callback)}

    def load_plugin_states(self, states: Sequence[dict[str, Any]]) -> None:
        for plugin, state in zip(self.plugins, states, strict=True):
            plugin.load_state_dict(state)

    def load_callback_states(self, states: dict[str, dict[str, Any]]) -> None:
        """Restore :meth:`callback_states`; a callback whose key is absent (it was not in the
        saved run) starts afresh."""
        for callback in self.callbacks:
            key = self._key(callback)
            if self._stateful(callback) and key in states:
                callback.load_state_dict(states[key])
