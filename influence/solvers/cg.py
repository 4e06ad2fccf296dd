"""Batched conjugate gradient for ``(H + damping I) x = b``.

Each of the ``m`` right-hand sides runs its own conjugate-gradient recursion (its own step
``alpha`` and ``beta``), while the Hessian-vector products of all unfinished systems are computed
together in one vectorised call. A system stops when its relative residual
``||b - A x|| / ||b||`` falls below ``rtol``. Conjugate gradient requires a positive-definite
matrix: a search direction with non-positive curvature ``p^T A p <= 0`` raises
:class:`~influence.exceptions.SolverDivergedError` (raise ``damping`` or use ``gauss_newton=True``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from influence.exceptions import SolverDivergedError
from influence.progress import progress
from influence.solvers.base import InverseHessianSolver, row_norms
from influence.validation import check_positive_float, check_positive_int

logger = logging.getLogger(__name__)


class ConjugateGradientSolver(InverseHessianSolver):
    """Conjugate gradient with batched Hessian-vector products.

    Args:
        damping: ``lambda >= 0`` added to the diagonal.
        max_iterations: most iterations per right-hand side.
        rtol: target relative residual ``||b - A x|| / ||b||``.
        gauss_newton: use the Gauss-Newton matrix instead of the Hessian.

    Attributes:
        last_info: after :meth:`solve`: ``iterations`` (``[m]`` list), ``relative_residuals``
            (``[m]`` list), ``converged`` (``[m]`` list of bools), ``residual_history`` (per
            iteration, the ``[m]`` relative residuals).
    """

    name = "cg"

    def __init__(
        self,
        damping: float = 0.0,
        max_iterations: int = 100,
        rtol: float = 1e-6,
        gauss_newton: bool = False,
    ) -> None:
        super().__init__(damping=damping, gauss_newton=gauss_newton)
        self.max_iterations = check_positive_int("max_iterations", max_iterations)
        self.rtol = check_positive_float("rtol", rtol)

    @property
    def arguments(self) -> dict[str, Any]:
        return {**super().arguments, "max_iterations": self.max_iterations, "rtol": self.rtol}

    def _solve(self, rhs: Tensor) -> Tensor:
        m = rhs.shape[0]
        b_norm = row_norms(rhs)
        scale = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rs = (r * r).sum(dim=1)
        iterations = torch.zeros(m, dtype=torch.long)
        relative = (rs.sqrt() / scale).cpu()
        active = (relative > self.rtol) & (b_norm.cpu() > 0)
        history = [relative.tolist()]
        for _ in progress(range(self.max_iterations), desc="conjugate gradient", unit="it", leave=False):
            if not bool(active.any()):
                break
            idx = active.nonzero().squeeze(1).to(rhs.device)
            ap = self.matvec(p[idx])
            curvature = (p[idx] * ap).sum(dim=1)
            if not bool(torch.isfinite(ap).all()):
                raise SolverDivergedError(
                    "conjugate gradient produced non-finite Hessian-vector products; check the "
                    "model and data for NaN/inf, or raise damping"
                )
            bad = curvature <= 0
            if bool(bad.any()):
                raise SolverDivergedError(
                    f"conjugate gradient met non-positive curvature p^T (H + {self.damping:g} I) p = "
                    f"{float(curvature[bad].min()):.3e}: the Hessian is not positive definite. "
                    "Raise damping above the most negative eigenvalue, or use gauss_newton=True "
                    "(positive semi-definite) with damping > 0"
                )
            alpha = rs[idx] / curvature
            x[idx] += alpha[:, None] * p[idx]
            r_new = r[idx] - alpha[:, None] * ap
            rs_new = (r_new * r_new).sum(dim=1)
            beta = rs_new / rs[idx]
            r[idx] = r_new
            p[idx] = r_new + beta[:, None] * p[idx]
            rs[idx] = rs_new
            iterations[idx.cpu()] += 1
            relative = (rs.sqrt() / scale).cpu()
            active = active & (relative > self.rtol)
            history.append(relative.tolist())
        converged = ~active
        self.last_info = {
            "iterations": iterations.tolist(),
            "relative_residuals": relative.tolist(),
            "converged": converged.tolist(),
            "residual_history": history,
        }
        if not bool(converged.all()):
            logger.warning(
                "conjugate gradient stopped after %d iterations with relative residuals up to %.3e "
                "(rtol=%g) for %d of %d right-hand sides; raise max_iterations or damping",
                self.max_iterations, float(relative.max()), self.rtol,
                int((~converged).sum()), m,
            )
        return x
