"""Option checks shared by the RIBBED pieces and the optimisers: errors name the field, the
value and what is allowed.

Booleans are refused where a number is expected (``True`` is an ``int`` in Python, never a
meaningful step count or rate), and so are NaN and infinities. This module imports nothing
from ribbed, so any package can use it without an import cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["check_integer", "check_number"]


def check_integer(field: str, value: Any, low: int = 1, note: str = "",
                  error: type[ValueError] = ValueError) -> int:
    """``value`` if it is an integer ``>= low``; else ``error`` (a ``ValueError``; ``note`` is
    appended to the allowed range, e.g. ``" (0: off)"``)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise error(f"{field}: got {value!r}; allowed: an integer >= {low}{note}")
    return value


def check_number(field: str, value: Any, allowed: str, ok: Callable[[float], bool],
                 error: type[ValueError] = ValueError) -> float:
    """``value`` as a float if it is a finite real number for which ``ok`` holds; else ``error``
    (a ``ValueError``) saying ``allowed``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not ok(value):
        raise error(f"{field}: got {value!r}; allowed: {allowed}")
    return float(value)
