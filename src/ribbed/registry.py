"""A name -> factory table with option checking, shared by every pluggable piece.

Optimisers, gradient methods, training plug-ins and batch samplers are all looked up by
name from a config and built with free-form ``options``. :class:`Registry` gives each of them
the same behaviour: an unknown name lists the registered ones; an unknown option names the
option and lists the allowed ones (read from the factory's signature), in terms of the
config field the user wrote.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "allowed_options", "check_options"]

T = TypeVar("T")


def allowed_options(signature_of: Callable, positional: Iterable[str] = ()) -> list[str] | None:
    """Keyword options ``signature_of`` accepts, less ``positional``; ``None`` if it takes ``**kwargs``."""
    params = inspect.signature(signature_of).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    skip = {"self", *positional}
    return [
        name for name, p in params.items()
        if name not in skip and p.kind not in (inspect.Parameter.VAR_POSITIONAL,)
    ]


def check_options(field: str, name: str, signature_of: Callable, options: dict,
                  positional: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` naming ``field`` if ``options`` has keys ``signature_of`` does not take."""
    allowed = allowed_options(signature_of, positional)
    if allowed is None:
        return
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(
            f"{field}: unknown option(s) {unknown} for {name!r}; allowed: {', '.join(allowed) or '(none)'}"
        )


@dataclass(frozen=True)
class _Entry(Generic[T]):
    factory: Callable[..., T]
    description: str
    signature_of: Callable


class Registry(Generic[T]):
    """Named factories of one kind of thing.

    Args:
        kind: what is registered, for messages ("training plug-in").
        field: the config field that names an entry ("train.plugins").
        positional: factory arguments supplied by the caller, not by options.
    """

    def __init__(self, kind: str, field: str, positional: Iterable[str] = ()):
        self.kind, self.field, self.positional = kind, field, tuple(positional)
        self._entries: dict[str, _Entry[T]] = {}

    def register(self, name: str, description: str, signature_of: Callable | None = None):
        """Decorator registering ``factory`` under ``name``."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = _Entry(factory, description, signature_of or factory)
            return factory

        return decorate

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        return {name: self._entries[name].description for name in self.names()}

    def entry(self, name: str) -> _Entry[T]:
        if name not in self._entries:
            raise ValueError(
                f"{self.field}: unknown {self.kind} {name!r}; allowed: {', '.join(self.names()) or '(none)'}"
            )
        return self._entries[name]

    def build(self, name: str, *args: Any, **options: Any) -> T:
        """``factory(*args, **options)`` after checking the name and the options."""
        entry = self.entry(name)
        check_options(self.field, name, entry.signature_of, options, self.positional)
        try:
            return entry.factory(*args, **options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.field} {name!r} with options {options}: {exc}") from None
