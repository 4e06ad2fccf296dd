"""Mislabel detection against brute force on tiny problems, and end to end on a logistic regression.

- :func:`detection_curve` against a hand-computed curve (with tied scores), a brute-force loop, a
  perfect ranking (``found = min(1, f N / n)``) and random rankings (AUC 0.5);
- :func:`flip_labels`: seeded, exact count, never the original label, uniform over the others;
- self-influence (influence function, exact solver) of an l2-regularised logistic regression
  trained to convergence on labels flipped by :func:`flip_labels` finds them far better than chance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import influence
from influence.evaluation import MislabelCurve, detection_curve, flip_labels
from influence.exceptions import InvalidArgumentError
from influence.task import ClassificationTask
from tests.zoo import fit_logistic

DTYPE = torch.float64
LAMBDA = 0.01


def brute_curve(scores: list[float], flipped: set[int], fractions: list[float]) -> list[float]:
    """Sort by (-score, index) and count the flipped examples among the first floor(f N + 1/2)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    found = []
    for f in fractions:
        top = order[: math.floor(f * len(scores) + 0.5)]
        found.append(sum(1 for i in top if i in flipped) / len(flipped))
    return found


# -- detection_curve ---------------------------------------------------------------------------


def test_curve_matches_hand_computed_toy():
    # descending order, ties by index: 2 (.9), 7 (.8), 1, 4, 8 (.5 each), 9 (.4), 3, 6, 0, 5
    scores = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.5, 0.0, 0.2, 0.8, 0.5, 0.4], dtype=DTYPE)
    flipped = torch.tensor([9, 2, 8])
    curve = detection_curve(scores, flipped, fractions=[i / 10 for i in range(11)])
    third = 1 / 3
    assert curve.found == pytest.approx([0, third, third, third, third, 2 * third, 1, 1, 1, 1, 1], abs=1e-15)
    assert curve.inspected == pytest.approx([i / 10 for i in range(11)], abs=1e-15)
    assert curve.random_found == pytest.approx(curve.inspected, abs=1e-15)
    assert (curve.n_examples, curve.n_flipped) == (10, 3)
    assert curve.auc == pytest.approx(0.65, abs=1e-12)  # 0.1 * (1/6 + 3 * 1/3 + 1/2 + 5/6 + 4)
    assert curve.found_at(0.5) == pytest.approx(2 * third)
    assert curve.found_at(0.45) == pytest.approx((third + 2 * third) / 2)  # interpolated
    d = curve.to_dict()
    assert d["auc"] == pytest.approx(0.65) and d["random_auc"] == pytest.approx(0.5)
    assert set(d) == {"inspected", "found", "random_found", "n_examples", "n_flipped", "auc", "random_auc"}


def test_default_grid_has_101_points_and_rounds_half_up():
    scores = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.5, 0.0, 0.2, 0.8, 0.5, 0.4], dtype=DTYPE)
    curve = detection_curve(scores, torch.tensor([2, 8, 9]))
    assert len(curve.inspected) == len(curve.found) == len(curve.random_found) == 101
    assert curve.inspected[0] == 0.0 and curve.inspected[-1] == 1.0
    assert curve.found_at(0.04) == 0.0  # 0.4 examples -> none
    assert curve.found_at(0.05) == pytest.approx(1 / 3)  # 0.5 examples -> one (half up)
    assert curve.random_found[5] == pytest.approx(0.1)
    assert curve.found[0] == 0.0 and curve.found[-1] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_curve_matches_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    n = 37
    scores = torch.randint(0, 6, (n,), generator=g).double()  # many ties
    flipped = torch.randperm(n, generator=g)[:7]
    fractions = sorted({round(x, 4) for x in torch.rand(20, generator=g, dtype=DTYPE).tolist()} | {0.0, 1.0})
    for grid in (None, fractions):
        curve = detection_curve(scores, flipped, grid)
        expected = brute_curve(scores.tolist(), set(flipped.tolist()), curve.inspected)
        assert curve.found == pytest.approx(expected, abs=1e-15)


def test_perfect_ranking_finds_everything_first():
    n, n_flipped = 200, 20
    flipped = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:n_flipped]
    scores = torch.zeros(n, dtype=DTYPE)
    scores[flipped] = 1.0 + torch.arange(n_flipped, dtype=DTYPE)
    curve = detection_curve(scores, flipped)
    expected = [min(1.0, round(f * n) / n_flipped) for f in curve.inspected]
    assert curve.found == pytest.approx(expected, abs=1e-12)
    assert curve.auc == pytest.approx(1 - n_flipped / (2 * n), abs=1e-12)  # kink at 10%, on the grid
    odd = detection_curve(torch.cat([scores, torch.zeros(50, dtype=DTYPE)]), flipped)  # kink at 8%
    assert odd.auc == pytest.approx(1 - n_flipped / (2 * 250), abs=2e-3)


