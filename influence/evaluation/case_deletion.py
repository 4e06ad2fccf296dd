"""Case deletion: check attributions by actually retraining without the examples they name.

Protocol of Yeh et al. 2022: for every query, the ``k`` training examples with the largest scores
(its top *proponents*) are removed and the model is retrained; if the scores are right the query's
loss rises. Removing its top *opponents* (smallest scores) should lower it. The same is done with
``k`` examples drawn at random (shared by all queries, repeated with different draws), the
baseline every method must beat.

For each query ``q`` the effect beyond random is ``d_q = delta_q - mean_r delta_random[r, q]``; a
method passes for proponents when the 95% (Student t) interval of the mean of ``d_q`` over queries
lies above zero, and for opponents when it lies below zero.

The retraining itself is the caller's (a closure over the real training code), so the check
measures exactly the training that produced the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from influence.exceptions import invalid
from influence.progress import progress
from influence.validation import check_positive_int

KINDS = ("proponents", "opponents")

def t_quantile_95(degrees_of_freedom: int) -> float:
    """Two-sided 95% quantile of Student's t (its 0.975 quantile) with ``degrees_of_freedom >= 1``.

    ``scipy.stats.t.ppf(0.975, degrees_of_freedom)``: 12.706 for 1, 2.042 for 30, 2.040 for 31,
    tending to the normal 1.960.

    Raises:
        InvalidArgumentError: ``degrees_of_freedom`` is not a positive integer.
    """
    return _t_975(int(check_positive_int("degrees_of_freedom", degrees_of_freedom)))


@functools.lru_cache(maxsize=256)
def _t_975(degrees_of_freedom: int) -> float:
    from scipy.stats import t  # imported here: scipy.stats takes a while to import, and only intervals need it

    return float(t.ppf(0.975, degrees_of_freedom))


@dataclass
class DeletionResult:
    """Outcome of one method's case-deletion check for one kind and one ``k``.

    Attributes:
        method: the attribution method whose examples were removed.
        kind: ``"proponents"`` (largest scores removed) or ``"opponents"`` (smallest).
        k: examples removed per retraining.
        delta_top: ``[Q]`` change of each query's measurement after removing its top-k examples.
        delta_random: ``[R][Q]`` change after each random removal of k examples.
        removed_top: ``[Q][k]`` training indices removed for each query.
        extra_name: name of a second measurement recorded alongside (e.g. ``"probability"`` of the
            query's label), ``""`` when there is none; it plays no part in the verdict.
        extra_top: ``[Q]`` its change after removing each query's top-k examples.
        extra_random: ``[R][Q]`` its change after each random removal.
    """

    method: str
    k: int
    delta_top: list[float]
    delta_random: list[list[float]]
    removed_top: list[list[int]] = field(default_factory=list)
    kind: str = "proponents"
    extra_name: str = ""
    extra_top: list[float] = field(default_factory=list)
    extra_random: list[list[float]] = field(default_factory=list)

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

    def differences(self) -> list[float]:
        """``[Q]``: each query's change beyond the mean random change for that query."""
        repeats = len(self.delta_random)
        return [
            top - sum(row[q] for row in self.delta_random) / repeats
            for q, top in enumerate(self.delta_top)
        ]

    def interval(self) -> tuple[float, float]:
        """95% Student-t interval of the mean of :meth:`differences` (``(-inf, inf)`` for one query)."""
        d = self.differences()
        mean = sum(d) / len(d)
        if len(d) < 2:
            return (-math.inf, math.inf)
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
        half = t_quantile_95(len(d) - 1) * sd / math.sqrt(len(d))
        return (mean - half, mean + half)

    @property
    def passed(self) -> bool:
        """Proponents: the interval lies above zero. Opponents: it lies below zero."""
        low, high = self.interval()
        return low > 0 if self.kind == "proponents" else high < 0

    def to_dict(self) -> dict:
        out = asdict(self)
        low, high = self.interval()
        if self.extra_name:
            flat = [v for row in self.extra_random for v in row]
            out.update(extra_mean_top=sum(self.extra_top) / len(self.extra_top), extra_mean_random=sum(flat) / len(flat))
        out.update(mean_top=self.mean_top, mean_random=self.mean_random, ratio=self.ratio,
                   difference=sum(self.differences()) / len(self.delta_top), interval_low=low,
                   interval_high=high, passed=self.passed)
        return out


def top_k_indices(scores: Tensor, k: int, kind: str = "proponents") -> Tensor:
    """Indices of the ``k`` largest (proponents) or smallest (opponents) scores of each row.

    Args:
        scores: ``[Q, N]``.
        k: how many per row, ``1 <= k <= N``.
        kind: ``"proponents"`` or ``"opponents"``.

    Returns:
        ``[Q, k]`` long tensor, most extreme first.
    """
    if scores.dim() != 2:
        raise invalid("scores.shape", tuple(scores.shape), "a 2-d tensor [n_query, n_train]")
    if not 1 <= k <= scores.shape[1]:
        raise invalid("k", k, f"an integer between 1 and n_train={scores.shape[1]}")
    if kind not in KINDS:
        raise invalid("kind", kind, "'proponents' or 'opponents'")
    return scores.topk(k, dim=1, largest=kind == "proponents").indices


def random_removals(n_train: int, k: int, repeats: int, seed: int) -> list[list[int]]:
    """``repeats`` seeded draws of ``k`` distinct indices out of ``n_train``."""
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(n_train, generator=generator)[:k].tolist()) for _ in range(repeats)]


