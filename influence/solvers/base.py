"""The interface every inverse-Hessian solver implements.

A solver is fitted once to an :class:`~influence.gradients.objective.Objective` (which gives
Hessian or Gauss-Newton products of the training objective over the selected parameters) and then
solves ``(H + damping * I) x = rhs`` for any number of right-hand sides ``rhs`` ``[m, P]``.
Solvers are interchangeable: the influence-function method only calls :meth:`fit` and
:meth:`solve`.

Solvers whose fitted state is a few tensors (exact, Arnoldi, EK-FAC) can save it
(:meth:`InverseHessianSolver.state_dict`, :meth:`~InverseHessianSolver.state_info`) and solve again
after :meth:`~InverseHessianSolver.load_state` without their objective; the attribution index
(:mod:`influence.index`) relies on it. :meth:`~InverseHessianSolver.representation` turns
gradients into rows whose inner products are the solver's bilinear form ``q (H + damping I)^{-1} g``.
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
        keeps_state: whether a fitted solver holds a state that preconditions every example once (Arnoldi's
            eigenpairs, EK-FAC's factors, a Cholesky factor), so an attribution index can store preconditioned
            rows (:class:`influence.index.AttributionIndex`); an iterative solver (CG, LiSSA) solves per query.
        objective: the fitted objective (``None`` before :meth:`fit`).
        last_info: diagnostics of the last :meth:`solve` (iterations, residuals, ...).
    """

    name: str = ""
    keeps_state: bool = False

    def __init__(self, damping: float = 0.0, gauss_newton: bool = False) -> None:
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0.0:
            raise invalid("damping", damping, "a non-negative number")
        if not isinstance(gauss_newton, bool):
            raise invalid("gauss_newton", gauss_newton, "True or False")
        self.damping = float(damping)
        self.gauss_newton = gauss_newton
        self.objective: Any = None
        self.last_info: dict[str, Any] = {}
        self._fitted: dict[str, Any] | None = None  # n_parameters, dtype, device once fitted or loaded

    @property
    def arguments(self) -> dict[str, Any]:
        """The options that define this solver's result (saved beside artifacts, checked on reuse)."""
        return {"solver": self.name, "damping": self.damping, "gauss_newton": self.gauss_newton}

    @property
    def n_parameters(self) -> int:
        """``P`` of the fitted objective."""
        self._check_fitted()
        return int(self._fitted["n_parameters"])

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the solves (the objective's)."""
        self._check_fitted()
        return self._fitted["dtype"]

    @property
    def device(self) -> torch.device:
        """Device of the solves (the objective's)."""
        self._check_fitted()
        return self._fitted["device"]

    def fit(self, objective: Any) -> "InverseHessianSolver":
        """Prepare the solver for ``objective`` (dense factorisation, eigenbasis, ...).

        Args:
            objective: an :class:`~influence.gradients.objective.Objective`.

        Returns:
            ``self``.
        """
        self.objective = objective
        self._fitted = {
            "n_parameters": int(objective.n_parameters), "dtype": objective.dtype, "device": torch.device(objective.device),
        }
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
        matrix = self._check_rows("rhs", rhs)
        single = rhs.dim() == 1
        if matrix.shape[0] == 0:
            out = matrix.clone()
        else:
            out = self._solve(matrix)
        return out[0] if single else out

    @abc.abstractmethod
    def _solve(self, rhs: Tensor) -> Tensor:
        """Solve for ``rhs`` ``[m, P]`` (``m >= 1``), returning ``[m, P]``."""

    def _check_fitted(self) -> None:
        if self._fitted is None:
            raise InvalidArgumentError(
                f"{type(self).__name__} is not fitted; call .fit(objective) (or .load_state(...)) before .solve(rhs)"
            )

    def _check_rows(self, argument: str, g: Any) -> Tensor:
        """``g`` ``[P]`` or ``[b, P]`` as ``[b, P]`` in the solver's dtype and on its device."""
        self._check_fitted()
        p = self.n_parameters
        if not isinstance(g, Tensor) or g.dim() not in (1, 2) or g.shape[-1] != p:
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise invalid(argument, shape, f"a tensor [P] or [m, P] with P = {p}")
        g = g[None] if g.dim() == 1 else g
        return g.to(device=self.device, dtype=self.dtype)

    # -- representations for an index ------------------------------------------------------------

    def representation(self, g: Tensor, side: str, projector: Any = None) -> Tensor:
        """Rows whose inner products give the solver's scores.

        ``representation(q, "query") @ representation(g, "train").T`` equals
        ``q (H + damping I)^{-1} g^T`` (up to the projector's Johnson-Lindenstrauss error). The
        default keeps queries as they are and solves the training side; Arnoldi overrides it with
        its ``k`` whitened eigen-coordinates on both sides.

        Args:
            g: gradients ``[b, P]`` (or ``[P]``).
            side: ``"query"`` or ``"train"``.
            projector: optional :class:`~influence.gradients.projection.RandomProjector` ``P -> d``
                applied to the ``P``-dimensional part (the same one on both sides).

        Returns:
            ``[b, D]`` with ``D = representation_dim(projector)``.
        """
        if side not in ("query", "train"):
            raise invalid("side", side, "'query' or 'train'")
        rows = self._check_rows("g", g)
        x = self.solve(rows) if side == "train" else rows
        return x if projector is None else projector.project(x)

    def representation_dim(self, projector: Any = None) -> int:
        """``D``, the width of :meth:`representation`'s rows."""
        return self.n_parameters if projector is None else int(projector.output_dim)

    # -- saving the fitted state ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """The fitted state as named tensors (CPU, contiguous), for :meth:`load_state`.

        Raises:
            InvalidArgumentError: the solver is not fitted, or needs its objective at every solve
                (conjugate gradient, LiSSA) and so has no state that could be saved.
        """
        self._check_fitted()
        return {k: v.detach().to("cpu").contiguous() for k, v in self._state_tensors().items()}

    def state_info(self) -> dict[str, Any]:
        """JSON-serialisable facts that go with :meth:`state_dict` (``P``, dtype, layout, ...)."""
        self._check_fitted()
        return {"n_parameters": self.n_parameters, "dtype": str(self.dtype).removeprefix("torch."), **self._state_extra()}

    def load_state(self, tensors: dict[str, Tensor], info: dict[str, Any], *, device: torch.device | str = "cpu") -> "InverseHessianSolver":
        """Restore a fitted state saved by :meth:`state_dict` and :meth:`state_info`; then :meth:`solve`
        and :meth:`representation` work without an objective.

        Args:
            tensors: what :meth:`state_dict` returned.
            info: what :meth:`state_info` returned.
            device: device of the solves.

        Returns:
            ``self``.
        """
        dtype = getattr(torch, str(info.get("dtype")), None)
        if not isinstance(dtype, torch.dtype) or not isinstance(info.get("n_parameters"), int):
            raise invalid("solver state info", info, "the dict that state_info() returned")
        self._fitted = {"n_parameters": info["n_parameters"], "dtype": dtype, "device": torch.device(device)}
        moved = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
        self._load_tensors(moved, info)
        return self

    def _state_tensors(self) -> dict[str, Tensor]:
        raise InvalidArgumentError(
            f"the {self.name!r} solver needs its objective (model and data) at every solve, so it has no "
            "state to save; use 'exact', 'arnoldi' or 'ekfac' (or precondition nothing: solver=None)"
        )

    def _state_extra(self) -> dict[str, Any]:
        return {}

    def _load_tensors(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self._state_tensors()  # raises for solvers without a saved state


def row_norms(x: Tensor) -> Tensor:
    """Euclidean norm of each row of ``x`` ``[m, P]`` -> ``[m]``."""
    return torch.linalg.vector_norm(x, dim=1)
