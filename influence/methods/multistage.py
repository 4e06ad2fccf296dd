"""Multi-stage influence (Chen et al. 2020): pretraining examples' effect on a finetuned model.

A model is pretrained (parameters ``theta_pt``, mean pretraining loss, Hessian ``H_pt``), its
word embedding ``W`` is carried into a second model that is finetuned (parameters ``Theta`` other
than ``W``), and a query ``x`` of the finetuned model is measured by ``f``. Removing pretraining
example ``z`` moves ``theta_pt`` by ``(1/n_pt) H_pt^{-1} grad l_pt(z)``; its ``W`` part changes the
finetuned optimum, and through it ``f``. With ``s = measurement_sign(finetune_task)`` the score is

- embedding ``"fixed"`` during finetuning (``Theta`` trained, ``W`` frozen):
  ``s * (grad_W f - H_{W Theta} H_{Theta Theta}^{-1} grad_Theta f)^T P_W H_pt^{-1} grad l_pt(z) / n_pt``;
- embedding ``"updated"`` with the proximity penalty ``(alpha/2)||W - W_pt||^2``:
  ``s * alpha * grad f^T K^{-1} [0; P_W H_pt^{-1} grad l_pt(z)] / n_pt``, ``K`` the Hessian of the
  whole finetuning objective (penalty included) over ``(Theta, W)``,

The finetuning regulariser is that of the objective actually minimised. In ``"updated"`` mode, a
:class:`~influence.regularizers.Regularizer` that already holds the proximity penalty over the
shared parameters (what :func:`influence.models.training.train` was given) is used as is, its
``alpha`` being the formula's; any other regulariser gets the penalty added. So the penalty is
counted once whichever way the caller describes the objective.

where the ``H`` blocks are those of the finetuning objective's Hessian. Both are computed from the
query side: a finetuning solve gives ``g_W`` ``[m, P_W]``, which is placed at the pretrained
model's embedding parameter and solved with ``H_pt``; the pretraining per-example gradients are
then streamed in blocks. The derivation is in ``docs/multistage.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from influence.exceptions import invalid
from influence.gradients.layout import ParameterLayout, select_parameters
from influence.gradients.objective import Objective
from influence.gradients.per_example import (
    gradient_matrix,
    iter_gradients,
    measurement_sign,
)
from influence.methods.common import require_examples, stream_products
from influence.methods.influence_function import fit_inverse_hessian
from influence.regularizers import Proximity, Regularizer, RegularizerLike, with_proximity
from influence.solvers import InverseHessianSolver
from influence.task import Task
from influence.validation import check_batch_size

EMBEDDING_MODES: tuple[str, ...] = ("fixed", "updated")
DEFAULT_SHARED: dict[str, str] = {"embedding.weight": "embedding.weight"}
DEFAULT_DAMPING = 1e-3
UPDATED_DAMPING_FRACTION = 0.1  # at most this fraction of alpha in "updated" mode (docs/multistage.md)


def finetune_damping(damping: float | None, embedding: str, alpha: float) -> float:
    """The damping of the finetuning solve: ``damping`` if given, else the default of the mode.

    ``"fixed"``: ``1e-3``. ``"updated"``: ``min(1e-3, alpha / 10)``. The score there is
    ``alpha (K + damping I)^{-1}``, and where the finetuning data put little curvature on a carried
    parameter (a word the finetuning set rarely uses) ``alpha`` is its only curvature: a damping above
    ``alpha`` shrinks those scores by ``alpha / (alpha + damping)`` (measured against two-stage
    retraining in ``docs/multistage.md``: least-squares slope 1.08 at ``damping = alpha / 10``,
    1.6 at ``alpha``, 57 at ``100 alpha``).

    Args:
        damping: the caller's damping (used as given), or ``None``.
        embedding: ``"fixed"`` or ``"updated"``.
        alpha: the proximity strength of ``"updated"`` mode.

    Returns:
        The damping.
    """
    if damping is not None:
        return damping
    if embedding == "updated" and alpha > 0:
        return min(DEFAULT_DAMPING, UPDATED_DAMPING_FRACTION * alpha)
    return DEFAULT_DAMPING


def _check_shared(
    shared: Mapping[str, str], finetuned: nn.Module, pretrained: nn.Module
) -> dict[str, str]:
    if not isinstance(shared, Mapping) or not shared:
        raise invalid("shared", shared, "a non-empty {finetuned name: pretrained name} mapping")
    ft_params, pt_params = dict(finetuned.named_parameters()), dict(pretrained.named_parameters())
    for ft_name, pt_name in shared.items():
        if ft_name not in ft_params:
            raise invalid(
                "shared finetuned name", ft_name,
                f"a parameter of the finetuned model among {sorted(ft_params)}",
            )
        if pt_name not in pt_params:
            raise invalid(
                "shared pretrained name", pt_name,
                f"a parameter of the pretrained model among {sorted(pt_params)}",
            )
        if ft_params[ft_name].shape != pt_params[pt_name].shape:
            raise invalid(
                f"shape of {ft_name!r}", tuple(ft_params[ft_name].shape),
                f"the shape of pretrained {pt_name!r}, {tuple(pt_params[pt_name].shape)}",
            )
    if len(set(shared.values())) != len(shared):
        raise invalid("shared", dict(shared), "distinct pretrained names")
    return dict(shared)


def _finetune_names(model: nn.Module, params: str | Sequence[str], shared: Sequence[str]) -> list[str]:
    if isinstance(params, str) and params == "all":
        names = [n for n, p in model.named_parameters() if p.requires_grad and n not in shared]
    else:
        names = select_parameters(model, params)
        overlap = sorted(set(names) & set(shared))
        if overlap:
            raise invalid("finetune_params", overlap, "parameters other than the shared ones")
    if not names:
        raise invalid("finetune_params", params, "at least one finetuned parameter besides the shared ones")
    return names


def proximity_regularizer(reference: Mapping[str, Tensor], alpha: float) -> Proximity:
    """``R(params) = (alpha/2) sum_name ||params[name] - reference[name]||^2``.

    Args:
        reference: ``{finetuned name: pretrained value}``, tensors of the parameters' shapes.
        alpha: the penalty's strength.

    Returns:
        A :class:`~influence.regularizers.Proximity` (a regulariser for
        :class:`~influence.gradients.objective.Objective`).
    """
    return Proximity(alpha, reference)


def finetune_objective_penalty(
    regularizer: RegularizerLike | None, reference: Mapping[str, Tensor], alpha: float
) -> tuple[RegularizerLike, float]:
    """The whole penalty of the "updated" finetuning objective and its proximity strength.

    A :class:`~influence.regularizers.Regularizer` whose proximity anchors exactly the shared
    parameters is returned as is, with its ``alpha`` (``alpha`` given here must then be 0 or equal);
    otherwise ``(alpha/2)||W - W_pt||^2`` is added to ``regularizer``.

    Returns:
        ``(penalty, alpha)``.
    """
    proximity = regularizer.proximity if isinstance(regularizer, Regularizer) else None
    if proximity is not None and set(proximity.reference) == set(reference):
        if alpha and alpha != proximity.alpha:
            raise invalid("alpha", alpha, f"0 or the alpha of finetune_regularizer's proximity penalty, {proximity.alpha}")
        return regularizer, proximity.alpha
    if proximity is not None:
        raise invalid("finetune_regularizer proximity names", sorted(proximity.reference),
                      f"the shared parameters {sorted(reference)}")
    if not alpha > 0:
        raise invalid("alpha", alpha, "a positive number when embedding='updated'")
    return with_proximity(regularizer, proximity_regularizer(reference, alpha)), float(alpha)


def finetune_embedding_gradient(
    finetune_task: Task,
    finetuned_model: nn.Module,
    finetune_data: Dataset | DataLoader,
    queries: Tensor,
    theta_names: Sequence[str],
    w_names: Sequence[str],
    *,
    embedding: str,
    alpha: float,
    reference: Mapping[str, Tensor],
    regularizer: RegularizerLike | None,
    fit: Mapping[str, Any],
) -> Tensor:
    """Total derivative of the query measurement with respect to the pretrained embedding.

    Args:
        finetune_task: the finetuning task.
        finetuned_model: the finetuned model.
        finetune_data: the finetuning examples.
        queries: ``[m, P_Theta + P_W]`` query measurement gradients over ``theta_names + w_names``.
        theta_names: the finetuning parameters other than the shared ones.
        w_names: the shared parameters, as named in the finetuned model.
        embedding: ``"fixed"`` or ``"updated"``.
        alpha: proximity strength (``"updated"`` only).
        reference: ``{w name: pretrained value}`` of the shared parameters.
        regularizer: the finetuning objective's penalty (see :func:`finetune_objective_penalty`).
        fit: the finetuning solve and computation: keyword arguments of
            :func:`~influence.methods.influence_function.fit_inverse_hessian` (``solver``,
            ``damping``, ``solver_options``, ``batch_size``, ``device``, ``dtype``).

    Returns:
        ``g_W`` ``[m, P_W]`` such that ``d f / d W_pt = g_W`` (before the sign ``s``).
    """
    theta_names, w_names = list(theta_names), list(w_names)
    layout = ParameterLayout.of(finetuned_model, theta_names + w_names)
    fit = {**fit, "argument": "finetune_solver"}
    if embedding == "fixed":
        inner = fit_inverse_hessian(finetune_task, finetuned_model, finetune_data, theta_names, regularizer=regularizer, **fit)
        u = inner.solve(layout.block(queries, theta_names).to(inner.objective.dtype))  # [m, P_Theta]
        full = Objective(
            finetune_task, finetuned_model, finetune_data, theta_names + w_names, regularizer=regularizer,
            batch_size=fit["batch_size"], device=fit["device"], dtype=fit["dtype"],
        )
        # The cross block is the true Hessian's whatever curvature the inner solve uses: the implicit-function
        # theorem differentiates the finetuning gradient, and the Gauss-Newton cross block drops the residual
        # term r * d2 out / dTheta dW, which is first order at a classifier's optimum (measured in
        # tests/test_multistage.py: Pearson with retraining 0.9985 with it, 0.46 without, 0.51 with no
        # Schur term at all). Only H_ThetaTheta may be Gauss-Newton (positive semi-definite).
        cross = full.hvp(layout.embed(u, theta_names))  # [m, P]
        return layout.block(queries, w_names).to(cross.dtype) - layout.block(cross, w_names)
    penalty, alpha = finetune_objective_penalty(regularizer, reference, alpha)
    whole = fit_inverse_hessian(finetune_task, finetuned_model, finetune_data, theta_names + w_names, regularizer=penalty, **fit)
    y = whole.solve(queries.to(whole.objective.dtype))  # [m, P]
    return alpha * layout.block(y, w_names)


def multistage_scores(
    pretrain_task: Task,
    pretrained_model: nn.Module,
    pretrain_data: Dataset | DataLoader,
    finetune_task: Task,
    finetuned_model: nn.Module,
    finetune_data: Dataset | DataLoader,
    query_data: Dataset | DataLoader,
    *,
    shared: Mapping[str, str] | None = None,
    embedding: Literal["fixed", "updated"],
    alpha: float = 0.0,
    finetune_params: str | Sequence[str] = "all",
    pretrain_params: str | Sequence[str] = "all",
    finetune_solver: str | InverseHessianSolver = "cg",
    pretrain_solver: str | InverseHessianSolver = "cg",
    damping: float | None = None,
    pretrain_damping: float | None = None,
    solver_options: Mapping[str, Any] | None = None,
    pretrain_solver_options: Mapping[str, Any] | None = None,
    pretrain_hessian_data: Dataset | DataLoader | None = None,
    finetune_regularizer: RegularizerLike | None = None,
    pretrain_regularizer: RegularizerLike | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Multi-stage influence of every pretraining example on every finetuning query.

    Args:
        pretrain_task: pretraining task (its ``train_loss`` defines ``H_pt`` and ``grad l_pt(z)``).
        pretrained_model: the pretrained model, at the pretraining optimum.
        pretrain_data: the ``n_pt`` pretraining examples.
        finetune_task: finetuning task (its ``measurement`` is ``f``; its ``train_loss`` defines the
            finetuning Hessian).
        finetuned_model: the finetuned model, at the finetuning optimum.
        finetune_data: the finetuning examples.
        query_data: the ``m`` queries (finetuning-style examples).
        shared: ``{finetuned parameter name: pretrained parameter name}`` of the carried
            parameters ``W`` (default ``{"embedding.weight": "embedding.weight"}``).
        embedding: ``"fixed"`` (``W`` frozen while finetuning) or ``"updated"`` (``W`` trained
            with the penalty ``(alpha/2)||W - W_pt||^2``).
        alpha: the penalty's strength; must be positive for ``"updated"``, unused for ``"fixed"``.
        finetune_params: ``Theta``: ``"all"`` (every trainable finetuned parameter except the shared
            ones) or names.
        pretrain_params: the pretraining parameters of ``H_pt``: ``"all"`` or names; they must
            include the shared ones.
        finetune_solver: solver name or instance for the finetuning Hessian.
        pretrain_solver: solver name or instance for ``H_pt``.
        damping: damping of the finetuning Hessian (default: :func:`finetune_damping`, ``1e-3``, and
            at most ``alpha / 10`` in ``"updated"`` mode).
        pretrain_damping: damping of ``H_pt`` (default: ``damping`` if given, else ``1e-3``).
        solver_options: extra options of a named finetuning solver (``max_iterations``, ``rtol``, ...).
        pretrain_solver_options: extra options of a named pretraining solver (default:
            ``solver_options``).
        pretrain_hessian_data: examples whose mean loss defines ``H_pt`` (default:
            ``pretrain_data``); the factor ``1/n_pt`` always uses ``pretrain_data``'s size.
        finetune_regularizer: ``R(params) -> scalar`` that was part of the finetuning objective
            besides the proximity penalty (e.g. l2 on the head).
        pretrain_regularizer: ``R(params) -> scalar`` that was part of the pretraining objective.
        batch_size: examples per batch.
        device: device of the computation.
        dtype: floating dtype of the computation (default: the models').

    Returns:
        Tensor ``[m, n_pt]`` on ``device``; positive means removing the pretraining example makes
        the query worse.
    """
    if embedding not in EMBEDDING_MODES:
        raise invalid("embedding", embedding, "'fixed' or 'updated'")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise invalid("alpha", alpha, "a number >= 0 (positive when embedding='updated', unless finetune_regularizer holds the proximity penalty)")
    batch_size = check_batch_size(batch_size)
    shared = _check_shared(DEFAULT_SHARED if shared is None else shared, finetuned_model, pretrained_model)
    w_names = list(shared)
    theta_names = _finetune_names(finetuned_model, finetune_params, w_names)
    pt_names = select_parameters(pretrained_model, pretrain_params)
    missing = [n for n in shared.values() if n not in pt_names]
    if missing:
        raise invalid(
            "pretrain_params", pretrain_params, f"a selection that includes the shared parameters {missing}"
        )
    pt_damping = pretrain_damping if pretrain_damping is not None else (DEFAULT_DAMPING if damping is None else damping)
    sensitivity = embedding_sensitivity(
        pretrained_model, finetune_task, finetuned_model, finetune_data, query_data, shared=shared,
        embedding=embedding, alpha=float(alpha), theta_names=theta_names, finetune_solver=finetune_solver,
        damping=damping, solver_options=solver_options, finetune_regularizer=finetune_regularizer,
        batch_size=batch_size, device=device, dtype=dtype,
    )
    return pretraining_scores(
        pretrain_task, pretrained_model, pretrain_data, sensitivity, shared_names=[shared[n] for n in w_names],
        pretrain_names=pt_names, pretrain_solver=pretrain_solver, pretrain_damping=pt_damping,
        pretrain_solver_options=solver_options if pretrain_solver_options is None else pretrain_solver_options,
        pretrain_hessian_data=pretrain_hessian_data, pretrain_regularizer=pretrain_regularizer,
        batch_size=batch_size, device=device, dtype=dtype,
    )


