"""LiSSA: a truncated Neumann series for ``(H + damping I)^{-1} b`` (Agarwal et al., 2017).

With ``A = H + damping I`` and a scale ``s`` larger than ``A``'s largest eigenvalue, the recursion

    x_0 = b,    x_t = b + (I - A / s) x_{t-1}

converges to ``s A^{-1} b`` when every eigenvalue of ``A`` lies in ``(0, 2 s)``; the estimate is
``x_T / s`` after ``depth`` steps, averaged over ``repeats`` runs. Each step may use the Hessian of a
random subset of data batches (``batches_per_step``, the stochastic estimator of the paper) or of
the whole objective (the default, deterministic). Without a given ``scale``, :meth:`fit` estimates
the largest eigenvalue magnitude by power iteration and uses ``1.1`` times it.

Since every term of the series is at most ``||b||`` when it converges, an iterate with
``||x_t|| > 2 (t + 1) ||b||`` (or a non-finite one) means the series diverges, and
:class:`~influence.exceptions.SolverDivergedError` is raised with advice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from influence.exceptions import SolverDivergedError, invalid
from influence.progress import progress
from influence.solvers.base import InverseHessianSolver, row_norms
from influence.validation import check_positive_int


def largest_eigenvalue_magnitude(
    matvec: Any, n: int, *, iterations: int, generator: torch.Generator, dtype: torch.dtype, device: Any
) -> float:
    """Power-iteration estimate of ``max |eigenvalue|`` of a symmetric operator.

    Args:
        matvec: ``[1, n] -> [1, n]``.
        n: dimension.
        iterations: power-iteration steps.
        generator: source of the start vector.
        dtype: dtype of the vectors.
        device: device of the vectors.

    Returns:
        ``||A v||`` for the last unit iterate ``v``: a lower bound that increases towards the largest
        eigenvalue magnitude (0.0 for the zero operator).
    """
    v = torch.randn(1, n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    v = v / row_norms(v)[:, None]
    estimate = 0.0
    for _ in range(iterations):
        w = matvec(v)
        norm = float(row_norms(w)[0])
        if norm == 0.0 or not bool(torch.isfinite(w).all()):
            break
        estimate = norm
        v = w / norm
    return estimate


class LissaSolver(InverseHessianSolver):
    """Neumann-series (LiSSA) inverse-Hessian products.

    Args:
        damping: ``lambda >= 0`` added to the diagonal.
        gauss_newton: use the Gauss-Newton matrix instead of the Hessian.
        scale: ``s``, above the largest eigenvalue of ``H + damping I``; ``None`` estimates it.
        depth: series terms ``T``.
        repeats: independent runs averaged (useful with ``batches_per_step``).
        batches_per_step: data batches sampled per step (``None``: all, deterministic).
        seed: seed of the batch sampling and of the power iteration.
        power_iterations: power-iteration steps used when ``scale`` is ``None``.
        rtol: stop early when ``||x_t - x_{t-1}|| <= rtol ||x_t||`` for every system (``0``: never).

    Attributes:
        last_info: after :meth:`solve`: ``scale``, ``steps`` (per repeat), ``relative_change``.
    """

    name = "lissa"

    def __init__(
        self,
        damping: float = 0.0,
        gauss_newton: bool = False,
        *,
        scale: float | None = None,
        depth: int = 1000,
        repeats: int = 1,
        batches_per_step: int | None = None,
        seed: int = 0,
        power_iterations: int = 30,
        rtol: float = 0.0,
    ) -> None:
        super().__init__(damping=damping, gauss_newton=gauss_newton)
        if scale is not None and (not isinstance(scale, (int, float)) or not scale > 0):
            raise invalid("scale", scale, "a positive number or None (estimated)")
        self.scale = None if scale is None else float(scale)
        self.depth = check_positive_int("depth", depth)
        self.repeats = check_positive_int("repeats", repeats)
        self.batches_per_step = None if batches_per_step is None else check_positive_int(
            "batches_per_step", batches_per_step
        )
        self.seed = int(seed)
        self.power_iterations = check_positive_int("power_iterations", power_iterations)
        if not isinstance(rtol, (int, float)) or rtol < 0:
            raise invalid("rtol", rtol, "a non-negative number")
        self.rtol = float(rtol)
        self.fitted_scale: float | None = None

    @property
    def arguments(self) -> dict[str, Any]:
        return {
            **super().arguments, "scale": self.scale, "depth": self.depth, "repeats": self.repeats,
            "batches_per_step": self.batches_per_step, "seed": self.seed, "rtol": self.rtol,
        }

    def _fit(self, objective: Any) -> None:
        if self.scale is not None:
            self.fitted_scale = self.scale
            return
        generator = torch.Generator().manual_seed(self.seed)
        top = largest_eigenvalue_magnitude(
            self.matvec, int(objective.n_parameters), iterations=self.power_iterations,
            generator=generator, dtype=objective.dtype, device=objective.device,
        )
        self.fitted_scale = 1.1 * top if top > 0 else 1.0

    def _step_matvec(self, v: Tensor, generator: torch.Generator) -> Tensor:
        if self.batches_per_step is None:
            return self.matvec(v)
        n_batches = len(self.objective.batches)
        count = min(self.batches_per_step, n_batches)
        index = torch.randperm(n_batches, generator=generator)[:count].tolist()
        out = self.objective.matvec(v, self.gauss_newton, batch_indices=index)
        return out + self.damping * v if self.damping else out

    def _solve(self, rhs: Tensor) -> Tensor:
        s = float(self.fitted_scale)
        b_norm = row_norms(rhs)
        generator = torch.Generator().manual_seed(self.seed + 1)
        total = torch.zeros_like(rhs)
        steps, change = [], float("nan")
        for _ in range(self.repeats):
            x = rhs.clone()
            step = 0
            for step in progress(range(1, self.depth + 1), desc="LiSSA", unit="step", leave=False):
                new = rhs + x - self._step_matvec(x, generator) / s
                norms = row_norms(new)
                if not bool(torch.isfinite(new).all()) or bool((norms > 2 * (step + 1) * b_norm + 1e-300).any()):
                    raise SolverDivergedError(
                        f"LiSSA diverged after {step} steps (iterate norm {float(norms.max()):.3e} for "
                        f"right-hand sides of norm <= {float(b_norm.max()):.3e}): every eigenvalue of "
                        f"H + damping*I must lie in (0, 2*scale) with scale={s:g}. Raise scale above the "
                        "largest eigenvalue, raise damping above the most negative one, or use "
                        "gauss_newton=True with damping > 0"
                    )
                change = float((row_norms(new - x) / norms.clamp_min(1e-300)).max())
                x = new
                if self.rtol and change <= self.rtol:
                    break
            steps.append(step)
            total += x / s
        self.last_info = {"scale": s, "steps": steps, "relative_change": change}
        return total / self.repeats