@dataclass(frozen=True)
class Retraining:
    """One retraining of a case-deletion check: the training set less ``removed``, trained with ``seed``.

    Attributes:
        removed: sorted training indices left out (empty: the full training set, the baseline).
        seed: the retraining seed.
    """

    removed: tuple[int, ...]
    seed: int

    @property
    def key(self) -> str:
        """A stable 16-character id (file names, task names, resumption)."""
        blob = json.dumps([self.seed, list(self.removed)]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def keep(self, n_train: int) -> list[int]:
        """The sorted training indices this retraining trains on."""
        removed = set(self.removed)
        return [i for i in range(n_train) if i not in removed]


@dataclass
class DeletionPlan:
    """Every retraining of a case-deletion check, and how their measurements become verdicts.

    Made by :func:`plan_deletion`; the retrainings are independent (run them in any order, in
    parallel, or resume a partial set), then :meth:`results` turns their measurements into one
    :class:`DeletionResult` per (k, method, kind). Each change is measured against the baseline
    retrained with the same seed, and averaged over the seeds.

    Attributes:
        n_train: ``N``.
        n_query: ``Q``.
        seeds: the retraining seeds.
        kinds: the kinds removed.
        ks: the sizes ``k``.
        top: ``{(method, kind, k): [Q][k]}`` indices removed for each query.
        random: ``{k: [R][k]}`` random removals shared by every method and kind.
    """

    n_train: int
    n_query: int
    seeds: list[int]
    kinds: list[str]
    ks: list[int]
    top: dict[tuple[str, str, int], list[list[int]]]
    random: dict[int, list[list[int]]]

    def retrainings(self) -> list[Retraining]:
        """The distinct retrainings, baselines first (one per seed), in a fixed order."""
        found: dict[Retraining, None] = {}
        for seed in self.seeds:
            found[Retraining((), seed)] = None
        for size in self.ks:
            for seed in self.seeds:
                for removed in self.random[size]:
                    found[Retraining(tuple(sorted(removed)), seed)] = None
        for (method, kind, size), rows in self.top.items():
            for seed in self.seeds:
                for removed in rows:
                    found[Retraining(tuple(sorted(removed)), seed)] = None
        return list(found)

    def results(self, measured: Mapping[str, Tensor], extra_name: str = "") -> list[DeletionResult]:
        """Verdicts from the measurements of every retraining.

        Args:
            measured: ``{Retraining.key: [Q] or [Q, 2]}`` each retraining's query measurements
                (column 0: the one judged, larger = worse, e.g. the loss; column 1, optional: a
                second one recorded alongside, e.g. the probability of the query's label).
            extra_name: the name of column 1 (required when it is there).

        Returns:
            One :class:`DeletionResult` per (k, method, kind), in that nesting order.

        Raises:
            InvalidArgumentError: a retraining of the plan has no measurement, or one has the wrong shape.
        """
        values: dict[Retraining, Tensor] = {}
        for retraining in self.retrainings():
            if retraining.key not in measured:
                raise invalid(f"measured[{retraining.key!r}]", "missing",
                              f"the [Q] measurements of retraining seed={retraining.seed}, {len(retraining.removed)} removed")
            value = torch.as_tensor(measured[retraining.key]).detach().double().cpu()
            value = value[:, None] if value.dim() == 1 else value
            if value.dim() != 2 or value.shape[0] != self.n_query or value.shape[1] not in (1, 2):
                raise invalid(f"measured[{retraining.key!r}].shape", tuple(value.shape), f"({self.n_query},) or ({self.n_query}, 2)")
            values[retraining] = value
        two = all(v.shape[1] == 2 for v in values.values())

        def change(removed: Sequence[int]) -> Tensor:
            """``[Q, 1 or 2]`` change against the same seed's baseline, averaged over seeds."""
            deltas = [values[Retraining(tuple(sorted(removed)), s)] - values[Retraining((), s)] for s in self.seeds]
            return torch.stack(deltas).mean(dim=0)

        results = []
        for size in self.ks:
            random = [change(removed) for removed in self.random[size]]
            for (method, kind, k_), rows in self.top.items():
                if k_ != size:
                    continue
                top = torch.stack([change(removed)[q] for q, removed in enumerate(rows)])
                results.append(DeletionResult(
                    method, size, top[:, 0].tolist(), [r[:, 0].tolist() for r in random], rows, kind,
                    extra_name=extra_name if two else "",
                    extra_top=top[:, 1].tolist() if two else [],
                    extra_random=[r[:, 1].tolist() for r in random] if two else [],
                ))
        return results


def plan_deletion(
    scores: Mapping[str, Tensor],
    *,
    n_train: int,
    k: int | Sequence[int],
    kinds: Sequence[str] = ("proponents",),
    random_repeats: int = 3,
    seeds: Sequence[int] = (0,),
    seed: int = 0,
) -> DeletionPlan:
    """The retrainings of a case-deletion check (see :func:`case_deletion` for the protocol).

    Args:
        scores: ``{method: [Q, N]}`` attribution scores (positive = proponent).
        n_train: ``N``, the training-set size.
        k: examples removed per retraining, or several values (each in ``[1, N)``).
        kinds: any of ``"proponents"``, ``"opponents"``.
        random_repeats: independent random removals per ``k`` (shared by every method and kind).
        seeds: retraining seeds; every removal (and the baseline) is retrained once per seed.
        seed: seed of the random removals.

    Returns:
        A :class:`DeletionPlan`.
    """
    if not scores:
        raise invalid("scores", {}, "at least one method's [Q, N] scores")
    ks = [k] if isinstance(k, int) else list(k)
    if not ks:
        raise invalid("k", k, "an integer or a non-empty list of integers")
    for size in ks:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size < n_train:
            raise invalid("k", size, f"integers between 1 and n_train - 1 = {n_train - 1}")
    shapes = {tuple(s.shape) for s in scores.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[1] != n_train:
        raise invalid("scores shapes", {m: tuple(s.shape) for m, s in scores.items()}, f"one shape (Q, {n_train}) for every method")
    for kind in kinds:
        if kind not in KINDS:
            raise invalid("kinds", list(kinds), "a list of 'proponents' and/or 'opponents'")
    check_positive_int("random_repeats", random_repeats)
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise invalid("seeds", seeds, "a non-empty list of distinct integers")
    top = {}
    for size in ks:
        for method, s in scores.items():
            for kind in kinds:
                top[(method, kind, size)] = top_k_indices(s.detach(), size, kind).tolist()
    random = {size: random_removals(n_train, size, random_repeats, seed + size) for size in ks}
    return DeletionPlan(n_train, next(iter(shapes))[0], seeds, list(kinds), ks, top, random)


def case_deletion(
    scores: Mapping[str, Tensor],
    *,
    retrain: Callable[[list[int]], nn.Module],
    measure: Callable[[nn.Module], Tensor],
    base: Tensor,
    n_train: int,
    k: int | Sequence[int],
    kinds: Sequence[str] = ("proponents",),
    random_repeats: int = 3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[DeletionResult]:
    """Retrain without each query's top-k examples (per method, kind and k) and without k random ones.

    Args:
        scores: ``{method: [Q, N]}`` attribution scores (positive = proponent).
        retrain: trains a fresh model on the kept training indices (sorted list) and returns it.
        measure: ``model -> [Q]`` each query's measurement (e.g. its loss; larger = worse).
        base: ``[Q]`` the measurement of the model trained on all data.
        n_train: ``N``, the training-set size.
        k: examples removed per retraining, or several values.
        kinds: any of ``"proponents"``, ``"opponents"``.
        random_repeats: independent random removals per ``k`` (shared by every method and kind).
        seed: seed of the random removals.
        log: optional progress callback.

    Returns:
        One :class:`DeletionResult` per (k, method, kind), in that nesting order; all results for
        one ``k`` share the same random retrainings.
    """
    n_query = int(base.shape[0])
    for method, s in scores.items():
        if tuple(s.shape) != (n_query, n_train):
            raise invalid(f"scores[{method!r}].shape", tuple(s.shape), f"({n_query}, {n_train}) = (len(base), n_train)")
    plan = plan_deletion(scores, n_train=n_train, k=k, kinds=kinds, random_repeats=random_repeats, seeds=[0], seed=seed)
    measured, retrainings = {}, plan.retrainings()
    for i, retraining in enumerate(progress(retrainings, desc="case deletion", unit="retraining")):
        if not retraining.removed:
            measured[retraining.key] = base.detach()  # the model trained on all data: no retraining
            continue
        if log:
            log(f"retraining {i}/{len(retrainings) - 1}: {len(retraining.removed)} examples removed")
        measured[retraining.key] = measure(retrain(retraining.keep(n_train))).detach()
    return plan.results(measured)
