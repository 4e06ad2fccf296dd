"""TracIn (Pruthi et al. 2020): influence traced through the checkpoints of training.

Gradient descent on ``z`` with learning rate ``lr_c`` at checkpoint ``c`` changes the query's
measurement by about ``-lr_c <g_c(z), g_c(x)>``; summing over checkpoints,

    score(x, z) = s * sum_c lr_c <grad l_c(z), grad f_c(x)>,

with ``s = measurement_sign(task)`` so that positive means a proponent (training on ``z`` helped
``x``, so removing it would make ``x`` worse). There is no ``1/n`` factor. Restricting the
gradients to the last layer (``params="last"``) gives the cheap "last-layer TracIn"; an optional
random projector (TRAK-style) compresses both sides identically.

Checkpoints are ``(state dict or safetensors path, learning rate)`` pairs; each is loaded into a
deep copy of the model, so the model itself is never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from influence.gradients.layout import select_parameters
from influence.gradients.per_example import gradient_matrix, iter_gradients, measurement_sign
from influence.methods.common import (
    Checkpoint,
    model_at,
    require_examples,
    stream_products,
    sum_over_checkpoints,
)
from influence.precision import check_gradient_dtype, is_half
from influence.task import Task
from influence.validation import check_batch_size


def tracin_scores(
    task: Task,
    model: nn.Module,
    train_data: Dataset | DataLoader,
    query_data: Dataset | DataLoader | None,
    *,
    checkpoints: Sequence[Checkpoint],
    params: str | Sequence[str] = "all",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    projector: Any = None,
    gradient_dtype: torch.dtype | None = None,
) -> Tensor:
    """TracIn scores of every (query, training example) pair, or each training example's self-influence.

    Args:
        task: gives the per-example training loss and the query measurement.
        model: a model of the trained architecture; each checkpoint is loaded into a copy of it.
        train_data: the ``n`` training examples (map-style dataset or unshuffled loader).
        query_data: the ``m`` query examples; ``None`` for self-influence.
        checkpoints: ``[(state dict or safetensors path, learning rate), ...]`` (or objects with
            ``.path`` and ``.learning_rate``), the learning rate being that of the steps the
            checkpoint stands for.
        params: the parameters differentiated: ``"all"``, ``"last"`` (last-layer TracIn),
            ``"embedding"`` or names.
        batch_size: examples per batch.
        device: device of the computation.
        dtype: floating dtype of the computation (default: the model's).
        projector: optional object with ``project(g [b, P]) -> [b, k]`` applied to both sides.
        gradient_dtype: ``torch.bfloat16`` or ``torch.float16``: both sides' gradients are rounded to
            it and multiplied in it with float32 accumulation (:mod:`influence.precision`).

    Returns:
        Tensor ``[m, n]`` on ``device``: ``s * sum_c lr_c <g_c(z), g_c(x)>``; for ``query_data=None``,
        ``[n]``: ``sum_c lr_c ||g_c(z)||^2`` (no sign).
    """
    names = select_parameters(model, params)
    options = {"batch_size": check_batch_size(batch_size), "device": device, "dtype": dtype, "projector": projector,
               "gradient_dtype": check_gradient_dtype(gradient_dtype)}

    def at_checkpoint(current: nn.Module) -> Tensor:
        blocks = iter_gradients(task, current, train_data, names, kind="train_loss", **options)
        if query_data is None:
            norms = [(g.float() if is_half(g.dtype) else g).pow(2).sum(dim=1) for g in blocks]
            return require_examples(torch.cat(norms) if norms else torch.zeros(0))
        queries = gradient_matrix(task, current, query_data, names, kind="measurement", **options)
        return stream_products(queries, blocks, dtype=gradient_dtype)

    total = sum_over_checkpoints(checkpoints, lambda state: model_at(model, state, names), at_checkpoint)
    return total if query_data is None else require_examples(total) * measurement_sign(task)


def tracin_self_scores(task: Task, model: nn.Module, train_data: Dataset | DataLoader, **options: Any) -> Tensor:
    """TracIn self-influence ``sum_c lr_c ||grad l_c(z)||^2`` of every training example: ``[n]``.

    Keyword arguments are those of :func:`tracin_scores` (which this calls with ``query_data=None``).
    """
    return tracin_scores(task, model, train_data, None, **options)


__all__ = ["tracin_scores", "tracin_self_scores"]
