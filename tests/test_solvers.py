"""Inverse-Hessian solvers against ``torch.linalg.solve`` on dense float64 matrices, on matrix
stand-ins (``zoo.MatrixObjective``) and on real objectives of tiny models.

The acceptance tests run on every device of ``zoo.DEVICES`` (CUDA ones are ``gpu``-marked): the
solver and its objective live on the device, the dense reference is solved on the CPU."""

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


pytestmark = pytest.mark.usefixtures("one_thread")


def relative_error(actual, expected):
    actual, expected = actual.cpu(), expected.cpu()
    return float((actual - expected).norm() / expected.norm())


def reference(matrix, rhs, damping=0.0):
    """``(matrix + damping I)^{-1} rhs`` by ``torch.linalg.solve``, on the CPU."""
    matrix, rhs = matrix.cpu(), rhs.cpu()
    a = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return torch.linalg.solve(a, rhs.T).T


@pytest.fixture(scope="module")
def spd():
    return zoo.random_spd(P, low=0.2, high=4.0)


@pytest.fixture(scope="module")
def rhs():
    return torch.randn(4, P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def make_logistic_objective(device="cpu"):
    model, data = zoo.on_device(zoo.logistic_regression(), device), zoo.tabular_dataset(n=24)
    return Objective(
        ClassificationTask(), model, data, ["weight", "bias"], batch_size=8, device=device,
        regularizer=zoo.proximity_penalty(model, alpha=0.05),
    )


def make_mlp_objective(device="cpu"):
    model, data = zoo.on_device(zoo.tanh_mlp(), device), zoo.tabular_dataset(n=16)
    return Objective(ClassificationTask(), model, data, select_parameters(model, "all"), batch_size=8,
                     device=device)


@pytest.fixture(scope="module")
def logistic_objective():
    return make_logistic_objective()


@pytest.fixture(scope="module")
def mlp_objective():
    return make_mlp_objective()


def objective_on(device, cpu_objective, make):
    """The CPU fixture's objective, or a fresh one on ``device``."""
    return cpu_objective if device == "cpu" else make(device)


# -- exact ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_exact_matches_linalg_solve(spd, rhs, device):
    solver = ExactSolver(damping=0.1).fit(zoo.MatrixObjective(spd.to(device)))
    got = solver.solve(rhs.to(device))
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), reference(spd, rhs, 0.1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(solver.solve(rhs[0]).cpu(), reference(spd, rhs, 0.1)[0], rtol=1e-10,
                               atol=1e-12)
    assert solver.solve(rhs[:0]).shape == (0, P)


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_exact_on_a_real_objective(logistic_objective, device):
    hessian = logistic_objective.hessian()
    rhs = logistic_objective.gradient()[None].repeat(2, 1) + 1.0
    objective = objective_on(device, logistic_objective, make_logistic_objective)
    got = make_solver("exact", damping=0.01).fit(objective).solve(rhs)
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), reference(hessian, rhs, 0.01), rtol=1e-9, atol=1e-12)


def test_exact_refuses_large_and_singular_problems(spd):
    with pytest.raises(InvalidArgumentError, match=f"P = {P}"):
        ExactSolver(max_parameters=P - 1).fit(zoo.MatrixObjective(spd))
    singular = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(SolverDivergedError, match="damping"):
        ExactSolver().fit(zoo.MatrixObjective(singular))
    with pytest.raises(InvalidArgumentError, match="fit"):
        ExactSolver().solve(torch.ones(2))


