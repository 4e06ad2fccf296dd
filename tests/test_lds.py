"""LDS against a brute-force Spearman computation, and against actual retraining of a tiny model.

The brute-force comparisons run on every device of ``zoo.DEVICES`` (CUDA ones are ``gpu``-marked):
the inputs are moved there, the pure-Python reference stays on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from influence.evaluation import lds, lds_per_query, random_subsets, spearman
from influence.exceptions import InvalidArgumentError
from tests import zoo


def brute_ranks(values: list[float]) -> list[float]:
    ranks = []
    for v in values:
        below = sum(1 for w in values if w < v)
        equal = sum(1 for w in values if w == v)
        ranks.append(below + (equal + 1) / 2)
    return ranks


def brute_spearman(a: list[float], b: list[float]) -> float:
    ra, rb = brute_ranks(a), brute_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_spearman_matches_brute_force_with_ties(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 12), generator=g).double()  # many ties
    b = torch.randn(4, 12, generator=g, dtype=torch.float64)
    ours = spearman(a.to(device), b.to(device))
    assert ours.device.type == device
    for i in range(4):
        assert ours[i].item() == pytest.approx(brute_spearman(a[i].tolist(), b[i].tolist()), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_lds_matches_brute_force(device):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 10, generator=g, dtype=torch.float64)
    masks = random_subsets(10, 0.5, 8, seed=2)
    outputs = torch.randn(8, 3, generator=g, dtype=torch.float64)
    expected = []
    for q in range(3):
        predicted = [-sum(scores[q, i].item() for i in range(10) if masks[j, i]) for j in range(8)]
        expected.append(brute_spearman(predicted, outputs[:, q].tolist()))
    inputs = (scores.to(device), masks.to(device), outputs.to(device))
    per_query = lds_per_query(*inputs)
    assert per_query.device.type == device
    assert per_query.tolist() == pytest.approx(expected, rel=1e-12)
    assert lds(*inputs) == pytest.approx(sum(expected) / 3, rel=1e-12)


def test_exact_leave_out_scores_on_least_squares_give_high_lds():
    """On ridge regression the influence function is nearly additive: LDS of exact scores is high."""
    g = torch.Generator().manual_seed(3)
    n, d, lam = 60, 3, 1.0
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    xq = torch.randn(4, d, generator=g, dtype=torch.float64)
    yq = xq @ torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64) + 3.0  # far from the fit: first order dominates

    def fit(mask):
        xs, ys = x[mask], y[mask]
        return torch.linalg.solve(xs.T @ xs / n + lam * torch.eye(d, dtype=torch.float64), xs.T @ ys / n)

    def losses(w):
        return 0.5 * (xq @ w - yq) ** 2

    full = torch.ones(n, dtype=torch.bool)
    w = fit(full)
    hessian = x.T @ x / n + lam * torch.eye(d, dtype=torch.float64)
    residual = x @ w - y
    train_grads = x * residual[:, None]  # [n, d]
    query_grads = xq * (xq @ w - yq)[:, None]  # [Q, d]
    scores = query_grads @ torch.linalg.solve(hessian, train_grads.T) / n  # removal raises loss by this
    masks = random_subsets(n, 0.9, 30, seed=4)  # near the linear regime
    outputs = torch.stack([losses(fit(m)) for m in masks])
    value = lds(scores, masks, outputs)
    assert value > 0.8, value
    assert lds(-scores, masks, outputs) == pytest.approx(-value)


def test_bad_shapes_are_named():
    with pytest.raises(InvalidArgumentError, match="outputs.shape"):
        lds(torch.zeros(2, 5), torch.ones(3, 5, dtype=torch.bool), torch.zeros(2, 3))
    with pytest.raises(InvalidArgumentError, match="fraction"):
        random_subsets(10, 1.5, 2, seed=0)


def test_small_removal_subsets_leave_out_the_given_range():
    from influence.evaluation import small_removal_subsets

    masks = small_removal_subsets(400, 0.01, 0.05, 5, seed=2)
    assert masks.shape == (5, 400) and masks.dtype == torch.bool
    assert (~masks).sum(dim=1).tolist() == [4, 8, 12, 16, 20]  # evenly spaced from 1% to 5%
    assert torch.equal(masks, small_removal_subsets(400, 0.01, 0.05, 5, seed=2))  # seeded
    assert not torch.equal(masks, small_removal_subsets(400, 0.01, 0.05, 5, seed=3))
    assert (~small_removal_subsets(10, 0.01, 0.01, 3, seed=0)).sum(dim=1).tolist() == [1, 1, 1]  # at least one
    with pytest.raises(InvalidArgumentError, match="removed fractions"):
        small_removal_subsets(10, 0.05, 0.01, 2, seed=0)
    with pytest.raises(InvalidArgumentError, match="count"):
        small_removal_subsets(10, 0.01, 0.05, 0, seed=0)
