"""Model registry: build any model by name, with every option checked before construction.

A model is an ``nn.Module`` class registered with :func:`register_model`. Its constructor
takes ``input_shape`` and ``num_classes`` first; its remaining keyword parameters are the
model's options, discovered by inspecting the constructor, so an unknown option is rejected
with the list of allowed ones (as nanoGPT's ``configurator.py`` rejects unknown keys). A
model declares the tasks it supports in a ``tasks`` class attribute; a model whose
architecture depends on the task also takes a ``task`` parameter.

Example:
    >>> import torch
    >>> from ribbed.nn import build_model
    >>> model = build_model("mlp", input_shape=(40,), num_classes=10, hidden=(32,))
    >>> model(torch.randn(4, 40)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

TASKS = ("classification", "language-modeling")

# Constructor parameters supplied by build_model itself, never options.
_RESERVED = ("input_shape", "num_classes", "task")

_MODELS: dict[str, type[nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}

ModelClass = TypeVar("ModelClass", bound=type[nn.Module])


class ModelError(ValueError):
    """A model was asked for by an unknown name, option, task or value."""


def check_option(field: str, value: Any, valid: bool, allowed: str) -> None:
    """Raise :class:`ModelError` naming ``field``, ``value`` and what is allowed unless ``valid``."""
    if not valid:
        raise ModelError(f"invalid {field}={value!r}; allowed: {allowed}")


def is_positive_int(value: Any) -> bool:
    """True for a positive ``int`` (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_sizes(field: str, values: Any, min_length: int = 1) -> tuple[int, ...]:
    """Check a tuple (or list, as YAML gives) of positive sizes and return it as a tuple."""
    ok = (
        isinstance(values, tuple | list)
        and len(values) >= min_length
        and all(is_positive_int(v) for v in values)
    )
    check_option(field, values, ok, f"a tuple of at least {min_length} positive integers")
    return tuple(values)


def check_dropout(value: float) -> None:
    """Check that a dropout probability lies in [0, 1)."""
    check_option(
        "dropout", value, isinstance(value, int | float) and 0 <= value < 1, "0 <= dropout < 1"
    )


def register_model(name: str, description: str) -> Callable[[ModelClass], ModelClass]:
    """Class decorator that makes a model buildable as ``build_model(name, ...)``.

    The class must declare ``tasks``, a tuple drawn from :data:`TASKS`.
    """

    def decorate(cls: ModelClass) -> ModelClass:
        if name in _MODELS:
            raise ModelError(f"model {name!r} is already registered ({_MODELS[name].__name__})")
        tasks = getattr(cls, "tasks", None)
        if not tasks or not set(tasks) <= set(TASKS):
            raise ModelError(f"model {name!r} must declare tasks, a tuple drawn from {TASKS}")
        _MODELS[name] = cls
        _DESCRIPTIONS[name] = description
        return cls

    return decorate


def list_models() -> dict[str, str]:
    """Return ``{name: description}`` for every registered model, sorted by name."""
    return dict(sorted(_DESCRIPTIONS.items()))


def model_options(cls: type[nn.Module]) -> dict[str, Any]:
    """Return ``{option: default}`` for a model class, read from its constructor."""
    parameters = inspect.signature(cls.__init__).parameters
    return {
        name: p.default
        for name, p in parameters.items()
        if name != "self" and name not in _RESERVED and p.kind is not p.VAR_KEYWORD
    }


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    task: str = "classification",
    **options: Any,
) -> nn.Module:
    """Build the registered model ``name`` for inputs of ``input_shape``.

    Args:
        name: a key of :func:`list_models`.
        input_shape: one example's shape without the batch dimension; for language
            modelling ``(block_size,)``, the longest sequence the model accepts.
        num_classes: number of classes, or the vocabulary size for language modelling.
        task: ``"classification"`` (``[B, *input_shape]`` floats to ``[B, num_classes]``
            logits) or ``"language-modeling"`` (``[B, T]`` int64 tokens to
            ``[B, T, num_classes]`` logits).
        **options: the model's constructor options.

    Raises:
        ModelError: for an unknown name, task or option, an unsupported task, or an
            invalid value.
    """
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; available: {sorted(_MODELS)}")
    cls = _MODELS[name]
    check_option("task", task, task in TASKS, str(TASKS))
    tasks = getattr(cls, "tasks", ())  # declared by every registered class (register_model checks)
    if task not in tasks:
        raise ModelError(f"model {name!r} supports tasks {tasks}, not task={task!r}")
    allowed = model_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ModelError(
            f"unknown option(s) {unknown} for model {name!r}; allowed: {sorted(allowed)}"
        )
    input_shape = check_sizes("input_shape", input_shape)
    check_option("num_classes", num_classes, is_positive_int(num_classes), "a positive integer")
    if "task" in inspect.signature(cls.__init__).parameters:
        options["task"] = task
    return cls(input_shape, num_classes, **options)
