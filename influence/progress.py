"""Progress bars for the library's long loops: tqdm on stderr, on only when asked for or on a terminal.

Every long loop of the library (training epochs and steps, gradient and index shards, solver
iterations, MAGIC's replay and reverse pass, case-deletion retrainings) iterates through
:func:`progress`, which returns a tqdm iterator when progress is on and the iterable itself when
it is off, so that a loop without a bar costs nothing and no loop's numbers or random draws depend
on the setting. Whether progress is on is decided, first to last:

1. :func:`enable` (``True`` or ``False``; ``enable(None)`` returns to the rules below);
2. the environment variable ``INFLUENCE_PROGRESS``: ``1`` on, ``0`` off (empty or unset: rule 3);
3. the default: on only when stderr is a terminal, so tests, CI logs and Prefect workers, whose
   stderr is a pipe or a file, are not flooded.

Bars are written to stderr. A bar that ends inside another one (a solver's iterations inside a fit,
an epoch's steps inside the training run) is cleared when it ends; an outermost bar stays.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from typing import TypeVar

from influence.exceptions import invalid

ENVIRONMENT_VARIABLE = "INFLUENCE_PROGRESS"

T = TypeVar("T")

_forced: bool | None = None
_warned_missing = False


def enable(flag: bool | None = True) -> None:
    """Turn the progress bars on or off for this process, whatever the environment says.

    Args:
        flag: ``True`` on, ``False`` off, ``None`` back to ``INFLUENCE_PROGRESS`` and the terminal default.

    Raises:
        InvalidArgumentError: ``flag`` is not a bool or ``None``.
    """
    global _forced
    if flag is not None and not isinstance(flag, bool):
        raise invalid("flag", flag, "True, False or None (the environment's choice)")
    _forced = flag


def _from_environment() -> bool | None:
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise invalid(ENVIRONMENT_VARIABLE, value, "'1' (progress bars on), '0' (off) or unset (on when stderr is a terminal)")
    return value == "1"


def _stderr_is_terminal() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def is_enabled() -> bool:
    """Whether :func:`progress` shows bars now (see the module docstring for the rules).

    Raises:
        InvalidArgumentError: ``INFLUENCE_PROGRESS`` holds something other than ``0``, ``1`` or nothing.
    """
    if _forced is not None:
        return _forced
    chosen = _from_environment()
    return _stderr_is_terminal() if chosen is None else chosen


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    *,
    leave: bool | None = None,
) -> Iterable[T]:
    """``iterable`` with a progress bar on stderr when progress is on, else ``iterable`` itself.

    Args:
        iterable: what the loop iterates over; its items are passed through unchanged.
        total: the expected number of items (default: ``len(iterable)`` when it has one).
        desc: the bar's label.
        unit: what one item is (``"epoch"``, ``"step"``, ``"shard"``).
        leave: keep the finished bar (``True``), clear it (``False``, for loops inside other loops),
            or keep it only when no other bar is open (``None``).

    Returns:
        A tqdm iterator over ``iterable``, or ``iterable`` unchanged when progress is off (or tqdm is
        missing: then a warning says so once, when the bars were asked for explicitly).
    """
    global _warned_missing
    if not is_enabled():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        if (_forced or _from_environment()) and not _warned_missing:
            _warned_missing = True
            warnings.warn("progress bars were asked for but tqdm is not installed (pip install tqdm)", stacklevel=2)
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True)


__all__ = ["ENVIRONMENT_VARIABLE", "enable", "is_enabled", "progress"]
