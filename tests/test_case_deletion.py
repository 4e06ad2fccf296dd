"""Case deletion against retraining done by hand on a tiny least-squares problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from influence.evaluation.case_deletion import case_deletion, random_removals, t_quantile_95, top_k_indices
from influence.exceptions import InvalidArgumentError


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(40, generator=g, dtype=torch.float64)
    xq = torch.randn(3, 3, generator=g, dtype=torch.float64)
    yq = xq @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return x, y, xq, yq


def _fit(x, y):
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution.T)
    return model


def test_matches_retraining_by_hand():
    x, y, xq, yq = _problem()

    def retrain(keep):
        return _fit(x[keep], y[keep])

    def measure(model):
        return ((model(xq).squeeze(1) - yq) ** 2).detach()

    base = measure(_fit(x, y))
    scores = {"a": torch.randn(3, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    result, opponents = case_deletion(scores, retrain=retrain, measure=measure, base=base, n_train=40, k=5,
                                      kinds=("proponents", "opponents"), random_repeats=2, seed=3)
    for q in range(3):
        removed = scores["a"][q].topk(5).indices.tolist()
        keep = sorted(set(range(40)) - set(removed))
        expected = float(measure(_fit(x[keep], y[keep]))[q] - base[q])
        assert result.delta_top[q] == pytest.approx(expected, rel=1e-10, abs=1e-12)
    for q in range(3):
        removed = scores["a"][q].topk(5, largest=False).indices.tolist()
        keep = sorted(set(range(40)) - set(removed))
        expected = float(measure(_fit(x[keep], y[keep]))[q] - base[q])
        assert opponents.delta_top[q] == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert opponents.delta_random == result.delta_random and opponents.kind == "opponents"
    for r, removed in enumerate(random_removals(40, 5, 2, 3 + 5)):
        keep = sorted(set(range(40)) - set(removed))
        expected = (measure(_fit(x[keep], y[keep])) - base).tolist()
        assert result.delta_random[r] == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert result.mean_top == pytest.approx(sum(result.delta_top) / 3)
    assert result.to_dict()["passed"] == result.passed


def test_ideal_scores_beat_random():
    """Scores = the actual leave-one-out change of each query's loss must pass the check."""
    x, y, xq, yq = _problem()

    def measure(model):
        return ((model(xq).squeeze(1) - yq) ** 2).detach()

    base = measure(_fit(x, y))
    loo = torch.stack([measure(_fit(x[[j for j in range(40) if j != i]], y[[j for j in range(40) if j != i]])) - base for i in range(40)], 1)
    proponents, opponents = case_deletion(
        {"loo": loo}, retrain=lambda keep: _fit(x[keep], y[keep]), measure=measure, base=base,
        n_train=40, k=4, kinds=("proponents", "opponents"), random_repeats=3, seed=0,
    )
    assert proponents.passed and proponents.mean_top > proponents.mean_random
    assert opponents.mean_top < proponents.mean_top  # the least helpful examples hurt least when removed


