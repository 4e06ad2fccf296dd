"""Influence functions (Koh & Liang 2017): the predicted effect of removing one training example.

For a model trained to the minimum ``theta*`` of ``L(theta) = (1/n) sum_i l(z_i; theta) + R(theta)``,
removing ``z`` moves the minimum by ``(1/n) H^{-1} grad l(z)`` (implicit-function theorem), so the
query measurement ``f(x)`` changes by

    score(x, z) = s * (1/n) * grad f(x)^T (H + damping I)^{-1} grad l(z),

where ``H`` is the Hessian of ``L`` over the selected parameters and ``s = measurement_sign(task)``
orients the score so that positive means "removing ``z`` makes ``x`` worse" (a proponent).

The computation is query-side: the ``m`` query gradients are solved once, ``y = (H + damping I)^{-1}
s grad f(x)`` ``[m, P]``, then the training gradients are streamed (from the model or from a
:class:`~influence.gradients.cache.GradientCache`) and multiplied in blocks, so no ``[n, P]``
matrix is ever held.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from influence.batches import to_device
from influence.exceptions import invalid
from influence.fingerprints import model_fingerprint
from influence.gradients.cache import GradientCache
from influence.gradients.layout import select_parameters
from influence.gradients.objective import Objective
from influence.gradients.per_example import (
    as_loader,
    gradient_matrix,
    iter_gradients,
    measurement_sign,
    rows_per_chunk,
)
from influence.methods.common import build_solver, require_examples, stream_products
from influence.precision import check_gradient_dtype
from influence.regularizers import RegularizerLike
from influence.solvers import InverseHessianSolver
from influence.solvers.ekfac import EkfacSolver
from influence.task import Task
from influence.validation import check_batch_size


def fit_inverse_hessian(
    task: Task,
    model: nn.Module,
    data: Dataset | DataLoader,
    names: Sequence[str],
    *,
    solver: str | InverseHessianSolver,
    damping: float,
    solver_options: Mapping[str, Any] | None,
    regularizer: RegularizerLike | None,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype | None,
    argument: str = "solver",
) -> InverseHessianSolver:
    """A solver fitted to the training objective ``(1/n) sum l + R`` over ``names``.

    Args:
        task: gives the training loss.
        model: the trained model.
        data: the examples whose mean loss defines the Hessian.
        names: selected parameter names.
        solver: a solver name or instance (see :func:`influence.methods.common.build_solver`).
        damping: added to the Hessian's diagonal.
        solver_options: extra options of a named solver.
        regularizer: ``R(params) -> scalar`` that was part of the training objective.
        batch_size: examples per batch of the Hessian-vector products.
        device: device of the computation.
        dtype: floating dtype of the computation.
        argument: the solver argument's name in error messages.

    Returns:
        The fitted solver; ``solver.solve(rhs [m, P]) -> [m, P]``.
    """
    built = build_solver(solver, damping=damping, solver_options=solver_options, argument=argument)
    objective = Objective(
        task, model, data, list(names), batch_size=batch_size, device=device, dtype=dtype,
        regularizer=regularizer,
    )
    return built.fit(objective)


def _fitted(task: Task, model: nn.Module, data: Dataset | DataLoader, params: str | Sequence[str], **options: Any):
    """``(names, fitted solver)`` of :func:`fit_inverse_hessian` over the parameters ``params`` selects."""
    names = select_parameters(model, params)
    return names, fit_inverse_hessian(task, model, data, names, **options)


def training_gradient_blocks(
    task: Task,
    model: nn.Module,
    train_data: Dataset | DataLoader | None,
    names: Sequence[str],
    *,
    train_gradients: GradientCache | None,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype | None,
    gradient_dtype: torch.dtype | None = None,
):
    """Per-example training-loss gradients ``[b, P]`` in training order, from a cache or computed.

    Args:
        task: the task.
        model: the model.
        train_data: the training set (used when ``train_gradients`` is ``None``).
        names: selected parameter names.
        train_gradients: a built, unprojected cache of ``kind="train_loss"`` gradients over
            exactly ``names`` of this model's state, or ``None``.
        batch_size: examples per batch.
        device: device of the computation.
        dtype: floating dtype of the computation.
        gradient_dtype: half dtype the computed gradients are rounded to (not used with a cache,
            whose blocks come in its storage dtype).

    Returns:
        An iterator of ``[b, P]`` blocks.
    """
    if train_gradients is None:
        return iter_gradients(
            task, model, train_data, list(names), kind="train_loss", batch_size=batch_size,
            device=device, dtype=dtype, gradient_dtype=gradient_dtype,
        )
    manifest = train_gradients.manifest
    arguments = manifest.get("arguments", {})
    if manifest.get("projection") is not None:
        raise invalid("train_gradients", str(train_gradients.directory), "an unprojected gradient cache")
    if arguments.get("kind") != "train_loss":
        raise invalid("train_gradients kind", arguments.get("kind"), "'train_loss'")
    if list(arguments.get("names", [])) != list(names):
        raise invalid(
            "train_gradients names", arguments.get("names"), f"the attributed parameters {list(names)}"
        )
    if not manifest.get("complete", False):
        raise invalid("train_gradients", str(train_gradients.directory), "a completely built cache")
    if manifest.get("model_fingerprint") != model_fingerprint(model):
        raise invalid(
            "train_gradients", str(train_gradients.directory), "a cache built from this model's state"
        )
    return train_gradients.iter_shards()


def influence_scores(
    task: Task,
    model: nn.Module,
    train_data: Dataset | DataLoader,
    query_data: Dataset | DataLoader | None,
    *,
    params: str | Sequence[str] = "all",
    solver: str | InverseHessianSolver = "cg",
    damping: float = 1e-3,
    solver_options: Mapping[str, Any] | None = None,
    regularizer: RegularizerLike | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    train_gradients: GradientCache | None = None,
    hessian_data: Dataset | DataLoader | None = None,
    gradient_dtype: torch.dtype | None = None,
) -> Tensor:
    """Influence-function scores of every (query, training example) pair, or each example's self-influence.

    Args:
        task: gives the per-example training loss and the query measurement.
        model: the trained model (not modified); use ``eval()`` mode.
        train_data: the ``n`` training examples (map-style dataset or unshuffled loader).
        query_data: the ``m`` query examples; ``None`` for self-influence.
        params: the parameters differentiated: ``"all"``, ``"last"``, ``"embedding"`` or names.
        solver: ``"exact"``, ``"cg"`` (or another name of ``influence.solvers.SOLVERS``) or a
            solver instance, which then carries its own damping and options.
        damping: ``lambda >= 0``; the Hessian is ``H + lambda I``.
        solver_options: extra options of a named solver (``max_iterations``, ``rtol``,
            ``gauss_newton``, ...).
        regularizer: ``R(params) -> scalar`` that was part of the training objective (e.g. the l2
            penalty), so that ``H`` is the Hessian of the objective actually minimised.
        batch_size: examples per batch.
        device: device of the computation.
        dtype: floating dtype of the computation (default: the model's).
        train_gradients: a built :class:`~influence.gradients.cache.GradientCache` of the
            unprojected training-loss gradients over the same parameters, read instead of
            recomputing them.
        hessian_data: examples whose mean loss defines ``H`` (default: ``train_data``), e.g. a
            subsample for speed. The ``1/n`` factor always uses the training set's size.
        gradient_dtype: ``torch.bfloat16`` or ``torch.float16``: the training gradients and the solved
            query vectors are rounded to it and multiplied in it with float32 accumulation
            (:mod:`influence.precision`); the fit and the solve stay in ``dtype``. Not used for
            self-influence, whose every gradient is solved.

    Returns:
        Tensor ``[m, n]`` on ``device`` (float32 with ``gradient_dtype``): ``s * (1/n) * grad f(x)^T (H + lambda I)^{-1} grad l(z)``;
        positive means removing ``z`` makes query ``x`` worse. For ``query_data=None``, ``[n]``:
        ``(1/n) grad l(z)^T (H + lambda I)^{-1} grad l(z)``, the predicted rise of ``z``'s own
        training loss when ``z`` is removed (large for atypical or mislabelled examples).
    """
    gradient_dtype = check_gradient_dtype(gradient_dtype)
    names, fitted = _fitted(task, model, train_data if hessian_data is None else hessian_data, params, solver=solver,
                            damping=damping, solver_options=solver_options, regularizer=regularizer,
                            batch_size=check_batch_size(batch_size), device=device, dtype=dtype)
    if query_data is None:
        return _self_scores(fitted, task, model, train_data, names, batch_size=batch_size, device=device, dtype=dtype)
    if train_gradients is None and isinstance(fitted, EkfacSolver) and fitted.rotates_gradients:
        raw = require_examples(_eigenbasis_products(fitted, train_data, query_data, batch_size, gradient_dtype))
        return raw * (measurement_sign(task) / raw.shape[1])
    queries = gradient_matrix(
        task, model, query_data, names, kind="measurement", batch_size=batch_size, device=device,
        dtype=dtype,
    )
    left = fitted.solve(queries) if queries.shape[0] else queries.to(fitted.objective.dtype)
    blocks = training_gradient_blocks(
        task, model, train_data, names, train_gradients=train_gradients, batch_size=batch_size,
        device=device, dtype=dtype, gradient_dtype=gradient_dtype,
    )
    raw = require_examples(stream_products(left, blocks, dtype=gradient_dtype))
    return raw * (measurement_sign(task) / raw.shape[1])


def _eigenbasis_products(fitted: EkfacSolver, train_data: Any, query_data: Any, batch_size: int,
                         gradient_dtype: torch.dtype | None) -> Tensor:
    """``q^T (C + damping I)^{-1} g`` ``[m, n]`` computed in EK-FAC's eigenbasis (both sides rotated from the
    layers' inputs and output gradients, :meth:`EkfacSolver.rotated_gradients`): no parameter-basis gradient,
    no rotation of a dense matrix."""
    objective = fitted.objective
    # rows of 256 MiB per block of training rows (only the rows are that large: the rotated vectors are
    # [b, out + width] per layer), at least the caller's batch
    itemsize = (gradient_dtype or objective.dtype).itemsize
    rows = max(batch_size, rows_per_chunk(objective.n_parameters, itemsize, 256 * 2**20))

    def rotated(data: Any, kind: str, size: int, dtype: torch.dtype | None):
        for batch in as_loader(data, size):
            yield fitted.rotated_gradients(to_device(batch, objective.device, objective.dtype), kind, dtype)

    left = list(rotated(query_data, "measurement", batch_size, None))
    scale = fitted.inverse_eigenvalues()
    left = torch.cat(left) * scale if left else scale.new_zeros(0, scale.shape[0])
    return stream_products(left, rotated(train_data, "train_loss", rows, gradient_dtype), dtype=gradient_dtype)


def _self_scores(fitted: InverseHessianSolver, task: Task, model: nn.Module, train_data: Any, names: list[str],
                 **options: Any) -> Tensor:
    parts = []
    for block in iter_gradients(task, model, train_data, names, kind="train_loss", **options):
        block = block.to(fitted.objective.dtype)
        parts.append((fitted.solve(block) * block).sum(dim=1))
    values = require_examples(torch.cat(parts) if parts else torch.zeros(0))
    return values / values.shape[0]


def influence_self_scores(task: Task, model: nn.Module, train_data: Dataset | DataLoader, **options: Any) -> Tensor:
    """Self-influence ``(1/n) grad l(z)^T (H + lambda I)^{-1} grad l(z)`` of every training example: ``[n]``.

    Keyword arguments are those of :func:`influence_scores` (which this calls with ``query_data=None``).
    """
    return influence_scores(task, model, train_data, None, **options)


__all__ = ["fit_inverse_hessian", "influence_scores", "influence_self_scores", "training_gradient_blocks"]