# -- conjugate gradient -----------------------------------------------------------------------


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_cg_matches_exact(spd, rhs, device):
    objective = zoo.MatrixObjective(spd.to(device))
    solver = ConjugateGradientSolver(damping=0.05, rtol=1e-12, max_iterations=100).fit(objective)
    got = solver.solve(rhs.to(device))
    assert got.device.type == device
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


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_cg_on_real_gauss_newton(mlp_objective, device):
    gn = mlp_objective.hessian(gauss_newton=True)
    rhs = torch.randn(3, gn.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solver = make_solver("cg", damping=0.01, gauss_newton=True, rtol=1e-10, max_iterations=200)
    got = solver.fit(objective_on(device, mlp_objective, make_mlp_objective)).solve(rhs)
    assert got.device.type == device
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


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_lissa_matches_exact(spd, rhs, device):
    solver = LissaSolver(damping=0.1, depth=400, scale=5.0).fit(zoo.MatrixObjective(spd.to(device)))
    solved = solver.solve(rhs)
    assert solved.device.type == device
    assert relative_error(solved, reference(spd, rhs, 0.1)) < 1e-2
    estimated = LissaSolver(damping=0.1, depth=400).fit(zoo.MatrixObjective(spd.to(device)))
    assert 4.0 / 2.2 < estimated.fitted_scale <= 1.1 * 4.1
    assert relative_error(estimated.solve(rhs), reference(spd, rhs, 0.1)) < 1e-2


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_lissa_on_a_real_objective(logistic_objective, device):
    hessian = logistic_objective.hessian()
    rhs = torch.randn(2, hessian.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    objective = objective_on(device, logistic_objective, make_logistic_objective)
    solver = LissaSolver(damping=0.1, depth=200, rtol=1e-6).fit(objective)
    solved = solver.solve(rhs)
    assert solved.device.type == device
    assert relative_error(solved, reference(hessian, rhs, 0.1)) < 1e-2
    assert solver.last_info["steps"][0] < 200
    # Stochastic steps (2 of the 3 data batches each): unbiased but noisy, hence the looser bound.
    stochastic = LissaSolver(damping=0.1, depth=80, batches_per_step=2).fit(objective)
    assert relative_error(stochastic.solve(rhs), reference(hessian, rhs, 0.1)) < 1e-1


def test_lissa_divergence_is_detected(spd, rhs):
    with pytest.raises(SolverDivergedError, match="scale"):
        LissaSolver(scale=1.0, depth=200).fit(zoo.MatrixObjective(spd)).solve(rhs)
    indefinite = torch.diag(torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64))
    with pytest.raises(SolverDivergedError, match="damping"):
        LissaSolver(depth=200).fit(zoo.MatrixObjective(indefinite)).solve(torch.ones(3, dtype=torch.float64))


# -- Arnoldi ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_arnoldi_full_rank_matches_exact(spd, rhs, device):
    solver = ArnoldiSolver(damping=0.1, n_iterations=P, top_k=P, complement="none").fit(zoo.MatrixObjective(spd.to(device)))
    assert solver.rank == P
    solved = solver.solve(rhs)
    assert solved.device.type == device
    assert relative_error(solved, reference(spd, rhs, 0.1)) < 1e-6
    torch.testing.assert_close(solver.eigenvalues.flip(0).cpu(), torch.linalg.eigvalsh(spd), rtol=1e-8,
                               atol=1e-10)
    scores = solver.project(rhs) @ solver.project(rhs).T
    torch.testing.assert_close(scores.cpu(), rhs @ solved.cpu().T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_arnoldi_on_a_real_objective(logistic_objective, device):
    hessian = logistic_objective.hessian()
    p = hessian.shape[0]
    rhs = torch.randn(2, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    objective = objective_on(device, logistic_objective, make_logistic_objective)
    solver = make_solver("arnoldi", damping=0.01, n_iterations=p, top_k=p, complement="none").fit(objective)
    solved = solver.solve(rhs)
    assert solved.device.type == device
    assert relative_error(solved, reference(hessian, rhs, 0.01)) < 1e-6


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_arnoldi_low_rank_keeps_top_positive_eigenpairs(device):
    # top_k = 3 keeps the 3 largest positive eigenvalues (10, 8 and 0.05): the negative -6 is
    # larger in magnitude than 0.05 but is never kept.
    values = torch.tensor([10.0, 8.0, -6.0, 0.01, 0.02, 0.03, 0.04, 0.05], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    matrix = (q * values) @ q.T
    solver = ArnoldiSolver(n_iterations=8, top_k=3, complement="none").fit(zoo.MatrixObjective(matrix.to(device)))
    assert solver.rank == 3
    torch.testing.assert_close(solver.eigenvalues.cpu(), values[[0, 1, 7]], rtol=1e-8, atol=1e-10)
    assert solver.project(torch.ones(5, 8, dtype=torch.float64)).shape == (5, 3)
    for column, value in ((0, 10.0), (1, 8.0), (7, 0.05)):
        top = q[:, column]
        torch.testing.assert_close(solver.solve(top).cpu(), top / value, rtol=1e-8, atol=1e-10)
    zero = torch.zeros(8, dtype=torch.float64)
    torch.testing.assert_close(solver.solve(q[:, 2]).cpu(), zero, rtol=0, atol=1e-10)  # -6 is not kept
    negative = zoo.MatrixObjective(-torch.eye(3, dtype=torch.float64, device=device))
    with pytest.raises(InvalidArgumentError, match="no positive eigenvalue"):
        ArnoldiSolver(n_iterations=3, top_k=2, complement="none").fit(negative)


def test_arnoldi_restarts_on_breakdown():
    values = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    objective = zoo.MatrixObjective(torch.diag(values))
    solver = ArnoldiSolver(n_iterations=5, top_k=5, complement="none").fit(objective)
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


@pytest.mark.parametrize("device", zoo.DEVICES)
@pytest.mark.parametrize("case", sorted(EKFAC_CASES))
def test_ekfac_matches_its_definition(case, device):
    from influence.task import LanguageModelingTask

    make_model, make_data, names, module = EKFAC_CASES[case]
    model, data = make_model(), make_data()
    task = LanguageModelingTask() if case.startswith("lm") else ClassificationTask()
    objective = Objective(task, zoo.on_device(model, device), data, names, batch_size=5, device=device)
    solver = make_solver("ekfac", damping=0.01, gauss_newton=False).fit(objective)
    (block,) = solver.blocks
    assert block.module == module and block.eigenvalues.device.type == device
    out_features = block.out_features
    q_a, q_s, eigenvalues = block.q_a.cpu(), block.q_s.cpu(), block.eigenvalues.cpu()
    per_example = zoo.brute_per_example_gradients(task, model, data, names)
    g = block_of(per_example, names, objective.layout, out_features)
    # Corrected eigenvalues: the exact diagonal of the empirical Fisher in the Kronecker eigenbasis.
    expected = ((q_s.T @ g @ q_a) ** 2).mean(dim=0)
    torch.testing.assert_close(eigenvalues, expected, rtol=1e-9, atol=1e-14)
    # The factors' eigenvectors really diagonalise the factors.
    for factor, q in ((block.a_factor.cpu(), q_a), (block.s_factor.cpu(), q_s)):
        rotated = q.T @ factor @ q
        torch.testing.assert_close(rotated, torch.diag(torch.diagonal(rotated)), rtol=0, atol=1e-12)
    # solve applies Q_S ((Q_S^T X Q_A) / (Lambda + damping)) Q_A^T block-wise.
    rhs = torch.randn(3, objective.n_parameters, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = block_of(rhs, names, objective.layout, out_features)
    want = q_s @ ((q_s.T @ x @ q_a) / (eigenvalues + 0.01)) @ q_a.T
    torch.testing.assert_close(block_of(solver.solve(rhs).cpu(), names, objective.layout, out_features), want,
                               rtol=1e-10, atol=1e-12)
    # Scoring in the eigenbasis (both sides rotated from layer inputs and output gradients) equals
    # q^T (C + damping I)^{-1} g with the parameter-basis gradients (the LM case has several positions).
    measured = zoo.brute_per_example_gradients(task, model, data, names, kind="measurement")
    expected_scores = solver.solve(measured).cpu() @ per_example.T
    rotated = {kind: torch.cat([solver.rotated_gradients(b, kind) for b in objective.batches]).cpu()
               for kind in ("measurement", "train_loss")}
    scores = (rotated["measurement"] * solver.inverse_eigenvalues().cpu()) @ rotated["train_loss"].T
    torch.testing.assert_close(scores, expected_scores, rtol=1e-9, atol=1e-12 * float(expected_scores.abs().max()))
    assert solver.rotates_gradients


def test_ekfac_factors_of_logistic_regression():
    model, data = zoo.logistic_regression(), zoo.tabular_dataset()
    task = ClassificationTask()
    objective = Objective(task, model, data, ["weight", "bias"], batch_size=7)
    (block,) = EkfacSolver(damping=0.1, gauss_newton=False).fit(objective).blocks
    x, _ = data.tensors
    a = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(block.a_factor, a.T @ a / len(x), rtol=1e-10, atol=1e-12)
    g = zoo.brute_per_example_gradients(task, model, data, ["bias"])
    torch.testing.assert_close(block.s_factor, g.T @ g / len(x), rtol=1e-10, atol=1e-12)


def test_ekfac_refusals():
    logistic = Objective(ClassificationTask(), zoo.logistic_regression(), zoo.tabular_dataset(n=8), ["weight", "bias"])
    with pytest.raises(SolverDivergedError, match="damping"):
        EkfacSolver(gauss_newton=False).fit(logistic)
