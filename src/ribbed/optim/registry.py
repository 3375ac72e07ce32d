"""The optimiser registry: short names for ``torch.optim`` classes, plus any import path.

``build_optimizer("adamw", model, lr=3e-3, weight_decay=0.01)`` and
``build_optimizer("torch.optim.AdamW", model, lr=3e-3)`` build the same thing. A registry
entry is a factory ``(model, lr, **options) -> Optimizer`` rather than a class, so methods
that need the model itself (RIBBED attaches forward hooks) register the same way.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["OptimizerError", "build_optimizer", "list_optimizers", "register_optimizer"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class OptimizerError(ValueError):
    """An optimiser name, option or value that cannot be used."""


@dataclass(frozen=True)
class _Entry:
    factory: OptimizerFactory
    description: str
    signature_of: Callable  # whose keyword arguments are the allowed options


_REGISTRY: dict[str, _Entry] = {}


def register_optimizer(name: str, description: str, signature_of: Callable | None = None):
    """Register ``factory(model, lr, **options)`` under ``name``."""

    def decorate(factory: OptimizerFactory) -> OptimizerFactory:
        if name in _REGISTRY:
            raise ValueError(f"optimiser {name!r} is already registered")
        _REGISTRY[name] = _Entry(factory, description, signature_of or factory)
        return factory

    return decorate


def list_optimizers() -> dict[str, str]:
    """Registered names and their one-line descriptions."""
    return {name: entry.description for name, entry in sorted(_REGISTRY.items())}


def _torch_optimizer(cls: type[torch.optim.Optimizer], description: str, **defaults):
    def factory(model: nn.Module, lr: float, **options):
        return cls(model.parameters(), lr=lr, **{**defaults, **options})

    factory.__name__ = f"build_{cls.__name__.lower()}"
    return register_optimizer(cls.__name__.lower(), description, signature_of=cls)(factory)


_torch_optimizer(torch.optim.SGD, "torch.optim.SGD (momentum, nesterov, weight_decay)", foreach=True)
_torch_optimizer(torch.optim.Adam, "torch.optim.Adam (Kingma & Ba 2015)", foreach=True)
_torch_optimizer(torch.optim.AdamW, "torch.optim.AdamW, decoupled weight decay (Loshchilov & Hutter 2019)", foreach=True)
_torch_optimizer(torch.optim.RMSprop, "torch.optim.RMSprop (Hinton 2012)", foreach=True)
_torch_optimizer(torch.optim.Adagrad, "torch.optim.Adagrad (Duchi et al. 2011)", foreach=True)


def _import_class(path: str) -> Callable:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OptimizerError(
            f"optimizer.name {path!r}: cannot import module {module_name!r} ({exc}); "
            f"registered names: {', '.join(_REGISTRY)}"
        ) from None
    target = getattr(module, attr, None)
    if not callable(target):
        raise OptimizerError(f"optimizer.name {path!r}: {module_name} has no callable {attr!r}")
    return target


def _check_options(name: str, signature_of: Callable, options: dict) -> None:
    params = inspect.signature(signature_of).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p in params if p not in ("self", "params", "model", "lr")]
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise OptimizerError(
            f"optimizer.options for {name!r}: unknown option(s) {unknown}; "
            f"allowed: {', '.join(allowed)}"
        )


def build_optimizer(name: str, model: nn.Module, *, lr: float, **options) -> torch.optim.Optimizer:
    """Build the optimiser ``name`` (registry name or ``package.module.Class``) for ``model``."""
    entry = _REGISTRY.get(name)
    if entry is None:
        if "." not in name:
            raise OptimizerError(
                f"optimizer.name {name!r} is not registered; registered names: "
                f"{', '.join(_REGISTRY)}; or give an import path such as torch.optim.AdamW"
            )
        cls = _import_class(name)
        _check_options(name, cls, options)
        factory: OptimizerFactory = lambda model, lr, **kw: cls(model.parameters(), lr=lr, **kw)  # noqa: E731
    else:
        _check_options(name, entry.signature_of, options)
        factory = entry.factory
    try:
        optimizer = factory(model, lr, **options)
    except (TypeError, ValueError) as exc:
        raise OptimizerError(f"optimizer {name!r} with lr={lr} and options {options}: {exc}") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptimizerError(
            f"optimizer.name {name!r} built a {type(optimizer).__name__}, not a torch.optim.Optimizer"
        )
    return optimizer
