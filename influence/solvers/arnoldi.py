"""Arnoldi low-rank inverse Hessian (Schioppa et al., 2022, "Scaling up influence functions").

:meth:`ArnoldiSolver.fit` runs ``n_iterations`` steps of the Arnoldi iteration on the Hessian (or
Gauss-Newton matrix) from a seeded random unit vector, with full re-orthogonalisation (two
Gram-Schmidt passes) against every previous Krylov vector. On breakdown (the Krylov space became
invariant, e.g. because of a repeated eigenvalue) the iteration restarts from a fresh random
direction orthogonal to the basis, and stops once the basis spans the whole space. The small
projected matrix is symmetrised and diagonalised, and ``top_k`` Ritz pairs are kept ("distilled"):

- ``select="positive"``: the ``top_k`` largest positive eigenvalues (fewer only when the Krylov
  space holds fewer positive Ritz values); non-positive ones are never kept;
- ``select="magnitude"``: the ``top_k`` largest in absolute value, negative ones included (what
  the paper's reference code does).

With Ritz vectors ``U`` ``[k, P]``, eigenvalues ``e`` ``[k]`` and ``d = e + damping``:

    solve(b) = U^T diag(1 / d) U b + c (b - U^T U b),

where ``c`` is the complement's scale:

- ``complement="none"``: ``c = 0``, the rest of the space is dropped (the paper);
- ``complement="damping"``: ``c = 1/damping``: the eigenvalues the low-rank part never sees count
  as 0, so ``solve`` is the exact inverse of ``U^T diag(e) U + damping I``;
- ``complement="last"``: ``c = 1/(damping + |e_k|)``, ``e_k`` the smallest kept eigenvalue in
  magnitude: the unseen eigenvalues count as the last one seen, which bounds the weight of the
  complement by that of the weakest kept direction.

Measured against retraining (``bench/solver_lds.py``, MNIST logistic regression, 7,850
parameters, damping 1e-3, LDS of the exact solve 0.903), with the exact top eigenpairs: keeping
100 of them gives LDS 0.410 dropping the rest, 0.648 with ``"damping"`` and 0.738 with
``"last"``; keeping 500, 0.767, 0.774 and 0.901. The Arnoldi iteration itself (1,000 steps, 500
kept, ``"last"``: the defaults for that size) reached 0.901, and 0.740 with 200 steps and 100 kept;
as in the paper (100 steps, 20 kept, nothing on the complement), 0.165.

As in the paper, every gradient can be reduced once to ``k`` numbers,
``project(g) = diag(|d|^{-1/2}) U g``, and an influence score is a ``k``-dimensional product
(:meth:`ArnoldiSolver.representation`: the query side carries the signs of ``d``); with the
complement, the representation appends the complement ``sqrt(c) (b - U^T U b)``, randomly
projected when a projector is given. With ``top_k = n_iterations = P`` on a positive-definite
Hessian, ``solve`` is the exact inverse.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from influence.exceptions import InvalidArgumentError, SolverDivergedError, invalid
from influence.progress import progress
from influence.solvers.base import InverseHessianSolver
from influence.validation import check_positive_int

AUTO_BASIS_BYTES = 2**30  # memory of the Krylov basis when n_iterations is not given


class ArnoldiSolver(InverseHessianSolver):
    """Low-rank eigen-approximation of the Hessian by Arnoldi iteration.

    Args:
        damping: ``lambda >= 0`` added to the kept eigenvalues.
        gauss_newton: use the Gauss-Newton matrix instead of the Hessian.
        n_iterations: Arnoldi steps (Hessian-vector products); at most ``P`` are useful.
            ``None``: as many as a Krylov basis of 1 GiB holds, at most 1,000 (and ``P``), at least 20.
        top_k: eigenpairs kept: those of the ``top_k`` largest positive Ritz values (fewer only
            when the Krylov space has fewer positive ones); ``None``: half the steps.
        seed: seed of the start vector.
        select: ``"positive"`` (largest positive eigenvalues) or ``"magnitude"`` (largest in
            absolute value).
        complement: the scale of the orthogonal complement of the kept eigenvectors: ``"none"``
            (the paper), ``"damping"`` (``1/damping``, needs ``damping > 0``) or ``"last"``
            (``1/(damping + |e_k|)``, the default: the best of the three in the measurement above).
        breakdown_rtol: restart when a new Krylov vector's norm is below this times the largest
            entry of the projected matrix.

    Attributes:
        eigenvalues: ``[k]`` kept eigenvalues of ``H`` (without damping), descending.
        eigenvectors: ``[k, P]`` orthonormal rows.
        n_steps: Arnoldi steps actually taken.
    """

    name = "arnoldi"
    keeps_state = True

    def __init__(
        self,
        damping: float = 0.0,
        gauss_newton: bool = False,
        *,
        n_iterations: int | None = None,
        top_k: int | None = None,
        seed: int = 0,
        select: str = "positive",
        complement: str = "last",
        breakdown_rtol: float = 1e-10,
    ) -> None:
        super().__init__(damping=damping, gauss_newton=gauss_newton)
        self.n_iterations = check_positive_int("n_iterations", n_iterations, allow_none=True)
        self.top_k = check_positive_int("top_k", top_k, allow_none=True)
        if top_k is not None and n_iterations is not None and top_k > n_iterations:
            raise invalid("top_k", top_k, f"at most n_iterations = {n_iterations}")
        self.seed = int(seed)
        if select not in ("positive", "magnitude"):
            raise invalid("select", select, "'positive' or 'magnitude'")
        if complement not in ("none", "damping", "last"):
            raise invalid("complement", complement, "'none', 'damping' or 'last'")
        if complement == "damping" and not self.damping > 0:
            raise invalid("damping", damping, "a positive number when complement='damping' (the complement is scaled by 1/damping)")
        self.select = select
        self.complement = complement
        self.breakdown_rtol = float(breakdown_rtol)
        self.eigenvalues: Tensor | None = None
        self.eigenvectors: Tensor | None = None
        self.n_steps = 0

    @property
    def arguments(self) -> dict[str, Any]:
        return {
            **super().arguments, "n_iterations": self.n_iterations, "top_k": self.top_k,
            "seed": self.seed, "select": self.select, "complement": self.complement,
            "breakdown_rtol": self.breakdown_rtol,
        }

    def iterations_for(self, p: int, itemsize: int) -> tuple[int, int]:
        """``(Arnoldi steps, eigenpairs kept)`` for ``P = p``: the given ones, or by default as many
        steps as a Krylov basis of 1 GiB holds (at most 1,000 and ``P``, at least 20) and half of them kept."""
        n = self.n_iterations
        if n is None:
            n = max(20, min(1000, AUTO_BASIS_BYTES // max(1, p * itemsize)))
        n = min(n, p)
        k = min(self.top_k if self.top_k is not None else max(1, n // 2), n)
        return n, k

    def _fit(self, objective: Any) -> None:
        p = int(objective.n_parameters)
        n, top_k = self.iterations_for(p, objective.dtype.itemsize)
        dtype, device = objective.dtype, objective.device
        generator = torch.Generator().manual_seed(self.seed)
        q = torch.randn(p, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
        basis = torch.zeros(n + 1, p, dtype=dtype, device=device)
        basis[0] = q / torch.linalg.vector_norm(q)
        projected = torch.zeros(n + 1, n, dtype=dtype, device=device)
        steps = 0
        for j in progress(range(n), desc="Arnoldi", unit="step"):
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
        if self.select == "positive":
            positive = values > 0
            values, vectors = values[positive], vectors[:, positive]
            order = values.argsort(descending=True)[:top_k]
        else:
            order = values.abs().argsort(descending=True)[:top_k]
        self.eigenvalues = values[order]
        self.eigenvectors = vectors[:, order].T @ basis[:steps]
        if self.eigenvalues.numel() == 0:
            raise InvalidArgumentError(
                f"the Arnoldi iteration found no positive eigenvalue in {steps} steps; raise "
                "n_iterations, or use gauss_newton=True"
            )
        shifted = (self.eigenvalues + self.damping).abs()
        if float(shifted.min()) <= 1e-12 * max(float(shifted.max()), 1e-300):
            raise SolverDivergedError(
                f"a kept eigenvalue plus damping is zero ({float(shifted.min()):.3e}); raise damping, or use select='positive'"
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
        coordinates = rhs @ u.T
        out = (coordinates / (self.eigenvalues + self.damping)) @ u
        scale = self.complement_scale
        if scale:
            out += (rhs - coordinates @ u) * scale
        return out

    @property
    def complement_scale(self) -> float:
        """``c``, the factor :meth:`solve` applies on the complement of the kept eigenvectors."""
        self._check_fitted()
        if self.complement == "damping":
            return 1.0 / self.damping
        if self.complement == "last":
            last = float(self.eigenvalues.abs().min()) + self.damping
            if not last > 0:
                raise SolverDivergedError("complement='last' with a zero smallest kept eigenvalue and damping=0; raise damping")
            return 1.0 / last
        return 0.0

    def project(self, g: Tensor) -> Tensor:
        """Whitened coordinates of gradients in the kept eigenbasis.

        Args:
            g: ``[b, P]`` (or ``[P]``).

        Returns:
            ``[b, k]`` (or ``[k]``): ``diag(|e + damping|^{-1/2}) U g``, so that with positive
            ``e + damping``, ``project(a) @ project(b).T = a U^T diag(1 / (e + damping)) U b^T``
            (the low-rank part of :meth:`solve`).
        """
        single = isinstance(g, Tensor) and g.dim() == 1
        rows = self._check_rows("g", g)
        out = (rows @ self.eigenvectors.T) / (self.eigenvalues + self.damping).abs().sqrt()
        return out[0] if single else out

    def representation(self, g: Tensor, side: str, projector: Any = None) -> Tensor:
        """``[project(g) (times sign(e + damping) on the query side), complement]``: ``k`` numbers per
        gradient, plus ``P`` (or the projector's ``d``) with a complement; see the base class."""
        if side not in ("query", "train"):
            raise invalid("side", side, "'query' or 'train'")
        rows = self._check_rows("g", g)
        coordinates = rows @ self.eigenvectors.T
        shifted = self.eigenvalues + self.damping
        low_rank = coordinates / shifted.abs().sqrt()
        if side == "query":
            low_rank = low_rank * shifted.sign()
        scale = self.complement_scale
        if not scale:
            return low_rank
        rest = (rows - coordinates @ self.eigenvectors) * scale**0.5
        if projector is not None:
            rest = projector.project(rest)
        return torch.cat([low_rank, rest.to(low_rank.dtype)], dim=1)

    def representation_dim(self, projector: Any = None) -> int:
        if self.complement == "none":
            return self.rank
        return self.rank + (self.n_parameters if projector is None else int(projector.output_dim))

    def _state_tensors(self) -> dict[str, Tensor]:
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}

    def _load_tensors(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        if set(tensors) != {"eigenvalues", "eigenvectors"}:
            raise invalid("Arnoldi solver state", sorted(tensors), "'eigenvalues' and 'eigenvectors'")
        self.eigenvalues, self.eigenvectors = tensors["eigenvalues"], tensors["eigenvectors"]
        self.n_steps = int(info.get("n_steps", 0))

    def _state_extra(self) -> dict[str, Any]:
        return {"n_steps": self.n_steps}
