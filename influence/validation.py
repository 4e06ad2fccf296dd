"""Checks of user arguments that many modules share; each raises a named, explained error.

Every check returns the value it accepted (converted where it says so), so a caller writes
``self.depth = check_positive_int("depth", depth)``.
"""

from __future__ import annotations

import math
from typing import Any

from influence.exceptions import invalid


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """``value`` if it is a positive ``int`` (or ``None`` when ``allow_none``), else raise.

    Raises:
        InvalidArgumentError: naming ``name`` and the value.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        raise invalid(name, value, "a positive integer" + (" or None" if allow_none else ""))
    return value


def check_int_at_least(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an ``int`` of at least ``minimum``, else raise."""
    if not _is_int(value) or value < minimum:
        raise invalid(name, value, f"an integer >= {minimum}")
    return value


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` if it is a positive ``int``, else raise."""
    return check_positive_int("batch_size", batch_size)


def check_positive_float(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite positive number, else raise."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not value > 0:
        raise invalid(name, value, "a finite positive number")
    return float(value)


def check_non_negative_float(name: str, value: Any) -> float:
    """``float(value)`` if it is a finite number ``>= 0``, else raise."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise invalid(name, value, "a finite number >= 0")
    return float(value)


__all__ = [
    "check_batch_size",
    "check_int_at_least",
    "check_non_negative_float",
    "check_positive_float",
    "check_positive_int",
]
