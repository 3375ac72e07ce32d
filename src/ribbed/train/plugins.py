"""Training plug-ins: hooks that configs name, so code joins every step without copying the loop.

A plug-in is a :class:`ribbed.train.hooks.TrainingHook` (``TrainingPlugin`` is the same
class) built from the registry: configs name plug-ins in
``train.plugins: [{name: ..., options: {...}}]``, the constructor's arguments are the options,
and ``build_run`` attaches each to the run. Gradient sparsification, pruning masks, dynamic
sparse training, curvature tracking and architecture changes are plug-ins. See
:mod:`ribbed.train.hooks` for the hooks, the order they fire in and the batch they receive.
"""

from __future__ import annotations

from typing import Any

from ribbed.registry import Registry
from ribbed.train.hooks import TrainingHook

__all__ = ["PLUGINS", "TrainingPlugin", "build_plugin", "list_plugins", "register_plugin"]

TrainingPlugin = TrainingHook
"""The base class of registry plug-ins: :class:`~ribbed.train.hooks.TrainingHook` itself."""


PLUGINS: Registry[TrainingPlugin] = Registry("training plug-in", "train.plugins")


def register_plugin(name: str, description: str):
    """Register a :class:`TrainingPlugin` subclass; its constructor arguments are its options."""
    return PLUGINS.register(name, description)


def list_plugins() -> dict[str, str]:
    return PLUGINS.describe()


def build_plugin(name: str, options: dict[str, Any]) -> TrainingPlugin:
    """Instantiate plug-in ``name`` with ``options``; unknown names and options are errors."""
    return PLUGINS.build(name, **options)
