"""Inverse-Hessian solvers against ``torch.linalg.solve`` on dense float64 matrices, on matrix
stand-ins (``zoo.MatrixObjective``) and on real objectives of tiny models."""

from __future__ import annotations

import pytest
import torch

from influence.exceptions import InvalidArgumentError, SolverDivergedError
from influence.gradients import Objective, select_parameters
from influence.solvers import (
    SOLVERS,
    ArnoldiSolver,
    ConjugateGradientSolver,
    EkfacSolver,
    ExactSolver,
    LissaSolver,
    make_solver,
)
from influence.task import ClassificationTask
from tests import zoo

P = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


def reference(matrix, rhs, damping=0.0):
    a = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return torch.linalg.solve(a, rhs.T).T


@pytest.fixture(scope="module")
def spd():
    return zoo.random_spd(P, low=0.2, high=4.0)


@pytest.fixture(scope="module")
def rhs():
    return torch.randn(4, P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


@pytest.fixture(scope="module")
def logistic_objective():
    model, data = zoo.logistic_regression(), zoo.tabular_dataset(n=24)
    return Objective(
        ClassificationTask(), model, data, ["weight", "bias"], batch_size=8,
        regularizer=zoo.proximity_penalty(model, alpha=0.05),
    )


@pytest.fixture(scope="module")
def mlp_objective():
    model, data = zoo.tanh_mlp(), zoo.tabular_dataset(n=16)
    return Objective(ClassificationTask(), model, data, select_parameters(model, "all"), batch_size=8)


# -- exact ------------------------------------------------------------------------------------


def test_exact_matches_linalg_solve(spd, rhs):
    solver = ExactSolver(damping=0.1).fit(zoo.MatrixObjective(spd))
    torch.testing.assert_close(solver.solve(rhs), reference(spd, rhs, 0.1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(solver.solve(rhs[0]), reference(spd, rhs, 0.1)[0], rtol=1e-10, atol=1e-12)
    assert solver.solve(rhs[:0]).shape == (0, P)


def test_exact_on_a_real_objective(logistic_objective):
    hessian = logistic_objective.hessian()
    rhs = logistic_objective.gradient()[None].repeat(2, 1) + 1.0
    got = make_solver("exact", damping=0.01).fit(logistic_objective).solve(rhs)
    torch.testing.assert_close(got, reference(hessian, rhs, 0.01), rtol=1e-9, atol=1e-12)


def test_exact_refuses_large_and_singular_problems(spd):
    with pytest.raises(InvalidArgumentError, match=f"P = {P}"):
        ExactSolver(max_parameters=P - 1).fit(zoo.MatrixObjective(spd))
    singular = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(SolverDivergedError, match="damping"):
        ExactSolver().fit(zoo.MatrixObjective(singular))
    with pytest.raises(InvalidArgumentError, match="fit"):
        ExactSolver().solve(torch.ones(2))


# -- conjugate gradient -----------------------------------------------------------------------


def test_cg_matches_exact(spd, rhs):
    objective = zoo.MatrixObjective(spd)
    solver = ConjugateGradientSolver(damping=0.05, rtol=1e-12, max_iterations=100).fit(objective)
    got = solver.solve(rhs)
    assert relative_error(got, reference(spd, rhs, 0.05)) < 1e-6
    assert all(solver.last_info["converged"])
    assert max(solver.last_info["iterations"]) <= P + 2
    assert solver.last_info["residual_history"][-1] == solver.last_info["relative_residuals"]


def test_cg_each_rhs_stops_on_its_own(spd):
    _, vectors = torch.linalg.eigh(spd)
    rhs = torch.stack([vectors[:, 0], vectors[:, 0] + vectors[:, 1] + vectors[:, 2], torch.zeros(P, dtype=torch.float64)])
    solver = ConjugateGradientSolver(rtol=1e-10).fit(zoo.MatrixObjective(spd))
    got = solver.solve(rhs)
    assert solver.last_info["iterations"] == [1, 3, 0]
    assert torch.equal(got[2], torch.zeros(P, dtype=torch.float64))
    assert relative_error(got[:2], reference(spd, rhs[:2])) < 1e-8


def test_cg_on_real_gauss_newton(mlp_objective):
    gn = mlp_objective.hessian(gauss_newton=True)
    rhs = torch.randn(3, gn.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solver = make_solver("cg", damping=0.01, gauss_newton=True, rtol=1e-10, max_iterations=200)
    got = solver.fit(mlp_objective).solve(rhs)
    assert relative_error(got, reference(gn, rhs, 0.01)) < 1e-6


def test_cg_raises_on_indefinite_hessian(mlp_objective):
    assert torch.linalg.eigvalsh(mlp_objective.hessian()).min() < 0
    indefinite = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    with pytest.raises(SolverDivergedError, match="gauss_newton"):
        ConjugateGradientSolver().fit(zoo.MatrixObjective(indefinite)).solve(torch.ones(3, dtype=torch.float64))
    rhs = torch.randn(4, mlp_objective.n_parameters, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(SolverDivergedError, match="damping"):
        ConjugateGradientSolver(max_iterations=200).fit(mlp_objective).solve(rhs)


def test_cg_reports_non_convergence(spd, rhs, caplog):
    solver = ConjugateGradientSolver(max_iterations=2, rtol=1e-12).fit(zoo.MatrixObjective(spd))
    solver.solve(rhs)
    assert not any(solver.last_info["converged"])
    assert "max_iterations" in caplog.text


# -- LiSSA ------------------------------------------------------------------------------------


def test_lissa_matches_exact(spd, rhs):
    solver = LissaSolver(damping=0.1, depth=400, scale=5.0).fit(zoo.MatrixObjective(spd))
    assert relative_error(solver.solve(rhs), reference(spd, rhs, 0.1)) < 1e-2
    estimated = LissaSolver(damping=0.1, depth=400).fit(zoo.MatrixObjective(spd))
    assert 4.0 / 2.2 < estimated.fitted_scale <= 1.1 * 4.1
    assert relative_error(estimated.solve(rhs), reference(spd, rhs, 0.1)) < 1e-2


def test_lissa_on_a_real_objective(logistic_objective):
    hessian = logistic_objective.hessian()
    rhs = torch.randn(2, hessian.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solver = LissaSolver(damping=0.1, depth=200, rtol=1e-6).fit(logistic_objective)
    assert relative_error(solver.solve(rhs), reference(hessian, rhs, 0.1)) < 1e-2
    assert solver.last_info["steps"][0] < 200
    # Stochastic steps (2 of the 3 data batches each): unbiased but noisy, hence the looser bound.
    stochastic = LissaSolver(damping=0.1, depth=80, batches_per_step=2).fit(logistic_objective)
    assert relative_error(stochastic.solve(rhs), reference(hessian, rhs, 0.1)) < 1e-1


def test_lissa_divergence_is_detected(spd, rhs):
    with pytest.raises(SolverDivergedError, match="scale"):
        LissaSolver(scale=1.0, depth=200).fit(zoo.MatrixObjective(spd)).solve(rhs)
    indefinite = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    with pytest.raises(SolverDivergedError, match="damping"):
        LissaSolver(depth=200).fit(zoo.MatrixObjective(indefinite)).solve(torch.ones(3, dtype=torch.float64))


# -- Arnoldi ----------------------------------------------------------------------------------


def test_arnoldi_full_rank_matches_exact(spd, rhs):
    solver = ArnoldiSolver(damping=0.1, n_iterations=P, top_k=P).fit(zoo.MatrixObjective(spd))
    assert solver.rank == P
    assert relative_error(solver.solve(rhs), reference(spd, rhs, 0.1)) < 1e-6
    torch.testing.assert_close(solver.eigenvalues.flip(0), torch.linalg.eigvalsh(spd), rtol=1e-8, atol=1e-10)
    scores = solver.project(rhs) @ solver.project(rhs).T
    torch.testing.assert_close(scores, rhs @ solver.solve(rhs).T, rtol=1e-10, atol=1e-12)


def test_arnoldi_on_a_real_objective(logistic_objective):
    hessian = logistic_objective.hessian()
    p = hessian.shape[0]
    rhs = torch.randn(2, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    solver = make_solver("arnoldi", damping=0.01, n_iterations=p, top_k=p).fit(logistic_objective)
    assert relative_error(solver.solve(rhs), reference(hessian, rhs, 0.01)) < 1e-6


def test_arnoldi_low_rank_keeps_top_positive_eigenpairs():
    values = torch.tensor([10.0, 8.0, -6.0, 0.01, 0.02, 0.03, 0.04, 0.05], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    matrix = (q * values) @ q.T
    solver = ArnoldiSolver(n_iterations=8, top_k=3).fit(zoo.MatrixObjective(matrix))
    torch.testing.assert_close(solver.eigenvalues, values[:2], rtol=1e-8, atol=1e-10)
    assert solver.project(torch.ones(5, 8, dtype=torch.float64)).shape == (5, 2)
    top = q[:, 0]
    torch.testing.assert_close(solver.solve(top), top / 10.0, rtol=1e-8, atol=1e-10)


def test_arnoldi_restarts_on_breakdown():
    values = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    objective = zoo.MatrixObjective(torch.diag(values))
    solver = ArnoldiSolver(n_iterations=5, top_k=5).fit(objective)
    assert solver.n_steps == 5 and objective.products == 5
    torch.testing.assert_close(solver.eigenvalues, values, rtol=1e-10, atol=1e-12)
    rhs = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(solver.solve(rhs), torch.diag(1 / values), rtol=1e-10, atol=1e-12)


# -- registry ---------------------------------------------------------------------------------


def test_make_solver_names_and_options():
    assert SOLVERS == ("exact", "cg", "lissa", "arnoldi", "ekfac")
    for name in SOLVERS:
        solver = make_solver(name, damping=0.5)
        assert solver.name == name and solver.damping == 0.5 and solver.arguments["solver"] == name
    with pytest.raises(InvalidArgumentError, match="'exact', 'cg', 'lissa', 'arnoldi', 'ekfac'"):
        make_solver("newton")
    with pytest.raises(InvalidArgumentError, match="max_iterations"):
        make_solver("cg", iterations=3)
    with pytest.raises(InvalidArgumentError, match="damping"):
        make_solver("cg", damping=-1.0)


# -- EKFAC ------------------------------------------------------------------------------------


def block_of(flat, names, layout, out_features):
    """Flat ``[n, P]`` -> ``[n, out, k]``: weight columns then (if selected) the bias column."""
    offsets = layout.offsets()
    parts = []
    for name in names:
        start, stop = offsets[name]
        parts.append(flat[:, start:stop].reshape(flat.shape[0], out_features, -1))
    return torch.cat(parts, dim=-1)


EKFAC_CASES = {
    "logistic": (zoo.logistic_regression, zoo.tabular_dataset, ["weight", "bias"], ""),
    "mlp-head": (zoo.tanh_mlp, zoo.tabular_dataset, ["head.weight", "head.bias"], "head"),
    "lm-output-weight": (zoo.tiny_language_model, zoo.token_dataset, ["output.weight"], "output"),
}


@pytest.mark.parametrize("case", sorted(EKFAC_CASES))
def test_ekfac_matches_its_definition(case):
    from influence.task import LanguageModelingTask

    make_model, make_data, names, module = EKFAC_CASES[case]
    model, data = make_model(), make_data()
    task = LanguageModelingTask() if case.startswith("lm") else ClassificationTask()
    objective = Objective(task, model, data, names, batch_size=5)
    solver = make_solver("ekfac", damping=0.01).fit(objective)
    (block,) = solver.blocks
    assert block.module == module
    out_features = block.out_features
    per_example = zoo.brute_per_example_gradients(task, model, data, names)
    g = block_of(per_example, names, objective.layout, out_features)
    # Corrected eigenvalues: the exact diagonal of the empirical Fisher in the Kronecker eigenbasis.
    expected = ((block.q_s.T @ g @ block.q_a) ** 2).mean(dim=0)
    torch.testing.assert_close(block.eigenvalues, expected, rtol=1e-9, atol=1e-14)
    # The factors' eigenvectors really diagonalise the factors.
    for factor, q in ((block.a_factor, block.q_a), (block.s_factor, block.q_s)):
        rotated = q.T @ factor @ q
        torch.testing.assert_close(rotated, torch.diag(torch.diagonal(rotated)), rtol=0, atol=1e-12)
    # solve applies Q_S ((Q_S^T X Q_A) / (Lambda + damping)) Q_A^T block-wise.
    rhs = torch.randn(3, objective.n_parameters, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = block_of(rhs, names, objective.layout, out_features)
    want = block.q_s @ ((block.q_s.T @ x @ block.q_a) / (block.eigenvalues + 0.01)) @ block.q_a.T
    torch.testing.assert_close(block_of(solver.solve(rhs), names, objective.layout, out_features), want,
                               rtol=1e-10, atol=1e-12)


def test_ekfac_factors_of_logistic_regression():
    model, data = zoo.logistic_regression(), zoo.tabular_dataset()
    task = ClassificationTask()
    objective = Objective(task, model, data, ["weight", "bias"], batch_size=7)
    (block,) = EkfacSolver(damping=0.1).fit(objective).blocks
    x, _ = data.tensors
    a = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(block.a_factor, a.T @ a / len(x), rtol=1e-10, atol=1e-12)
    g = zoo.brute_per_example_gradients(task, model, data, ["bias"])
    torch.testing.assert_close(block.s_factor, g.T @ g / len(x), rtol=1e-10, atol=1e-12)


def test_ekfac_refusals():
    logistic = Objective(ClassificationTask(), zoo.logistic_regression(), zoo.tabular_dataset(n=8), ["weight", "bias"])
    with pytest.raises(SolverDivergedError, match="damping"):
        EkfacSolver().fit(logistic)
