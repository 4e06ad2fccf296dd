"""Mislabel detection: plant label noise, then check that self-influence finds it.

A seeded random subset of the training labels is flipped (:func:`flip_labels`), the model is
trained on the noisy labels, and every training example is scored by its self-influence (larger =
more suspicious: an example the model can only fit by bending towards it). Inspecting the
examples in decreasing order of score, :func:`detection_curve` records which fraction of the
flipped labels has been found after each inspected fraction of the training set (Koh & Liang
2017, section 5.4; Pruthi et al. 2020, section 4.1). A random order finds them in proportion to
the work done (the diagonal); the area under the curve is 0.5 for a random order and approaches
``1 - n_flipped / (2 N)`` for a perfect one.

Counts of examples are ``floor(fraction * N + 1/2)`` (rounded half up) in both functions.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from influence.exceptions import invalid


def _count(fraction: float, n: int) -> int:
    """``fraction * n`` rounded half up (Python's ``round`` rounds half to even)."""
    return min(n, math.floor(fraction * n + 0.5))


def _is_fraction(value: object, *, closed_right: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return 0 <= value <= 1 if closed_right else 0 <= value < 1


def _check_long_vector(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor) or value.dim() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise invalid(f"{name}.shape", shape, "a 1-d tensor")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise invalid(f"{name}.dtype", value.dtype, "an integer dtype (e.g. torch.long)")


def flip_labels(labels: Tensor, fraction: float, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Plant label noise: give a seeded random subset of the examples another label.

    Args:
        labels: ``[N]`` integer class labels in ``[0, num_classes)``.
        fraction: share of the examples whose label is changed, in ``[0, 1)``; the count is
            ``fraction * N`` rounded half up.
        num_classes: number of classes, ``>= 2``.
        seed: seed of the choice of examples and of their new labels.

    Returns:
        ``(noisy, flipped)``: ``[N]`` labels where each example of ``flipped`` has a label drawn
        uniformly among the ``num_classes - 1`` other classes, and ``[n_flipped]`` long, the
        sorted indices of the changed examples.
    """
    _check_long_vector("labels", labels)
    if not _is_fraction(fraction, closed_right=False):
        raise invalid("fraction", fraction, "a number in [0, 1)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise invalid("num_classes", num_classes, "an integer >= 2")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise invalid("labels", sorted(set(bad.tolist()))[:5], f"class ids in [0, {num_classes})")
    n = labels.numel()
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(n, generator=generator)[: _count(fraction, n)].sort().values
    shift = torch.randint(1, num_classes, (flipped.numel(),), generator=generator)  # never 0
    noisy = labels.clone()
    flipped_here = flipped.to(labels.device)
    noisy[flipped_here] = (labels[flipped_here] + shift.to(labels.device, labels.dtype)) % num_classes
    return noisy, flipped.long()


_NUMPY_TRAPEZOID = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2.0, else numpy 1.26's name


def _trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under ``y`` against ``x`` by the trapezoid rule (``numpy.trapezoid``)."""
    return float(_NUMPY_TRAPEZOID(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)))


@dataclass
class MislabelCurve:
    """Share of the flipped labels found while inspecting examples in decreasing order of score.

    Attributes:
        inspected: ``[F]`` increasing fractions of the training set inspected.
        found: ``[F]`` fraction of the flipped labels among the top ``inspected * N`` examples.
        random_found: ``[F]`` the expectation of ``found`` under a random order (the fraction of
            the training set actually inspected, ``count / N``, i.e. ``inspected`` up to rounding).
        n_examples: ``N``, the training-set size.
        n_flipped: how many labels were flipped.
    """

    inspected: list[float]
    found: list[float]
    random_found: list[float]
    n_examples: int
    n_flipped: int

    @property
    def auc(self) -> float:
        """Area under ``found`` against ``inspected`` (trapezoid rule); 0.5 for a random order."""
        return _trapezoid(self.inspected, self.found)

    def found_at(self, fraction: float) -> float:
        """``found`` at an inspected ``fraction`` (linear interpolation between grid points).

        Raises:
            InvalidArgumentError: when ``fraction`` lies outside ``[inspected[0], inspected[-1]]``.
        """
        x, y = self.inspected, self.found
        if not isinstance(fraction, (int, float)) or not x[0] - 1e-12 <= fraction <= x[-1] + 1e-12:
            raise invalid("fraction", fraction, f"a number in [{x[0]}, {x[-1]}] (the inspected range)")
        i = bisect.bisect_left(x, fraction - 1e-12)
        if i == len(x) or abs(x[i] - fraction) <= 1e-12:
            return y[min(i, len(x) - 1)]
        weight = (fraction - x[i - 1]) / (x[i] - x[i - 1])
        return y[i - 1] + weight * (y[i] - y[i - 1])

    def to_dict(self) -> dict:
        """The fields, plus ``auc`` and ``random_auc`` (JSON-ready)."""
        return {**asdict(self), "auc": self.auc, "random_auc": _trapezoid(self.inspected, self.random_found)}


def detection_curve(scores: Tensor, flipped: Tensor, fractions: Sequence[float] | None = None) -> MislabelCurve:
    """How fast a ranking by ``scores`` finds the flipped labels.

    Args:
        scores: ``[N]`` one score per training example, larger = more suspicious (self-influence);
            ties are broken by index (the smaller index is inspected first).
        flipped: ``[n]`` long, distinct indices of the examples whose label was flipped, ``n >= 1``.
        fractions: increasing inspected fractions in ``[0, 1]``; default every 1% from 0 to 100%
            (101 points).

    Returns:
        A :class:`MislabelCurve`; at each fraction ``f`` the top ``f * N`` (rounded half up)
        examples are inspected.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() == 0:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise invalid("scores.shape", shape, "a non-empty 1-d tensor [N]")
    if scores.is_complex() or bool(scores.isnan().any()):
        raise invalid("scores", "a tensor with NaN or complex values", "real, non-NaN scores")
    _check_long_vector("flipped", flipped)
    n = scores.numel()
    indices = flipped.tolist()
    if not indices:
        raise invalid("flipped", indices, "at least one flipped index")
    if len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= n:
        raise invalid("flipped", indices[:10], f"distinct indices in [0, {n})")
    grid = [i / 100 for i in range(101)] if fractions is None else list(fractions)
    if not grid or not all(_is_fraction(f, closed_right=True) for f in grid) or any(
        b <= a for a, b in zip(grid, grid[1:])
    ):
        raise invalid("fractions", grid[:10], "a non-empty increasing sequence of numbers in [0, 1]")
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    is_flipped = torch.zeros(n, dtype=torch.long)
    is_flipped[flipped.cpu()] = 1
    found_within = torch.cat([torch.zeros(1, dtype=torch.long), is_flipped[order].cumsum(0)]).tolist()
    counts = [_count(f, n) for f in grid]
    return MislabelCurve(
        inspected=[float(f) for f in grid],
        found=[found_within[c] / len(indices) for c in counts],
        random_found=[c / n for c in counts],
        n_examples=n,
        n_flipped=len(indices),
    )
