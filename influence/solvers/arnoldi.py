"""Arnoldi low-rank inverse Hessian (Schioppa et al., 2022, "Scaling up influence functions").

:meth:`ArnoldiSolver.fit` runs ``n_iterations`` steps of the Arnoldi iteration on the Hessian (or
Gauss-Newton matrix) from a seeded random unit vector, with full re-orthogonalisation (two
Gram-Schmidt passes) against every previous Krylov vector. On breakdown (the Krylov space became
invariant, e.g. because of a repeated eigenvalue) the iteration restarts from a fresh random
direction orthogonal to the basis, and stops once the basis spans the whole space. The small
projected matrix is symmetrised and diagonalised, and the ``top_k`` largest positive eigenvalues
with their eigenvectors are kept ("distilled"): non-positive Ritz values are never kept, so fewer
than ``top_k`` pairs remain only when the Krylov space holds fewer positive Ritz values. With Ritz
vectors ``U`` ``[k, P]`` and eigenvalues ``e`` ``[k]``:

    solve(b) = U^T diag(1 / (e + damping)) U b,
    project(g) = diag((e + damping)^{-1/2}) U g,

so an influence score is ``project(query) @ project(train).T``, and callers can store only ``k``
numbers per example. With ``top_k = n_iterations = P`` on a positive-definite Hessian, ``solve`` is
the exact inverse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from influence.exceptions import InvalidArgumentError, SolverDivergedError, invalid
from influence.solvers.base import InverseHessianSolver
from influence.validation import check_positive_int


class ArnoldiSolver(InverseHessianSolver):
    """Low-rank eigen-approximation of the Hessian by Arnoldi iteration.

    Args:
        damping: ``lambda >= 0`` added to the kept eigenvalues.
        gauss_newton: use the Gauss-Newton matrix instead of the Hessian.
        n_iterations: Arnoldi steps (Hessian-vector products); at most ``P`` are useful.
        top_k: eigenpairs kept: those of the ``top_k`` largest positive Ritz values (fewer only
            when the Krylov space has fewer positive ones).
        seed: seed of the start vector.
        breakdown_rtol: restart when a new Krylov vector's norm is below this times the largest
            entry of the projected matrix.

    Attributes:
        eigenvalues: ``[k]`` kept eigenvalues of ``H`` (without damping), descending.
        eigenvectors: ``[k, P]`` orthonormal rows.
        n_steps: Arnoldi steps actually taken.
    """

    name = "arnoldi"

    def __init__(
        self,
        damping: float = 0.0,
        gauss_newton: bool = False,
        *,
        n_iterations: int = 100,
        top_k: int = 20,
        seed: int = 0,
        breakdown_rtol: float = 1e-10,
    ) -> None:
        super().__init__(damping=damping, gauss_newton=gauss_newton)
        self.n_iterations = check_positive_int("n_iterations", n_iterations)
        self.top_k = check_positive_int("top_k", top_k)
        if top_k > n_iterations:
            raise invalid("top_k", top_k, f"at most n_iterations = {n_iterations}")
        self.seed = int(seed)
        self.breakdown_rtol = float(breakdown_rtol)
        self.eigenvalues: Tensor | None = None
        self.eigenvectors: Tensor | None = None
        self.n_steps = 0

    @property
    def arguments(self) -> dict[str, Any]:
        return {
            **super().arguments, "n_iterations": self.n_iterations, "top_k": self.top_k,
            "seed": self.seed, "breakdown_rtol": self.breakdown_rtol,
        }

    def _fit(self, objective: Any) -> None:
        p = int(objective.n_parameters)
        n = min(self.n_iterations, p)
        dtype, device = objective.dtype, objective.device
        generator = torch.Generator().manual_seed(self.seed)
        q = torch.randn(p, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        basis = torch.zeros(n + 1, p, dtype=dtype, device=device)
        basis[0] = q / torch.linalg.vector_norm(q)
        projected = torch.zeros(n + 1, n, dtype=dtype, device=device)
        steps = 0
        for j in range(n):
            w = objective.matvec(basis[j][None], self.gauss_newton)[0]
            if not bool(torch.isfinite(w).all()):
                raise SolverDivergedError(
                    "Arnoldi iteration met non-finite Hessian-vector products; check the model and data"
                )
            for _ in range(2):
                coefficients = basis[: j + 1] @ w
                w = w - coefficients @ basis[: j + 1]
                projected[: j + 1, j] += coefficients
            norm = torch.linalg.vector_norm(w)
            steps = j + 1
            if float(norm) > self.breakdown_rtol * max(float(projected.abs().max()), 1e-300):
                projected[j + 1, j] = norm
                basis[j + 1] = w / norm
                continue
            # Breakdown: the Krylov space is invariant. Restart from a fresh random direction
            # orthogonal to it, so repeated eigenvalues and other invariant subspaces are found.
            restart = self._orthogonal_direction(basis[: j + 1], generator)
            if restart is None:
                break
            basis[j + 1] = restart
        self.n_steps = steps
        small = projected[:steps, :steps]
        small = (small + small.T) / 2
        values, vectors = torch.linalg.eigh(small)
        positive = values > 0
        values, vectors = values[positive], vectors[:, positive]
        order = values.argsort(descending=True)[: self.top_k]
        self.eigenvalues = values[order]
        self.eigenvectors = vectors[:, order].T @ basis[:steps]
        if self.eigenvalues.numel() == 0:
            raise InvalidArgumentError(
                f"the Arnoldi iteration found no positive eigenvalue in {steps} steps; raise "
                "n_iterations, or use gauss_newton=True"
            )

    def _orthogonal_direction(self, basis: Tensor, generator: torch.Generator) -> Tensor | None:
        """A random unit vector orthogonal to the rows of ``basis`` ``[j, P]``, or ``None`` if they span."""
        if basis.shape[0] >= basis.shape[1]:
            return None
        w = torch.randn(basis.shape[1], generator=generator, dtype=torch.float64)
        w = w.to(device=basis.device, dtype=basis.dtype)
        w = w / torch.linalg.vector_norm(w)
        for _ in range(2):
            w = w - (basis @ w) @ basis
        norm = torch.linalg.vector_norm(w)
        if float(norm) <= 1e-8:
            return None
        return w / norm

    @property
    def rank(self) -> int:
        """``k``, the number of kept eigenpairs."""
        self._check_fitted()
        return int(self.eigenvalues.numel())

    def _solve(self, rhs: Tensor) -> Tensor:
        u = self.eigenvectors
        return ((rhs @ u.T) / (self.eigenvalues + self.damping)) @ u

    def project(self, g: Tensor) -> Tensor:
        """Whitened coordinates of gradients in the kept eigenbasis.

        Args:
            g: ``[b, P]`` (or ``[P]``).

        Returns:
            ``[b, k]`` (or ``[k]``): ``diag((e + damping)^{-1/2}) U g``, so that
            ``project(a) @ project(b).T = a (H_k + damping)^{-1} b^T``.
        """
        self._check_fitted()
        p = self.n_parameters
        if not isinstance(g, Tensor) or g.dim() not in (1, 2) or g.shape[-1] != p:
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise invalid("g", shape, f"a tensor [b, P] or [P] with P = {p}")
        g = g.to(device=self.eigenvectors.device, dtype=self.eigenvectors.dtype)
        return (g @ self.eigenvectors.T) / (self.eigenvalues + self.damping).sqrt()
