"""Gradient-similarity baselines: dot product and cosine of query and training gradients.

At the final model, with ``s = measurement_sign(task)``:

- ``grad_dot``: ``s * <grad l(z), grad f(x)>`` (TracIn with one checkpoint and learning rate 1,
  or an influence function with ``H = I``, without ``1/n``);
- ``grad_cos``: ``s * cos(grad l(z), grad f(x))``, in ``[-1, 1]`` (Barshan et al. 2020 argue
  that normalising removes the dominance of high-loss, outlying training examples).

Positive still means a proponent. A zero gradient gives a cosine of 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from influence.exceptions import invalid
from influence.gradients.layout import select_parameters
from influence.gradients.per_example import gradient_matrix, iter_gradients, measurement_sign
from influence.methods.common import require_examples, stream_products
from influence.precision import check_gradient_dtype, is_half
from influence.task import Task
from influence.validation import check_batch_size

SIMILARITIES: tuple[str, ...] = ("dot", "cos")


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for a half dtype, else ``dtype``."""
    return torch.float32 if is_half(dtype) else dtype


def _unit(g: Tensor) -> Tensor:
    norms = torch.linalg.vector_norm(g, dim=1, keepdim=True)
    return g / torch.where(norms > 0, norms, torch.ones_like(norms))


def similarity_scores(
    task: Task,
    model: nn.Module,
    train_data: Dataset | DataLoader,
    query_data: Dataset | DataLoader | None,
    *,
    similarity: Literal["dot", "cos"] = "dot",
    params: str | Sequence[str] = "all",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    projector: Any = None,
    gradient_dtype: torch.dtype | None = None,
) -> Tensor:
    """Gradient dot products or cosines of every (query, training example) pair, or of each example with itself.

    Args:
        task: gives the per-example training loss and the query measurement.
        model: the trained model (not modified).
        train_data: the ``n`` training examples.
        query_data: the ``m`` queries; ``None`` for self-similarity.
        similarity: ``"dot"`` or ``"cos"``.
        params: the parameters differentiated: ``"all"``, ``"last"``, ``"embedding"`` or names.
        batch_size: examples per batch.
        device: device of the computation.
        dtype: floating dtype of the computation.
        projector: optional object with ``project(g [b, P]) -> [b, k]`` applied to both sides.
        gradient_dtype: ``torch.bfloat16`` or ``torch.float16``: both sides' gradients are rounded to
            it and multiplied in it with float32 accumulation (:mod:`influence.precision`).

    Returns:
        Tensor ``[m, n]`` on ``device``; for ``query_data=None``, ``[n]``: ``||grad l(z)||^2`` (dot) or
        1 (cos; 0 for a zero gradient).
    """
    if similarity not in SIMILARITIES:
        raise invalid("similarity", similarity, "'dot' or 'cos'")
    names = select_parameters(model, params)
    options = {"batch_size": check_batch_size(batch_size), "device": device, "dtype": dtype, "projector": projector,
               "gradient_dtype": check_gradient_dtype(gradient_dtype)}
    blocks = iter_gradients(task, model, train_data, names, kind="train_loss", **options)
    if similarity == "cos":  # normalised in float32 at least, rounded back for the products
        blocks = (_unit(block.to(_wide(block.dtype))).to(block.dtype) for block in blocks)
    if query_data is None:
        parts = [(block.to(_wide(block.dtype)) ** 2).sum(dim=1) for block in blocks]
        return require_examples(torch.cat(parts) if parts else torch.zeros(0))
    queries = gradient_matrix(task, model, query_data, names, kind="measurement", **options)
    if similarity == "cos":
        queries = _unit(queries.to(_wide(queries.dtype))).to(queries.dtype)
    return require_examples(stream_products(queries, blocks, dtype=gradient_dtype)) * measurement_sign(task)


def grad_dot_scores(task: Task, model: nn.Module, train_data, query_data, **options: Any) -> Tensor:
    """``s * <grad l(z), grad f(x)>``: :func:`similarity_scores` with ``similarity="dot"``.

    Returns:
        Tensor ``[m, n]``.
    """
    return similarity_scores(task, model, train_data, query_data, similarity="dot", **options)


def grad_cos_scores(task: Task, model: nn.Module, train_data, query_data, **options: Any) -> Tensor:
    """``s * cos(grad l(z), grad f(x))``: :func:`similarity_scores` with ``similarity="cos"``.

    Returns:
        Tensor ``[m, n]`` with entries in ``[-1, 1]``.
    """
    return similarity_scores(task, model, train_data, query_data, similarity="cos", **options)


def similarity_self_scores(task: Task, model: nn.Module, train_data: Dataset | DataLoader, **options: Any) -> Tensor:
    """Self-similarity of every training example: ``[n]``, ``||grad l(z)||^2`` (dot) or 1 (cos).

    Keyword arguments are those of :func:`similarity_scores` (which this calls with ``query_data=None``).
    """
    return similarity_scores(task, model, train_data, None, **options)


__all__ = [
    "SIMILARITIES",
    "grad_cos_scores",
    "grad_dot_scores",
    "similarity_scores",
    "similarity_self_scores",
]
