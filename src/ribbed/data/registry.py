"""The dataset contract and the registry that maps dataset names to loaders.

A loader is a function registered under a name with :func:`register_dataset`. Its keyword
parameters are its options; ``seed`` and ``val_fraction``, when it declares them, are passed
by :func:`load_dataset` and are not options. :func:`load_dataset` rejects unknown or missing
options before the loader runs and records everything it used in ``Dataset.meta``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

TASKS = ("classification", "language-modeling")
_COMMON_ARGUMENTS = ("seed", "val_fraction")


class DatasetError(ValueError):
    """A dataset could not be loaded: bad name, bad option, or missing or malformed files."""


@dataclass(frozen=True)
class Split:
    """One split of a dataset: inputs ``x`` and targets ``y``, aligned along dimension 0."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DatasetError(f"split has {len(self.x)} inputs but {len(self.y)} targets")

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset with train, validation and test splits.

    ``input_shape`` is the shape of one sample of ``x``; ``num_classes`` is the number of
    classes, or the vocabulary size for language modelling. ``meta`` is JSON-serialisable
    and records where the data came from and the options used, so a run can record it.
    """

    name: str
    task: str
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    num_classes: int
    meta: dict

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DatasetError(f"dataset {self.name!r}: task {self.task!r} is not one of {TASKS}")


Loader = Callable[..., Dataset]


@dataclass(frozen=True)
class _Entry:
    loader: Loader
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, description: str) -> Callable[[Loader], Loader]:
    """Register a loader under ``name``; used as a decorator, returns the loader unchanged."""

    def decorate(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise DatasetError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = _Entry(loader, description)
        return loader

    return decorate


def list_datasets() -> dict[str, str]:
    """Map each registered dataset name to a one-line description including its options."""
    return {
        name: f"{entry.description} (options: {_describe_options(entry.loader)})"
        for name, entry in sorted(_REGISTRY.items())
    }


def load_dataset(name: str, *, seed: int = 0, val_fraction: float = 0.1, **options) -> Dataset:
    """Load dataset ``name``; same arguments give bit-identical tensors.

    Args:
        name: a registered name, see :func:`list_datasets`.
        seed: non-negative integer seeding generation and the validation split.
        val_fraction: fraction of the training data held out for validation, in (0, 1).
        **options: dataset-specific options, see :func:`list_datasets`.

    Returns:
        The :class:`Dataset`, with ``meta`` extended by the seed, ``val_fraction``, the
        options with defaults filled in, and the split sizes.

    Raises:
        DatasetError: unknown name, unknown or missing option, or a bad value.

    Example:
        >>> data = load_dataset("digits", seed=1)
        >>> data.input_shape
        (1, 8, 8)
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    _check_seed(seed)
    _check_val_fraction(val_fraction)
    resolved = _resolve_options(name, entry.loader, options)
    common = {"seed": seed, "val_fraction": val_fraction}
    accepted = _parameters(entry.loader)
    dataset = entry.loader(**{k: v for k, v in common.items() if k in accepted}, **resolved)
    meta = {
        **dataset.meta,
        **common,
        "options": {key: _json_value(value) for key, value in resolved.items()},
        "split_sizes": {
            "train": len(dataset.train),
            "val": len(dataset.val),
            "test": len(dataset.test),
        },
    }
    return dataclasses.replace(dataset, meta=meta)


def invalid_option(dataset: str, option: str, value: object, allowed: str) -> DatasetError:
    """Build the error for an option value a loader does not accept."""
    return DatasetError(f"dataset {dataset!r}: {option}={value!r} is invalid; expected {allowed}")


def require_int(dataset: str, option: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an integer >= ``minimum``, else raise :class:`DatasetError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid_option(dataset, option, value, f"an integer >= {minimum}")
    return value


def require_path(dataset: str, option: str, value: object, kind: str, expected: str) -> Path:
    """Return ``value`` as a :class:`Path` if it names an existing ``kind`` ("file" or "dir").

    ``expected`` describes what should be there, so the error tells the user what to provide.
    """
    if not isinstance(value, str | os.PathLike):
        raise invalid_option(dataset, option, value, f"a path to {expected}")
    path = Path(value).expanduser()
    exists = path.is_dir() if kind == "dir" else path.is_file()
    if not exists:
        raise DatasetError(
            f"dataset {dataset!r}: {option}={os.fspath(value)!r} is not an existing {kind}; "
            f"expected {expected}"
        )
    return path


def _parameters(loader: Loader) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(loader).parameters)


def _option_parameters(loader: Loader) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in _parameters(loader).items() if k not in _COMMON_ARGUMENTS}


def _describe_options(loader: Loader) -> str:
    described = [
        f"{name} (required)" if p.default is inspect.Parameter.empty else f"{name}={p.default!r}"
        for name, p in _option_parameters(loader).items()
    ]
    return ", ".join(described) or "none"


def _resolve_options(name: str, loader: Loader, options: dict) -> dict:
    """Check option names against the loader signature and fill in defaults."""
    parameters = _option_parameters(loader)
    allowed = ", ".join(parameters) or "none"
    for option in options:
        if option not in parameters:
            raise DatasetError(
                f"dataset {name!r} has no option {option!r}; allowed options: {allowed}"
            )
    resolved = {}
    for option, parameter in parameters.items():
        if option in options:
            resolved[option] = options[option]
        elif parameter.default is inspect.Parameter.empty:
            raise DatasetError(
                f"dataset {name!r} requires option {option!r}; options: {_describe_options(loader)}"
            )
        else:
            resolved[option] = parameter.default
    return resolved


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DatasetError(f"seed={seed!r} is invalid; expected an integer in [0, 2**32)")


def _check_val_fraction(val_fraction: object) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction={val_fraction!r} is invalid; expected a number in (0, 1)")


def _json_value(value: object) -> object:
    return os.fspath(value) if isinstance(value, os.PathLike) else value
