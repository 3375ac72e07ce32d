"""Training plug-ins: code that joins every step without copying the loop.

A plug-in sees the run's parts once (:meth:`TrainingPlugin.attach`), then each optimiser
step twice: :meth:`~TrainingPlugin.before_step` when the step's gradients are complete and
at their true scale (after accumulation and loss-scale removal, before clipping), and
:meth:`~TrainingPlugin.after_step` after the optimiser and schedule stepped. Gradient
sparsification, pruning masks, dynamic sparse training, curvature tracking and architecture
changes are plug-ins. Whatever :meth:`~TrainingPlugin.metrics` returns joins each evaluation
row; :meth:`~TrainingPlugin.state_dict` goes into checkpoints so a resumed run is exact.

Configs name plug-ins in ``train.plugins: [{name: ..., options: {...}}]``.
"""

from __future__ import annotations

from typing import Any

from ribbed.registry import Registry

__all__ = ["PLUGINS", "TrainingPlugin", "build_plugin", "list_plugins", "register_plugin"]


class TrainingPlugin:
    """Base class: every hook is a no-op, so a plug-in overrides only what it needs."""

    def attach(self, parts) -> None:
        """Called once by ``build_run`` with the run's ``RunParts`` (model, optimiser, data)."""

    def before_step(self, step: int) -> None:
        """Gradients of step ``step`` (0-based) are ready; the optimiser has not stepped."""

    def after_step(self, step: int) -> None:
        """The optimiser and schedule have taken step ``step``."""

    def metrics(self) -> dict[str, float]:
        """Values to add to the next evaluation row."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


PLUGINS: Registry[TrainingPlugin] = Registry("training plug-in", "train.plugins")


def register_plugin(name: str, description: str):
    """Register a :class:`TrainingPlugin` subclass; its constructor arguments are its options."""
    return PLUGINS.register(name, description)


def list_plugins() -> dict[str, str]:
    return PLUGINS.describe()


def build_plugin(name: str, options: dict[str, Any]) -> TrainingPlugin:
    """Instantiate plug-in ``name`` with ``options``; unknown names and options are errors."""
    return PLUGINS.build(name, **options)
