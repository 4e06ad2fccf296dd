"""The interface every inverse-Hessian solver implements.

A solver is fitted once to an :class:`~influence.gradients.objective.Objective` (which gives
Hessian or Gauss-Newton products of the training objective over the selected parameters) and then
solves ``(H + damping * I) x = rhs`` for any number of right-hand sides ``rhs`` ``[m, P]``.
Solvers are interchangeable: the influence-function method only calls :meth:`fit` and
:meth:`solve`.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor

from influence.exceptions import InvalidArgumentError, invalid


class InverseHessianSolver(abc.ABC):
    """Applies ``(H + damping * I)^{-1}`` where ``H`` is the objective's Hessian (or Gauss-Newton).

    Args:
        damping: ``lambda >= 0`` added to the diagonal.
        gauss_newton: use the Gauss-Newton matrix ``J^T H_out J`` (positive semi-definite for
            convex losses) instead of the exact Hessian.

    Attributes:
        name: the solver's name in :func:`influence.solvers.make_solver`.
        objective: the fitted objective (``None`` before :meth:`fit`).
        last_info: diagnostics of the last :meth:`solve` (iterations, residuals, ...).
    """

    name: str = ""

    def __init__(self, damping: float = 0.0, gauss_newton: bool = False) -> None:
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0.0:
            raise invalid("damping", damping, "a non-negative number")
        if not isinstance(gauss_newton, bool):
            raise invalid("gauss_newton", gauss_newton, "True or False")
        self.damping = float(damping)
        self.gauss_newton = gauss_newton
        self.objective: Any = None
        self.last_info: dict[str, Any] = {}

    @property
    def arguments(self) -> dict[str, Any]:
        """The options that define this solver's result (saved beside artifacts, checked on reuse)."""
        return {"solver": self.name, "damping": self.damping, "gauss_newton": self.gauss_newton}

    @property
    def n_parameters(self) -> int:
        """``P`` of the fitted objective."""
        self._check_fitted()
        return int(self.objective.n_parameters)

    def fit(self, objective: Any) -> "InverseHessianSolver":
        """Prepare the solver for ``objective`` (dense factorisation, eigenbasis, ...).

        Args:
            objective: an :class:`~influence.gradients.objective.Objective`.

        Returns:
            ``self``.
        """
        self.objective = objective
        self._fit(objective)
        return self

    def _fit(self, objective: Any) -> None:
        """Solver-specific preparation; the default keeps only the objective."""

    def matvec(self, v: Tensor) -> Tensor:
        """``(H + damping I) v`` for ``v`` ``[m, P]``."""
        out = self.objective.matvec(v, self.gauss_newton)
        if self.damping:
            out = out + self.damping * v
        return out

    def solve(self, rhs: Tensor) -> Tensor:
        """``(H + damping * I)^{-1} rhs``.

        Args:
            rhs: ``[P]`` or ``[m, P]``.

        Returns:
            Tensor of the shape of ``rhs``, in the objective's dtype and on its device.
        """
        self._check_fitted()
        p = self.n_parameters
        if not isinstance(rhs, Tensor) or rhs.dim() not in (1, 2) or rhs.shape[-1] != p:
            shape = tuple(rhs.shape) if isinstance(rhs, Tensor) else type(rhs).__name__
            raise invalid("rhs", shape, f"a tensor [P] or [m, P] with P = {p}")
        single = rhs.dim() == 1
        matrix = rhs[None] if single else rhs
        matrix = matrix.to(device=self.objective.device, dtype=self.objective.dtype)
        if matrix.shape[0] == 0:
            out = matrix.clone()
        else:
            out = self._solve(matrix)
        return out[0] if single else out

    @abc.abstractmethod
    def _solve(self, rhs: Tensor) -> Tensor:
        """Solve for ``rhs`` ``[m, P]`` (``m >= 1``), returning ``[m, P]``."""

    def _check_fitted(self) -> None:
        if self.objective is None:
            raise InvalidArgumentError(
                f"{type(self).__name__} is not fitted; call .fit(objective) before .solve(rhs)"
            )


def row_norms(x: Tensor) -> Tensor:
    """Euclidean norm of each row of ``x`` ``[m, P]`` -> ``[m]``."""
    return torch.linalg.vector_norm(x, dim=1)
