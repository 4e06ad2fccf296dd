"""Errors raised by the influence library.

Every error names the bad value and what would have been accepted. They subclass
built-in exceptions so callers can catch them as ``ValueError`` etc.
"""

from __future__ import annotations


class InfluenceError(Exception):
    """Base class of every error raised by :mod:`influence`."""


class InvalidArgumentError(InfluenceError, ValueError):
    """An argument has a value outside of what is accepted."""


def invalid(name: str, value: object, accepted: str) -> InvalidArgumentError:
    """Build an :class:`InvalidArgumentError` with a uniform message.

    Args:
        name: the argument's name, e.g. ``"solver"``.
        value: the value that was given.
        accepted: a phrase describing what is accepted, e.g. ``"one of 'exact', 'cg'"``.
    """
    return InvalidArgumentError(f"{name}={value!r} is not accepted; expected {accepted}")


class CacheMismatchError(InfluenceError, ValueError):
    """An on-disk artifact was made with other arguments than the ones given now."""


class CorruptedArtifactError(InfluenceError, OSError):
    """An on-disk artifact is missing or fails its checksum."""


class SolverDivergedError(InfluenceError, ArithmeticError):
    """An iterative solver diverged (its iterate grew without bound or became NaN)."""


class DataError(InfluenceError, OSError):
    """A data file is missing, corrupted or malformed."""
