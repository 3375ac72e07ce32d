"""Option checks shared by the RIBBED pieces: errors name the field, the value and what is allowed.

Booleans are refused where a number is expected (``True`` is an ``int`` in Python, never a
meaningful step count or rate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["check_integer", "check_number"]


def check_integer(field: str, value: Any, low: int = 1, note: str = "") -> int:
    """``value`` if it is an integer ``>= low``; else ``ValueError`` (``note`` is appended to
    the allowed range, e.g. ``" (0: off)"``)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{field}: got {value!r}; allowed: an integer >= {low}{note}")
    return value


def check_number(field: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a real number for which ``ok`` holds; else ``ValueError``
    saying ``allowed``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
        raise ValueError(f"{field}: got {value!r}; allowed: {allowed}")
    return float(value)
