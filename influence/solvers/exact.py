"""Exact inverse-Hessian products from the dense Hessian.

The solver builds the dense ``P x P`` Hessian (or Gauss-Newton matrix) of the objective with
``P`` Hessian-vector products (256 at a time, vectorised), then factorises ``H + damping I``:

- positive definite (the usual case with damping): a Cholesky factor ``L L^T``, about ``P^3 / 3``
  operations (seconds for ``P`` near 10,000, where an eigendecomposition takes minutes), and
  ``solve`` is two triangular solves;
- otherwise its symmetric eigendecomposition ``H = V diag(e) V^T``, and
  ``(H + damping I)^{-1} = V diag(1 / (e + damping)) V^T``: an indefinite but non-singular
  ``H + damping I`` is inverted as is; a singular one is refused.

It is the reference the iterative solvers are tested against, and only fits small parameter sets
(``max_parameters``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from influence.exceptions import InvalidArgumentError, SolverDivergedError, invalid
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
        hessian: ``[P, P]`` after :meth:`fit` (``None`` after :meth:`load_state`).
        cholesky: ``[P, P]`` lower factor of ``H + damping I`` when it is positive definite, else ``None``.
        eigenvalues: ``[P]`` eigenvalues of ``H`` (without damping), ascending, when ``H + damping I``
            is not positive definite (else ``None``).
        eigenvectors: ``[P, P]``, columns orthonormal (with ``eigenvalues``).
    """

    name = "exact"
    keeps_state = True

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
        self.cholesky: Tensor | None = None
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
        self._factorise(self.hessian)

    def _factorise(self, hessian: Tensor) -> None:
        self.cholesky = self.eigenvalues = self.eigenvectors = None
        shifted = hessian.clone()
        shifted.diagonal().add_(self.damping)
        factor, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        pivots = factor.diagonal() ** 2
        if int(info) == 0 and pivots.numel() and bool(torch.isfinite(pivots).all()) and float(pivots.min()) > (
            self.singular_rtol * float(pivots.max())
        ):
            self.cholesky = factor
            return
        del factor
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(hessian)
        shifted = (self.eigenvalues + self.damping).abs()
        if shifted.numel() and shifted.min() <= self.singular_rtol * max(float(shifted.max()), 1e-300):
            raise SolverDivergedError(
                f"H + damping*I is singular (smallest |eigenvalue| {float(shifted.min()):.3e}, "
                f"largest {float(shifted.max()):.3e}, damping={self.damping}); raise damping "
                "or use gauss_newton=True with damping > 0"
            )

    def _solve(self, rhs: Tensor) -> Tensor:
        if self.cholesky is not None:
            return torch.cholesky_solve(rhs.T, self.cholesky).T
        v = self.eigenvectors
        coefficients = (rhs @ v) / (self.eigenvalues + self.damping)
        return coefficients @ v.T

    def _state_tensors(self) -> dict[str, Tensor]:
        if self.cholesky is not None:
            return {"cholesky": self.cholesky}
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    def _load_tensors(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.hessian = None
        self.cholesky = tensors.get("cholesky")
        self.eigenvalues, self.eigenvectors = tensors.get("eigenvalues"), tensors.get("eigenvectors")
        if self.cholesky is None and (self.eigenvalues is None or self.eigenvectors is None):
            raise invalid("exact solver state", sorted(tensors), "'cholesky', or 'eigenvalues' and 'eigenvectors'")
