"""Exact inverse-Hessian products from the dense Hessian.

The solver builds the dense ``P x P`` Hessian (or Gauss-Newton matrix) of the objective with
``P`` Hessian-vector products, takes its symmetric eigendecomposition ``H = V diag(e) V^T`` and
applies ``(H + damping I)^{-1} = V diag(1 / (e + damping)) V^T``. It is the reference the
iterative solvers are tested against, and only fits small parameter sets (``max_parameters``).
An indefinite but non-singular ``H + damping I`` is inverted as is; a singular one is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from influence.exceptions import InvalidArgumentError, SolverDivergedError
from influence.solvers.base import InverseHessianSolver
from influence.validation import check_positive_int


class ExactSolver(InverseHessianSolver):
    """Dense eigendecomposition of ``H + damping I``.

    Args:
        damping: ``lambda >= 0`` added to the diagonal.
        gauss_newton: use the Gauss-Newton matrix instead of the Hessian.
        max_parameters: refuse objectives with more selected parameters than this.
        singular_rtol: ``H + damping I`` is refused as singular when its smallest eigenvalue (in
            absolute value) is below ``singular_rtol`` times its largest.

    Attributes:
        hessian: ``[P, P]`` after :meth:`fit`.
        eigenvalues: ``[P]`` eigenvalues of ``H`` (without damping), ascending.
        eigenvectors: ``[P, P]``, columns orthonormal.
    """

    name = "exact"

    def __init__(
        self,
        damping: float = 0.0,
        gauss_newton: bool = False,
        *,
        max_parameters: int = 20_000,
        singular_rtol: float = 1e-12,
    ) -> None:
        super().__init__(damping=damping, gauss_newton=gauss_newton)
        self.max_parameters = check_positive_int("max_parameters", max_parameters)
        self.singular_rtol = float(singular_rtol)
        self.hessian: Tensor | None = None
        self.eigenvalues: Tensor | None = None
        self.eigenvectors: Tensor | None = None

    @property
    def arguments(self) -> dict[str, Any]:
        return {**super().arguments, "singular_rtol": self.singular_rtol}

    def _fit(self, objective: Any) -> None:
        p = int(objective.n_parameters)
        if p > self.max_parameters:
            raise InvalidArgumentError(
                f"the exact solver builds a dense P x P Hessian, but P = {p} selected parameters "
                f"exceeds max_parameters = {self.max_parameters}; select fewer parameters "
                "(e.g. params='last') or use solver='cg', 'lissa' or 'arnoldi'"
            )
        self.hessian = objective.hessian(gauss_newton=self.gauss_newton)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.hessian)
        shifted = (self.eigenvalues + self.damping).abs()
        if shifted.numel() and shifted.min() <= self.singular_rtol * max(float(shifted.max()), 1e-300):
            raise SolverDivergedError(
                f"H + damping*I is singular (smallest |eigenvalue| {float(shifted.min()):.3e}, "
                f"largest {float(shifted.max()):.3e}, damping={self.damping}); raise damping "
                "or use gauss_newton=True with damping > 0"
            )

    def _solve(self, rhs: Tensor) -> Tensor:
        v = self.eigenvectors
        coefficients = (rhs @ v) / (self.eigenvalues + self.damping)
        return coefficients @ v.T