def embedding_sensitivity(
    pretrained_model: nn.Module,
    finetune_task: Task,
    finetuned_model: nn.Module,
    finetune_data: Dataset | DataLoader,
    query_data: Dataset | DataLoader,
    *,
    shared: Mapping[str, str],
    embedding: Literal["fixed", "updated"],
    alpha: float,
    theta_names: Sequence[str] | None = None,
    finetune_solver: str | InverseHessianSolver,
    damping: float | None,
    solver_options: Mapping[str, Any] | None,
    finetune_regularizer: RegularizerLike | None,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> Tensor:
    """The finetuning half of multi-stage influence: ``s * d f / d W_pt`` for every query.

    Sensitivities of several finetuned models (for example both embedding modes) can be stacked
    and passed to one :func:`pretraining_scores` call, which then fits the pretraining Hessian
    and streams the pretraining gradients once for all of them.

    Args:
        pretrained_model: the pretrained model (gives ``W_pt``).
        finetune_task, finetuned_model, finetune_data, query_data: as in :func:`multistage_scores`.
        shared: ``{finetuned name: pretrained name}`` of the carried parameters ``W``.
        embedding: ``"fixed"`` or ``"updated"``.
        alpha: proximity strength (``"updated"``).
        theta_names: the finetuning parameters other than ``W`` (default: every trainable parameter
            of the finetuned model but the shared ones).
        finetune_solver, damping, solver_options, finetune_regularizer: the finetuning solve
            (``damping=None``: :func:`finetune_damping`; in ``"updated"`` mode with ``alpha=0`` the
            alpha of ``finetune_regularizer``'s proximity penalty).
        batch_size, device, dtype: computation options.

    Returns:
        ``[m, P_W]``: the measurement-sign-oriented total derivative of each query's measurement
        with respect to the pretrained values of ``W`` (in the order of ``shared``).
    """
    w_names = list(shared)
    theta_names = _finetune_names(finetuned_model, "all" if theta_names is None else list(theta_names), w_names)
    queries = gradient_matrix(
        finetune_task, finetuned_model, query_data, theta_names + w_names, kind="measurement",
        batch_size=batch_size, device=device, dtype=dtype,
    )  # [m, P_Theta + P_W]
    pt_params = dict(pretrained_model.named_parameters())
    reference = {
        ft: pt_params[pt].detach().to(device=device, dtype=queries.dtype) for ft, pt in shared.items()
    }
    if embedding == "updated":
        _, alpha = finetune_objective_penalty(finetune_regularizer, reference, float(alpha))
    g_w = finetune_embedding_gradient(
        finetune_task, finetuned_model, finetune_data, queries, theta_names, w_names,
        embedding=embedding, alpha=float(alpha), reference=reference, regularizer=finetune_regularizer,
        fit={"solver": finetune_solver, "damping": finetune_damping(damping, embedding, float(alpha)),
             "solver_options": solver_options,
             "batch_size": batch_size, "device": device, "dtype": dtype},
    )  # [m, P_W]
    return g_w * measurement_sign(finetune_task)


def pretraining_scores(
    pretrain_task: Task,
    pretrained_model: nn.Module,
    pretrain_data: Dataset | DataLoader,
    sensitivity: Tensor,
    *,
    shared_names: Sequence[str],
    pretrain_names: str | Sequence[str] = "all",
    pretrain_solver: str | InverseHessianSolver = "cg",
    pretrain_damping: float = 1e-3,
    pretrain_solver_options: Mapping[str, Any] | None = None,
    pretrain_hessian_data: Dataset | DataLoader | None = None,
    pretrain_regularizer: RegularizerLike | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The pretraining half of multi-stage influence: ``v^T P_W H_pt^{-1} grad l_pt(z) / n_pt``.

    Args:
        pretrain_task: the pretraining task.
        pretrained_model: the pretrained model.
        pretrain_data: the ``n_pt`` pretraining examples scored.
        sensitivity: ``[m, P_W]`` from :func:`embedding_sensitivity` (stacked for several models).
        shared_names: the pretrained names of ``W``, in the order of ``sensitivity``'s columns.
        pretrain_names: parameters of ``H_pt`` (``"all"`` or names); must include ``shared_names``.
        pretrain_solver, pretrain_damping, pretrain_solver_options: the pretraining solve.
        pretrain_hessian_data: examples whose mean loss defines ``H_pt`` (default ``pretrain_data``).
        pretrain_regularizer: penalty that was part of the pretraining objective.
        batch_size, device, dtype: computation options.

    Returns:
        ``[m, n_pt]`` scores, positive = proponent.
    """
    pt_names = select_parameters(pretrained_model, pretrain_names)
    missing = [n for n in shared_names if n not in pt_names]
    if missing:
        raise invalid("pretrain_params", pretrain_names, f"a selection that includes the shared parameters {missing}")
    pt_layout = ParameterLayout.of(pretrained_model, pt_names)
    rhs = pt_layout.embed(sensitivity, list(shared_names))  # [m, P_pt]
    fitted = fit_inverse_hessian(
        pretrain_task, pretrained_model, pretrain_data if pretrain_hessian_data is None else pretrain_hessian_data,
        pt_names, solver=pretrain_solver, damping=pretrain_damping, solver_options=pretrain_solver_options,
        regularizer=pretrain_regularizer, batch_size=batch_size, device=device, dtype=dtype, argument="pretrain_solver",
    )
    left = fitted.solve(rhs.to(fitted.objective.dtype))  # [m, P_pt]
    raw = require_examples(stream_products(left, iter_gradients(
        pretrain_task, pretrained_model, pretrain_data, pt_names, kind="train_loss",
        batch_size=batch_size, device=device, dtype=dtype,
    )), "pretrain_data", "at least one pretraining example")
    return raw / raw.shape[1]


__all__ = [
    "EMBEDDING_MODES", "embedding_sensitivity", "finetune_damping", "finetune_embedding_gradient", "finetune_objective_penalty",
    "multistage_scores", "pretraining_scores", "proximity_regularizer",
]
