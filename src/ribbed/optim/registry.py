"""The optimiser registry: short names for ``torch.optim`` classes, plus any import path.

``build_optimizer("adamw", model, lr=3e-3, weight_decay=0.01)`` and
``build_optimizer("torch.optim.AdamW", model, lr=3e-3)`` build the same thing. A registry
entry is a factory ``(model, lr, **options) -> Optimizer`` rather than a class, so methods
that need the model itself (RIBBED attaches forward hooks) register the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from ribbed.registry import Registry, check_options

__all__ = ["OPTIMIZERS", "OptimizerError", "build_optimizer", "list_optimizers", "register_optimizer"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class OptimizerError(ValueError):
    """An optimiser name, option or value that cannot be used."""


OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry(
    "optimiser", "optimizer.name", positional=("params", "model", "lr")
)


def register_optimizer(name: str, description: str, signature_of: Callable | None = None):
    """Register ``factory(model, lr, **options)`` under ``name``.

    ``signature_of`` is whose keyword arguments are the allowed options (default: the factory).
    """
    return OPTIMIZERS.register(name, description, signature_of)


def list_optimizers() -> dict[str, str]:
    """Registered names and their one-line descriptions."""
    return OPTIMIZERS.describe()


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
            f"registered names: {', '.join(OPTIMIZERS.names())}"
        ) from None
    target = getattr(module, attr, None)
    if not callable(target):
        raise OptimizerError(f"optimizer.name {path!r}: {module_name} has no callable {attr!r}")
    return target


def build_optimizer(name: str, model: nn.Module, *, lr: float, **options) -> torch.optim.Optimizer:
    """Build the optimiser ``name`` (registry name or ``package.module.Class``) for ``model``."""
    if name in OPTIMIZERS:
        entry = OPTIMIZERS.entry(name)
        factory, signature_of = entry.factory, entry.signature_of
    elif "." in name:
        cls = _import_class(name)
        factory = lambda model, lr, **kw: cls(model.parameters(), lr=lr, **kw)  # noqa: E731
        signature_of = cls
    else:
        raise OptimizerError(
            f"optimizer.name {name!r} is not registered; registered names: "
            f"{', '.join(OPTIMIZERS.names())}; or give an import path such as torch.optim.AdamW"
        )
    try:
        check_options("optimizer.options", name, signature_of, options, OPTIMIZERS.positional)
        optimizer = factory(model, lr, **options)
    except (TypeError, ValueError) as exc:
        raise OptimizerError(f"optimizer {name!r} with lr={lr} and options {options}: {exc}") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptimizerError(
            f"optimizer.name {name!r} built a {type(optimizer).__name__}, not a torch.optim.Optimizer"
        )
    return optimizer
