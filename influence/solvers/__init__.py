"""Inverse-Hessian solvers: ``(H + damping I)^{-1} rhs`` for the influence function.

``make_solver(name, **options)`` builds one by name; every solver is fitted to an
:class:`~influence.gradients.objective.Objective` and then solves for batches of right-hand sides.
"""

from __future__ import annotations

import inspect
from typing import Any

from influence.exceptions import invalid
from influence.solvers.arnoldi import ArnoldiSolver
from influence.solvers.base import InverseHessianSolver
from influence.solvers.cg import ConjugateGradientSolver
from influence.solvers.ekfac import EkfacSolver
from influence.solvers.exact import ExactSolver
from influence.solvers.lissa import LissaSolver

_REGISTRY: dict[str, type[InverseHessianSolver]] = {
    "exact": ExactSolver,
    "cg": ConjugateGradientSolver,
    "lissa": LissaSolver,
    "arnoldi": ArnoldiSolver,
    "ekfac": EkfacSolver,
}

SOLVERS: tuple[str, ...] = tuple(_REGISTRY)
STATEFUL_SOLVERS: tuple[str, ...] = tuple(name for name, solver in _REGISTRY.items() if solver.keeps_state)


def make_solver(name: str, **options: Any) -> InverseHessianSolver:
    """Build an inverse-Hessian solver by name.

    Args:
        name: one of :data:`SOLVERS`.
        **options: keyword arguments of the solver's class (``damping``, ``gauss_newton``, ...).

    Returns:
        An unfitted :class:`InverseHessianSolver`.
    """
    if name not in _REGISTRY:
        raise invalid("solver", name, "one of " + ", ".join(repr(s) for s in SOLVERS))
    cls = _REGISTRY[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in options:
        if key not in accepted:
            raise invalid(f"{name} solver option", key, "one of " + ", ".join(repr(a) for a in accepted))
    return cls(**options)


__all__ = [
    "SOLVERS",
    "STATEFUL_SOLVERS",
    "ArnoldiSolver",
    "ConjugateGradientSolver",
    "EkfacSolver",
    "ExactSolver",
    "InverseHessianSolver",
    "LissaSolver",
    "make_solver",
]