def test_interval_is_the_student_t_interval_of_per_query_differences():
    from influence.evaluation.case_deletion import DeletionResult

    result = DeletionResult("m", 3, [1.0, 2.0, 3.0], [[0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    assert result.differences() == [1.0, 1.0, 2.0]
    low, high = result.interval()
    mean, sd = 4 / 3, (((1 - 4 / 3) ** 2 * 2 + (2 - 4 / 3) ** 2) / 2) ** 0.5
    t2 = 4.302652729749462  # Student's t, 0.975 quantile, 2 degrees of freedom (tables: 4.303)
    assert low == pytest.approx(mean - t2 * sd / 3 ** 0.5, rel=1e-12)
    assert high == pytest.approx(mean + t2 * sd / 3 ** 0.5, rel=1e-12)
    assert result.passed == (low > 0)
    assert DeletionResult("m", 3, [1.0], [[0.0]]).interval() == (float("-inf"), float("inf"))


@pytest.mark.parametrize("df", [1, 7, 30, 31, 100])
def test_t_quantile_is_scipys_student_t(df):
    from scipy.stats import t

    assert t_quantile_95(df) == float(t.ppf(0.975, df))


def test_t_quantile_rounds_to_the_printed_tables_and_refuses_bad_degrees_of_freedom():
    # the printed 95% tables (3 decimals) that the code used before, up to 30 degrees of freedom; beyond,
    # it used the normal 1.96, which made the interval of 32 queries about 4% too narrow
    table = {1: 12.706, 2: 4.303, 7: 2.365, 15: 2.131, 29: 2.045, 30: 2.042, 31: 2.040, 100: 1.984}
    assert {df: round(t_quantile_95(df), 3) for df in table} == table
    assert t_quantile_95(31) / 1.96 == pytest.approx(1.0406, abs=1e-4)
    assert t_quantile_95(10**6) == pytest.approx(1.959966, abs=1e-5)
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(InvalidArgumentError, match="degrees_of_freedom"):
            t_quantile_95(bad)


def test_interval_of_known_samples_computed_by_hand():
    from influence.evaluation.case_deletion import DeletionResult

    # 8 queries (7 degrees of freedom), random removals changing nothing: d = 1..8, mean 4.5,
    # sd = sqrt(42 / 7) = sqrt(6), half-width t_7 sqrt(6) / sqrt(8) with t_7 = 2.3646242515927849
    eight = DeletionResult("m", 1, [float(i) for i in range(1, 9)], [[0.0] * 8])
    half = 2.3646242515927849 * (6 / 8) ** 0.5
    assert eight.interval() == pytest.approx((4.5 - half, 4.5 + half), rel=1e-14)
    assert eight.interval()[0] == pytest.approx(2.4521753277158833, rel=1e-14) and eight.passed
    # 32 queries (31 degrees of freedom): d alternates 0 and 1 (mean 1/2, sd^2 = 8 / 31), t_31 = 2.0395134463964077
    thirty_two = DeletionResult("m", 1, [float(i % 2) for i in range(32)], [[0.0] * 32])
    half = 2.0395134463964077 * (8 / 31) ** 0.5 / 32 ** 0.5
    assert thirty_two.interval() == pytest.approx((0.5 - half, 0.5 + half), rel=1e-14)
    assert thirty_two.to_dict()["interval_low"] == pytest.approx(0.5 - half, rel=1e-14)


def test_random_removals_are_seeded_and_distinct():
    a, b = random_removals(100, 10, 3, seed=5), random_removals(100, 10, 3, seed=5)
    assert a == b and all(len(set(r)) == 10 for r in a)
    assert random_removals(100, 10, 1, seed=6) != a[:1]


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="k=0"):
        top_k_indices(torch.zeros(2, 5), 0)
    with pytest.raises(InvalidArgumentError, match="scores\\['m'\\].shape"):
        case_deletion({"m": torch.zeros(2, 4)}, retrain=lambda k: None, measure=lambda m: None, base=torch.zeros(3), n_train=4, k=1)
    with pytest.raises(InvalidArgumentError, match="kind"):
        top_k_indices(torch.zeros(2, 5), 1, "neutral")


# -- the plan: independent retrainings, several seeds, a second measurement -----------------------


def _fit_seeded(x, y, seed):
    """Least squares plus a seed-dependent offset: a 'training' whose outcome depends on its seed."""
    model = _fit(x, y)
    with torch.no_grad():
        model.weight.add_(0.05 * torch.randn(1, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return model


def test_plan_matches_retraining_by_hand_over_seeds():
    from influence.evaluation.case_deletion import Retraining, plan_deletion

    x, y, xq, yq = _problem()

    def measure(model):
        loss = ((model(xq).squeeze(1) - yq) ** 2).detach()
        return torch.stack([loss, torch.exp(-loss)], dim=1)

    scores = {"a": torch.randn(3, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
              "b": torch.randn(3, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)}
    plan = plan_deletion(scores, n_train=40, k=[3, 6], kinds=("proponents", "opponents"), random_repeats=2,
                         seeds=[7, 8], seed=3)
    retrainings = plan.retrainings()
    assert retrainings[:2] == [Retraining((), 7), Retraining((), 8)]  # the baselines first
    assert len({r.key for r in retrainings}) == len(retrainings)  # distinct, each once
    measured = {r.key: measure(_fit_seeded(x[r.keep(40)], y[r.keep(40)], r.seed)) for r in reversed(retrainings)}
    results = plan.results(measured, extra_name="probability")
    assert [(c.k, c.method, c.kind) for c in results] == [
        (k, m, kind) for k in (3, 6) for m in ("a", "b") for kind in ("proponents", "opponents")]

    def by_hand(removed, q, column):
        keep = sorted(set(range(40)) - set(removed))
        return sum(float(measure(_fit_seeded(x[keep], y[keep], s))[q, column] - measure(_fit_seeded(x, y, s))[q, column])
                   for s in (7, 8)) / 2

    for check in results:
        top = top_k_indices(scores[check.method], check.k, check.kind)
        for q in range(3):
            assert check.removed_top[q] == top[q].tolist()
            assert check.delta_top[q] == pytest.approx(by_hand(top[q].tolist(), q, 0), rel=1e-10, abs=1e-12)
            assert check.extra_top[q] == pytest.approx(by_hand(top[q].tolist(), q, 1), rel=1e-10, abs=1e-12)
        for r, removed in enumerate(random_removals(40, check.k, 2, 3 + check.k)):
            assert check.delta_random[r] == pytest.approx([by_hand(removed, q, 0) for q in range(3)], rel=1e-10, abs=1e-12)
        assert check.extra_name == "probability" and "extra_mean_top" in check.to_dict()


def test_plan_with_one_seed_and_the_base_model_equals_case_deletion():
    from influence.evaluation.case_deletion import plan_deletion

    x, y, xq, yq = _problem()

    def measure(model):
        return ((model(xq).squeeze(1) - yq) ** 2).detach()

    scores = {"a": torch.randn(3, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    expected = case_deletion(scores, retrain=lambda keep: _fit(x[keep], y[keep]), measure=measure, base=measure(_fit(x, y)),
                             n_train=40, k=[4, 8], kinds=("proponents", "opponents"), random_repeats=2, seed=5)
    plan = plan_deletion(scores, n_train=40, k=[4, 8], kinds=("proponents", "opponents"), random_repeats=2, seeds=[0], seed=5)
    found = plan.results({r.key: measure(_fit(x[r.keep(40)], y[r.keep(40)])) for r in plan.retrainings()})
    for a, b in zip(found, expected, strict=True):
        assert (a.method, a.k, a.kind, a.removed_top) == (b.method, b.k, b.kind, b.removed_top)
        assert a.delta_top == pytest.approx(b.delta_top, rel=1e-10, abs=1e-12)
        for row_a, row_b in zip(a.delta_random, b.delta_random, strict=True):
            assert row_a == pytest.approx(row_b, rel=1e-10, abs=1e-12)
        assert a.extra_name == "" and a.passed == b.passed


def test_plan_refuses_bad_arguments_and_missing_measurements():
    from influence.evaluation.case_deletion import Retraining, plan_deletion

    scores = {"a": torch.zeros(2, 10)}
    with pytest.raises(InvalidArgumentError, match="k"):
        plan_deletion(scores, n_train=10, k=10)
    with pytest.raises(InvalidArgumentError, match="seeds"):
        plan_deletion(scores, n_train=10, k=2, seeds=[1, 1])
    with pytest.raises(InvalidArgumentError, match="scores shapes"):
        plan_deletion({"a": torch.zeros(2, 10), "b": torch.zeros(3, 10)}, n_train=10, k=2)
    plan = plan_deletion(scores, n_train=10, k=2, seeds=[0])
    measured = {r.key: torch.zeros(2) for r in plan.retrainings()}
    missing = plan.retrainings()[-1]
    del measured[missing.key]
    with pytest.raises(InvalidArgumentError, match=missing.key):
        plan.results(measured)
    measured[missing.key] = torch.zeros(3)
    with pytest.raises(InvalidArgumentError, match="shape"):
        plan.results(measured)
    assert Retraining((1, 2), 0).key == Retraining((1, 2), 0).key != Retraining((1, 2), 1).key


def test_random_scores_fail_the_check_and_leave_one_out_scores_pass_it():
    """Negative control: scores unrelated to the data pass no more often than the 95% interval allows
    (10 draws, at most 2 passes), while the actual leave-one-out changes of the same problem pass."""
    g = torch.Generator().manual_seed(11)
    truth = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = x @ truth + 0.5 * torch.randn(60, generator=g, dtype=torch.float64)
    xq = torch.randn(12, 3, generator=g, dtype=torch.float64)
    yq = xq @ truth

    def measure(model):
        return ((model(xq).squeeze(1) - yq) ** 2).detach()

    def check(scores, seed):
        return case_deletion({"s": scores}, retrain=lambda keep: _fit(x[keep], y[keep]), measure=measure, base=base,
                             n_train=60, k=6, kinds=("proponents",), random_repeats=3, seed=seed)[0]

    base = measure(_fit(x, y))
    random_passes = [check(torch.randn(12, 60, generator=torch.Generator().manual_seed(100 + d), dtype=torch.float64), d).passed
                     for d in range(10)]
    assert sum(random_passes) <= 2, random_passes
    loo = torch.stack([measure(_fit(x[[j for j in range(60) if j != i]], y[[j for j in range(60) if j != i]])) - base
                       for i in range(60)], 1)
    assert all(check(loo, seed).passed for seed in range(3))