def test_reversed_ranking_finds_them_last():
    n = 100
    flipped = torch.arange(90, 100)
    curve = detection_curve(torch.arange(n, dtype=DTYPE).flip(0), flipped)  # flipped scored lowest
    assert curve.found_at(0.9) == 0.0
    assert curve.auc == pytest.approx(10 / (2 * n), abs=1e-12)


def test_random_scores_give_auc_one_half():
    g = torch.Generator().manual_seed(0)
    aucs, random_aucs = [], []
    for _ in range(400):
        scores = torch.rand(100, generator=g, dtype=DTYPE)
        flipped = torch.randperm(100, generator=g)[:10]
        curve = detection_curve(scores, flipped)
        aucs.append(curve.auc)
        random_aucs.append(curve.to_dict()["random_auc"])
    mean = sum(aucs) / len(aucs)
    print(f"random rankings: mean AUC {mean:.4f} over {len(aucs)} seeds")
    assert mean == pytest.approx(0.5, abs=0.015)
    assert random_aucs[0] == pytest.approx(0.5, abs=1e-12)


def _former_trapezoid(x, y):
    """The hand-written sum that the AUC used before ``numpy.trapezoid`` (left to right)."""
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


def test_auc_is_numpys_trapezoid_and_equals_the_former_sum():
    numpy_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 / numpy 1.26
    g = torch.Generator().manual_seed(0)
    curves = [detection_curve(torch.tensor([0.1, 0.5, 0.9, 0.3, 0.5, 0.0, 0.2, 0.8, 0.5, 0.4], dtype=DTYPE),
                              torch.tensor([9, 2, 8]), fractions=[i / 10 for i in range(11)])]
    for _ in range(300):
        n = int(torch.randint(10, 3000, (1,), generator=g))
        flipped = torch.randperm(n, generator=g)[: max(1, n // 10)]
        curves.append(detection_curve(torch.randn(n, generator=g, dtype=DTYPE), flipped))
    exact = 0
    for curve in curves:
        for y, area in ((curve.found, curve.auc), (curve.random_found, curve.to_dict()["random_auc"])):
            assert area == float(numpy_trapezoid(y, curve.inspected))
            # the same terms; numpy adds them pairwise, the former code left to right: equal up to the
            # last bits of the sum (measured: at most 7.8e-16 over 4,000 curves, equal for about 40%)
            former = _former_trapezoid(curve.inspected, y)
            assert abs(area - former) <= 1e-15
            exact += area == former
    assert curves[0].auc == _former_trapezoid(curves[0].inspected, curves[0].found) == pytest.approx(0.65, abs=1e-15)
    assert exact > 0


def test_found_at_outside_the_grid_is_refused():
    curve = detection_curve(torch.arange(10, dtype=DTYPE), torch.tensor([3]), fractions=[0.2, 0.5])
    assert isinstance(curve, MislabelCurve)
    with pytest.raises(InvalidArgumentError, match="fraction=0.6"):
        curve.found_at(0.6)


@pytest.mark.parametrize(
    ("scores", "flipped", "fractions", "match"),
    [
        (torch.zeros(2, 5), torch.tensor([1]), None, r"scores.shape=\(2, 5\)"),
        (torch.tensor([0.0, float("nan")]), torch.tensor([1]), None, "NaN"),
        (torch.zeros(5), torch.tensor([5]), None, r"flipped=\[5\]"),
        (torch.zeros(5), torch.tensor([1, 1]), None, r"flipped=\[1, 1\]"),
        (torch.zeros(5), torch.tensor([], dtype=torch.long), None, r"flipped=\[\]"),
        (torch.zeros(5), torch.tensor([1.0]), None, "flipped.dtype"),
        (torch.zeros(5), torch.tensor([1]), [0.5, 0.2], r"fractions=\[0.5, 0.2\]"),
        (torch.zeros(5), torch.tensor([1]), [0.5, 1.5], r"fractions=\[0.5, 1.5\]"),
        (torch.zeros(5), torch.tensor([1]), [], r"fractions=\[\]"),
    ],
)
def test_detection_curve_refuses_bad_input(scores, flipped, fractions, match):
    with pytest.raises(ValueError, match=match):
        detection_curve(scores, flipped, fractions)


# -- flip_labels -------------------------------------------------------------------------------


def test_flip_labels_is_seeded_exact_and_never_keeps_the_label():
    labels = torch.randint(0, 4, (101,), generator=torch.Generator().manual_seed(0))
    original = labels.clone()
    noisy, flipped = flip_labels(labels, 0.2, num_classes=4, seed=7)
    again, flipped_again = flip_labels(labels, 0.2, num_classes=4, seed=7)
    assert torch.equal(noisy, again) and torch.equal(flipped, flipped_again)
    assert not torch.equal(flip_labels(labels, 0.2, num_classes=4, seed=8)[1], flipped)
    assert torch.equal(labels, original)  # not modified in place
    assert flipped.dtype == torch.long and flipped.numel() == 20  # 20.2 -> 20
    assert flipped.tolist() == sorted(set(flipped.tolist()))
    changed = (noisy != labels).nonzero().squeeze(1)
    assert torch.equal(changed, flipped)  # flipped ones all changed, the others all kept
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 4 and noisy.dtype == labels.dtype


@pytest.mark.parametrize(
    ("n", "fraction"), [(10, 0.0), (10, 0.05), (10, 0.25), (60, 0.1), (7, 0.5), (1, 0.6), (0, 0.3)]
)
def test_flip_labels_flips_the_requested_count(n, fraction):
    labels = torch.zeros(n, dtype=torch.long)
    noisy, flipped = flip_labels(labels, fraction, num_classes=2, seed=0)
    assert flipped.numel() == math.floor(fraction * n + 0.5)
    assert bool((noisy[flipped] == 1).all()) and int(noisy.sum()) == flipped.numel()


def test_new_labels_are_uniform_over_the_other_classes():
    labels = torch.full((6000,), 2, dtype=torch.long)
    noisy, flipped = flip_labels(labels, 0.5, num_classes=4, seed=3)
    counts = torch.bincount(noisy[flipped], minlength=4).tolist()
    assert counts[2] == 0
    for c in (0, 1, 3):
        assert counts[c] / 3000 == pytest.approx(1 / 3, abs=0.03)  # sd ~0.009


@pytest.mark.parametrize(
    ("labels", "fraction", "num_classes", "match"),
    [
        (torch.tensor([0, 1, 2]), 1.0, 3, "fraction=1.0"),
        (torch.tensor([0, 1, 2]), -0.1, 3, r"fraction=-0.1"),
        (torch.tensor([0, 1, 2]), float("nan"), 3, "fraction=nan"),
        (torch.tensor([0, 0, 0]), 0.5, 1, "num_classes=1"),
        (torch.tensor([0, 5, 2]), 0.5, 3, r"labels=\[5\]"),
        (torch.tensor([0, -1, 2]), 0.5, 3, r"labels=\[-1\]"),
        (torch.tensor([0.0, 1.0]), 0.5, 3, "labels.dtype"),
        (torch.tensor([[0, 1]]), 0.5, 3, r"labels.shape=\(1, 2\)"),
    ],
)
def test_flip_labels_refuses_bad_input(labels, fraction, num_classes, match):
    with pytest.raises(ValueError, match=match):
        flip_labels(labels, fraction, num_classes=num_classes, seed=0)


# -- end to end: self-influence of a logistic regression on noisy labels -----------------------


def l2(params: dict[str, Tensor]) -> Tensor:
    return LAMBDA / 2 * sum((p**2).sum() for p in params.values())


def test_self_influence_finds_flipped_labels_on_a_logistic_regression():
    g = torch.Generator().manual_seed(0)
    n = 60
    labels = torch.arange(n) % 2
    centers = torch.tensor([[-1.5, -1.0], [1.5, 1.0]], dtype=DTYPE)
    x = centers[labels] + 0.6 * torch.randn(n, 2, generator=g, dtype=DTYPE)  # separable clusters
    noisy, flipped = flip_labels(labels, 0.1, num_classes=2, seed=0)
    rows = [{"inputs": x[i], "label": noisy[i]} for i in range(n)]
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    fit_logistic(model, rows, LAMBDA, tolerance=1e-10)
    clean_accuracy = float((model(x).argmax(1) == labels).double().mean())
    scores = influence.self_influence(ClassificationTask(), model, rows, method="if", solver="exact",
                                      damping=0.0, regularizer=l2)
    curve = detection_curve(scores, flipped)
    random_curve = detection_curve(torch.rand(n, generator=g, dtype=DTYPE), flipped)
    print(f"logistic regression, {flipped.numel()}/{n} labels flipped, accuracy on clean labels "
          f"{clean_accuracy:.2f}: self-influence AUC {curve.auc:.3f}, found@10% {curve.found_at(0.1):.2f}, "
          f"found@20% {curve.found_at(0.2):.2f} (random order: AUC {random_curve.auc:.3f}, "
          f"found@20% {random_curve.found_at(0.2):.2f})")
    assert flipped.numel() == 6
    assert clean_accuracy >= 0.95  # the noise did not move the boundary much
    assert curve.found_at(0.2) >= 0.6
    assert curve.auc >= 0.85
