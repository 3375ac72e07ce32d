"""The optimiser registry: short names for optimiser classes, plus any import path.

``build_optimizer("adamw", model, lr=3e-3, weight_decay=0.01)`` and
``build_optimizer("torch.optim.AdamW", model, lr=3e-3)`` build the same thing. A registry
entry is a factory ``(model, lr, **options) -> Optimizer`` rather than a class, so methods
that need the model itself (K-FAC and RIBBED attach hooks) register the same way.

A factory that also takes a keyword ``params`` can be built on given parameter groups
instead of ``model.parameters()``; wrappers that regroup parameters (layer-wise rates) need
that of their base. :func:`register_optimizer_class` registers any ``torch.optim``-style
class that way, with its constructor's keywords as the allowed options.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ribbed.registry import Registry, check_options

__all__ = [
    "OPTIMIZERS",
    "OptimizerError",
    "ParamsArg",
    "build_optimizer",
    "list_optimizers",
    "register_optimizer",
    "register_optimizer_class",
]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
ParamsArg = Iterable[torch.Tensor] | Iterable[dict] | None


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


def _register_extensions() -> None:
    """Import the packages that register optimisers of their own (RIBBED, Adam-HD, continual
    backprop...), so every registry name works after ``import ribbed.optim`` alone."""
    from ribbed.extensions import load_extensions

    load_extensions()


def list_optimizers() -> dict[str, str]:
    """Registered names and their one-line descriptions."""
    _register_extensions()
    return OPTIMIZERS.describe()


def _explicit_signature(cls: Callable) -> Callable:
    """A stand-in whose signature is ``cls``'s without ``**kwargs``.

    Some libraries' constructors take ``**kwargs`` and store unknown keys silently; checking
    options against the named keywords turns a misspelt option into an error.
    """
    signature = inspect.signature(cls)
    named = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]

    def options_of(*args, **kwargs):  # pragma: no cover - only its signature is read
        raise NotImplementedError

    options_of.__signature__ = signature.replace(parameters=named)  # type: ignore[attr-defined]
    return options_of


class _DeferredClass:
    """An optimiser class named by import path and imported when first used (to build it or to
    check options against its signature), so that importing the registry does not import the
    library that holds it (``pytorch_optimizer`` alone takes longer to import than torch)."""

    def __init__(self, path: str):
        self.path = path
        self._cls: Callable | None = None

    def load(self) -> Callable:
        if self._cls is None:
            self._cls = _import_class(self.path)
        return self._cls

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # read by inspect.signature (option checks)
        return inspect.signature(_explicit_signature(self.load()))


def _class_factory(cls: OptimizerFactory | _DeferredClass, **defaults) -> OptimizerFactory:
    def factory(model: nn.Module, lr: float, params: ParamsArg = None, **options):
        return cls(model.parameters() if params is None else params, lr=lr, **{**defaults, **options})

    name = cls.path.rpartition(".")[2] if isinstance(cls, _DeferredClass) else cls.__name__
    factory.__name__ = f"build_{name.lower()}"
    return factory


def register_optimizer_class(name: str, cls: type[torch.optim.Optimizer] | str, description: str, **defaults):
    """Register ``cls(params, lr=lr, **defaults, **options)`` under ``name``.

    The options allowed are ``cls``'s constructor keywords; ``defaults`` are applied unless
    the config sets them (e.g. ``foreach=True``). ``cls`` may be an import path
    (``"pytorch_optimizer.Lion"``): the class is then imported the first time it is used.
    """
    if isinstance(cls, str):
        deferred = _DeferredClass(cls)
        return register_optimizer(name, description, signature_of=deferred)(_class_factory(deferred, **defaults))
    return register_optimizer(name, description, signature_of=_explicit_signature(cls))(
        _class_factory(cls, **defaults)
    )


register_optimizer_class("sgd", torch.optim.SGD, "torch.optim.SGD (momentum, nesterov, weight_decay)", foreach=True)
register_optimizer_class("adam", torch.optim.Adam, "torch.optim.Adam (Kingma & Ba 2015)", foreach=True)
register_optimizer_class("adamw", torch.optim.AdamW,
                         "torch.optim.AdamW, decoupled weight decay (Loshchilov & Hutter 2019)", foreach=True)
register_optimizer_class("rmsprop", torch.optim.RMSprop, "torch.optim.RMSprop (Hinton 2012)", foreach=True)
register_optimizer_class("adagrad", torch.optim.Adagrad, "torch.optim.Adagrad (Duchi et al. 2011)", foreach=True)


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


def _takes_params(factory: Callable) -> bool:
    return "params" in inspect.signature(factory).parameters


def build_optimizer(
    name: str, model: nn.Module, *, lr: float, params: ParamsArg = None, **options
) -> torch.optim.Optimizer:
    """Build the optimiser ``name`` (registry name or ``package.module.Class``) for ``model``.

    Args:
        name: a registered name (:func:`list_optimizers`) or an import path of an optimiser class.
        model: the model whose parameters are optimised (factories may also attach hooks to it).
        lr: the learning rate (it lives in ``param_groups``, so LR schedulers work).
        params: parameters or parameter groups to optimise instead of ``model.parameters()``;
            only for entries whose factory takes ``params``.
        options: the optimiser's keyword options (``optimizer.options`` in a config).
    """
    if name not in OPTIMIZERS and "." not in name:
        _register_extensions()
    if name in OPTIMIZERS:
        entry = OPTIMIZERS.entry(name)
        factory, signature_of = entry.factory, entry.signature_of
    elif "." in name:
        cls = _import_class(name)
        factory, signature_of = _class_factory(cls), _explicit_signature(cls)
    else:
        raise OptimizerError(
            f"optimizer.name {name!r} is not registered; registered names: "
            f"{', '.join(OPTIMIZERS.names())}; or give an import path such as torch.optim.AdamW"
        )
    if params is not None and not _takes_params(factory):
        raise OptimizerError(
            f"optimizer {name!r} cannot be built on given parameter groups (its factory takes no "
            "`params`), so it cannot be the base of a wrapper that regroups parameters"
        )
    extra = {} if params is None else {"params": params}
    try:
        check_options("optimizer.options", name, signature_of, options, OPTIMIZERS.positional)
        optimizer = factory(model, lr, **extra, **options)
    except (TypeError, ValueError) as exc:
        raise OptimizerError(f"optimizer {name!r} with lr={lr} and options {options}: {exc}") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise OptimizerError(
            f"optimizer.name {name!r} built a {type(optimizer).__name__}, not a torch.optim.Optimizer"
        )
    return optimizer
