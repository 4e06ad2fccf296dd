"""Linear datamodeling score (LDS, Park et al. 2023, "TRAK: Attributing model behavior at scale").

Train ``M`` models on random subsets ``S_j`` of the training set and record each query's output.
An attribution predicts the output of the model trained on ``S_j`` additively from its scores;
LDS is the Spearman rank correlation, across the ``M`` subsets, between predicted and actual
outputs, averaged over queries.

With this library's sign convention (a score is the increase of the query's badness when the
example is *removed*), keeping ``S_j`` and dropping the rest predicts a badness of
``const - sum_{i in S_j} score_i``; so the prediction used is ``-masks @ scores^T``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from influence.exceptions import invalid


def average_ranks(values: Tensor) -> Tensor:
    """Ranks ``1..n`` along the last dimension, ties sharing their average rank.

    Args:
        values: ``[..., n]``.

    Returns:
        ``[..., n]`` float64 ranks.
    """
    values = values.double()
    order = values.argsort(dim=-1, stable=True)
    sorted_values = values.gather(-1, order)
    n = values.shape[-1]
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=values.device).expand_as(values)
    # group equal neighbours: a new group starts where the sorted value changes
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    group = starts.long().cumsum(dim=-1) - 1  # [..., n] group index
    sums = torch.zeros_like(positions).scatter_add_(-1, group, positions)
    counts = torch.zeros_like(positions).scatter_add_(-1, group, torch.ones_like(positions))
    mean_rank = sums.gather(-1, group) / counts.gather(-1, group)
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(-1, order, mean_rank)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of ``a`` and ``b`` along the last dimension (ties: average ranks).

    Args:
        a, b: ``[..., n]`` with equal shapes, ``n >= 2``.

    Returns:
        ``[...]`` correlations; ``nan`` where either side is constant.
    """
    if a.shape != b.shape or a.shape[-1] < 2:
        raise invalid("shapes", (tuple(a.shape), tuple(b.shape)), "two equal shapes [..., n] with n >= 2")
    ra, rb = average_ranks(a), average_ranks(b)
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def lds_per_query(scores: Tensor, subset_masks: Tensor, outputs: Tensor) -> Tensor:
    """Per-query linear datamodeling score.

    Args:
        scores: ``[Q, N]`` attribution scores (positive = proponent).
        subset_masks: ``[M, N]`` booleans (or 0/1): which training examples each retrained model saw.
        outputs: ``[M, Q]`` each retrained model's measurement of each query, oriented so that
            larger is worse (a loss; pass ``-margin`` for a margin).

    Returns:
        ``[Q]`` Spearman correlations between ``-subset_masks @ scores.T`` and ``outputs``.
    """
    if scores.dim() != 2 or subset_masks.dim() != 2 or outputs.dim() != 2:
        raise invalid("dims", (scores.dim(), subset_masks.dim(), outputs.dim()), "scores [Q, N], subset_masks [M, N], outputs [M, Q]")
    q, n = scores.shape
    m = subset_masks.shape[0]
    if subset_masks.shape[1] != n:
        raise invalid("subset_masks.shape", tuple(subset_masks.shape), f"[M, {n}] (N from scores)")
    if outputs.shape != (m, q):
        raise invalid("outputs.shape", tuple(outputs.shape), f"({m}, {q}) = (subsets, queries)")
    if m < 2:
        raise invalid("subset_masks", f"{m} subset(s)", "at least 2 subsets")
    predicted = -(subset_masks.double() @ scores.double().T)  # [M, Q]
    return spearman(predicted.T, outputs.double().T)


def lds(scores: Tensor, subset_masks: Tensor, outputs: Tensor) -> float:
    """Linear datamodeling score: :func:`lds_per_query` averaged over queries (``nan`` ignored).

    Args:
        scores: ``[Q, N]``.
        subset_masks: ``[M, N]``.
        outputs: ``[M, Q]`` (larger = worse).

    Returns:
        The mean Spearman correlation, in ``[-1, 1]``.
    """
    per_query = lds_per_query(scores, subset_masks, outputs)
    return float(per_query[~per_query.isnan()].mean())


def small_removal_subsets(n_train: int, low: float, high: float, count: int, seed: int) -> Tensor:
    """``count`` seeded subsets that each leave out a small random part of the training set.

    The protocol of Ilyas & Engstrom 2025 (MAGIC): each retraining differs from the full run by a
    removal of 1% to 5% of the examples, where the first-order (linear) prediction that every method
    makes is meant to hold. Subset ``j`` leaves out ``round(f_j * n_train)`` random examples (at least
    one), with ``f_j`` evenly spaced from ``low`` to ``high``.

    Args:
        n_train: ``N``, the training set's size.
        low, high: the smallest and largest removed fraction, ``0 < low <= high < 1``.
        count: ``M``, how many subsets.
        seed: seeds the choice of the removed examples.

    Returns:
        ``[M, N]`` booleans, ``True`` where the example is kept.
    """
    if not (0 < low <= high < 1):
        raise invalid("removed fractions", (low, high), "two numbers with 0 < low <= high < 1")
    if count < 1:
        raise invalid("count", count, "a positive integer")
    fractions = torch.linspace(low, high, count, dtype=torch.float64).tolist() if count > 1 else [low]
    generator = torch.Generator().manual_seed(seed)
    masks = torch.ones(count, n_train, dtype=torch.bool)
    for j, fraction in enumerate(fractions):
        removed = min(n_train - 1, max(1, round(fraction * n_train)))
        masks[j, torch.randperm(n_train, generator=generator)[:removed]] = False
    return masks


def random_subsets(n_train: int, fraction: float, count: int, seed: int) -> Tensor:
    """``count`` seeded random subsets of ``round(fraction * n_train)`` examples, as ``[count, n_train]`` booleans."""
    if not 0 < fraction < 1:
        raise invalid("fraction", fraction, "a number strictly between 0 and 1")
    size = max(1, round(fraction * n_train))
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, n_train, dtype=torch.bool)
    for j in range(count):
        masks[j, torch.randperm(n_train, generator=generator)[:size]] = True
    return masks
