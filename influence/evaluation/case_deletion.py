"""Case deletion: check attributions by actually retraining without the examples they name.

For every query, the ``k`` training examples with the largest scores (its top proponents) are
removed and the model is retrained; if the scores are right the query's loss rises. The same is
done with ``k`` examples drawn at random (shared by all queries, repeated with different draws).
An attribution method passes when removing its proponents raises the queries' mean loss by more
than removing random examples does.

The retraining itself is the caller's (a closure over the real training code), so the check
measures exactly the training that produced the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from influence.exceptions import invalid


@dataclass
class DeletionResult:
    """Outcome of one method's case-deletion check.

    Attributes:
        method: the attribution method whose proponents were removed.
        k: examples removed per retraining.
        delta_top: ``[Q]`` change of each query's measurement after removing its top-k proponents.
        delta_random: ``[R, Q]`` change after each random removal.
        removed_top: ``[Q][k]`` training indices removed for each query.
    """

    method: str
    k: int
    delta_top: list[float]
    delta_random: list[list[float]]
    removed_top: list[list[int]] = field(default_factory=list)

    @property
    def mean_top(self) -> float:
        return float(sum(self.delta_top) / len(self.delta_top))

    @property
    def mean_random(self) -> float:
        flat = [v for row in self.delta_random for v in row]
        return float(sum(flat) / len(flat))

    @property
    def ratio(self) -> float:
        """mean change (top-k) / mean change (random); ``inf`` or ``nan`` when random is ~0."""
        if abs(self.mean_random) < 1e-12:
            return math.copysign(math.inf, self.mean_top) if self.mean_top else math.nan
        return self.mean_top / self.mean_random

    @property
    def passed(self) -> bool:
        """Removing the proponents raised the mean measurement more than random removal did."""
        return self.mean_top > self.mean_random and self.mean_top > 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(mean_top=self.mean_top, mean_random=self.mean_random, ratio=self.ratio, passed=self.passed)
        return out


def top_k_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores of each row.

    Args:
        scores: ``[Q, N]``.
        k: how many per row, ``1 <= k <= N``.

    Returns:
        ``[Q, k]`` long tensor, largest first.
    """
    if scores.dim() != 2:
        raise invalid("scores.shape", tuple(scores.shape), "a 2-d tensor [n_query, n_train]")
    if not 1 <= k <= scores.shape[1]:
        raise invalid("k", k, f"an integer between 1 and n_train={scores.shape[1]}")
    return scores.topk(k, dim=1).indices


def random_removals(n_train: int, k: int, repeats: int, seed: int) -> list[list[int]]:
    """``repeats`` seeded draws of ``k`` distinct indices out of ``n_train``."""
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(n_train, generator=generator)[:k].tolist()) for _ in range(repeats)]


def case_deletion(
    scores: Mapping[str, Tensor],
    *,
    retrain: Callable[[list[int]], nn.Module],
    measure: Callable[[nn.Module], Tensor],
    base: Tensor,
    n_train: int,
    k: int,
    random_repeats: int = 3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, DeletionResult]:
    """Retrain without each query's top-k proponents (per method) and without k random examples.

    Args:
        scores: ``{method: [Q, N]}`` attribution scores (positive = proponent).
        retrain: trains a fresh model on the kept training indices (sorted list) and returns it.
        measure: ``model -> [Q]`` each query's measurement (e.g. its loss).
        base: ``[Q]`` the measurement of the model trained on all data.
        n_train: ``N``, the training-set size.
        k: examples removed per retraining.
        random_repeats: independent random removals (shared by every method).
        seed: seed of the random removals.
        log: optional progress callback.

    Returns:
        ``{method: DeletionResult}``; every method is compared against the same random retrainings.
    """
    if not scores:
        raise invalid("scores", {}, "at least one method's [Q, N] scores")
    n_query = int(base.shape[0])
    for method, s in scores.items():
        if tuple(s.shape) != (n_query, n_train):
            raise invalid(f"scores[{method!r}].shape", tuple(s.shape), f"({n_query}, {n_train}) = (len(base), n_train)")
    if random_repeats < 1:
        raise invalid("random_repeats", random_repeats, "an integer >= 1")
    everything = set(range(n_train))

    def delta_after_removing(removed: Sequence[int]) -> Tensor:
        model = retrain(sorted(everything.difference(removed)))
        return (measure(model).detach().double() - base.detach().double()).cpu()

    random_deltas = []
    for r, removed in enumerate(random_removals(n_train, k, random_repeats, seed)):
        if log:
            log(f"random removal {r + 1}/{random_repeats}")
        random_deltas.append(delta_after_removing(removed).tolist())
    results = {}
    for method, s in scores.items():
        top = top_k_indices(s.detach(), k)
        deltas = []
        for q in range(n_query):
            if log:
                log(f"{method}: query {q + 1}/{n_query}")
            deltas.append(float(delta_after_removing(top[q].tolist())[q]))
        results[method] = DeletionResult(method, k, deltas, random_deltas, top.tolist())
    return results
