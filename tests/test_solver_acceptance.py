"""Acceptance of the approximate solvers against the exact one on tiny float64 models.

- Arnoldi with ``top_k = P/5`` on a trained tanh MLP: influence scores ``q (G + damping)^-1 z^T``
  (Gauss-Newton ``G``, which is positive semi-definite, so dropping the smallest Ritz values drops
  only the flattest directions) track the exact solver's.
- EKFAC with ``gauss_newton=True`` equals the exact Gauss-Newton solver where the Kronecker
  factorisation is exact (one linear layer with the same output Hessian for every example, or with
  one example), matches its definition (the diagonal of the exact Gauss-Newton block in the
  Kronecker eigenbasis) on an MLP, an embedding model and a sequence model, and its scores track
  exact Gauss-Newton scores on an MLP and on an embedding + mean-pool + linear model.

Each test runs on every device of ``zoo.DEVICES`` (CUDA ones are ``gpu``-marked): the solver under
test is fitted to an objective on that device, the exact reference to one on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influence.exceptions import InvalidArgumentError
from influence.gradients import Objective, select_parameters
from influence.gradients.per_example import gradient_matrix
from influence.solvers import ArnoldiSolver, EkfacSolver, ExactSolver
from influence.task import ClassificationTask, LanguageModelingTask, Task, split_inputs_labels
from tests import zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def trained_mlp(steps: int, n_features: int = 8, hidden: int = 20, n_classes: int = 4, n: int = 40):
    """A tanh MLP (P = 264 by default) after ``steps`` of full-batch gradient descent."""
    model = zoo.tanh_mlp(n_features=n_features, hidden=hidden, n_classes=n_classes, seed=0)
    data = zoo.tabular_dataset(n=n, n_features=n_features, n_classes=n_classes, seed=1)
    x, y = data.tensors
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    queries = zoo.tabular_dataset(n=5, n_features=n_features, n_classes=n_classes, seed=7)
    return model, data, queries


def objectives(task, model, data, names, device, **options):
    """An objective on the CPU (for the exact reference) and one on ``device`` (for the solver)."""
    cpu = Objective(task, model, data, names, **options)
    if device == "cpu":
        return cpu, cpu
    return cpu, Objective(task, zoo.on_device(model, device), data, names, device=device, **options)


def gradients(task, model, train, queries, names):
    """Training-loss gradients ``[n, P]`` and query-measurement gradients ``[m, P]``."""
    g = gradient_matrix(task, model, train, names, batch_size=64)
    q = gradient_matrix(task, model, queries, names, kind="measurement", batch_size=64)
    return g, q


def block_index(objective: Objective, block) -> torch.Tensor:
    """Flat parameter offsets of an EKFAC block's entries, row-major over ``[out, width]``."""
    offsets = objective.layout.offsets()
    out, width = block.out_features, block.width
    index = torch.empty(out, width, dtype=torch.long)
    if block.kind == "embedding":  # block = weight^T, weight [vocab, dim] row-major
        start, _ = offsets[block.weight]
        vocab = torch.arange(block.in_features)
        return (start + vocab[None, :] * out + torch.arange(out)[:, None]).reshape(-1)
    column = 0
    if block.weight:
        start, _ = offsets[block.weight]
        index[:, : block.in_features] = start + torch.arange(out * block.in_features).reshape(out, -1)
        column = block.in_features
    if block.bias:
        start, _ = offsets[block.bias]
        index[:, column] = start + torch.arange(out)
    return index.reshape(-1)


def assert_eigenvalues_are_gauss_newton_diagonal(objective: Objective, solver: EkfacSolver) -> None:
    """Lambda = diag((Q_S kron Q_A)^T G_block (Q_S kron Q_A)) for every block, G the exact Gauss-Newton."""
    gn = objective.hessian(gauss_newton=True).cpu()
    for block in solver.blocks:
        index = block_index(objective, block)
        g_block = gn[index][:, index]
        q_a = torch.eye(block.width, dtype=gn.dtype) if block.q_a is None else block.q_a.cpu()
        basis = torch.kron(block.q_s.cpu().contiguous(), q_a.contiguous())
        expected = torch.diagonal(basis.T @ g_block @ basis).reshape(block.out_features, block.width)
        torch.testing.assert_close(block.eigenvalues.cpu(), expected, rtol=1e-8, atol=1e-13)


class SquaredLossTask(Task):
    """Regression: ``outputs`` ``[B, C]``, per-example loss ``0.5 ||outputs - y||^2`` (``H_out = I``)."""

    def train_loss(self, model, batch):
        return self.loss_from_outputs(self.outputs(model, batch), batch)

    def outputs(self, model, batch):
        inputs, _ = split_inputs_labels(batch)
        return model(inputs)

    def loss_from_outputs(self, outputs, batch):
        _, targets = split_inputs_labels(batch)
        return 0.5 * ((outputs - targets) ** 2).sum(dim=1)


# -- Arnoldi ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_arnoldi_low_rank_scores_track_exact_gauss_newton(device):
    model, train, queries = trained_mlp(steps=300)
    task = ClassificationTask()
    names = select_parameters(model, "all")
    objective, on_device = objectives(task, model, train, names, device, batch_size=40)
    p = objective.n_parameters
    top_k = p // 5
    g, q = gradients(task, model, train, queries, names)
    exact = ExactSolver(damping=1e-2, gauss_newton=True).fit(objective)
    arnoldi = ArnoldiSolver(damping=1e-2, gauss_newton=True, top_k=top_k, n_iterations=5 * top_k // 2, complement="none")
    arnoldi.fit(on_device)
    assert (p, arnoldi.rank) == (264, top_k)
    reference = exact.solve(q) @ g.T
    solved = arnoldi.solve(q)
    assert solved.device.type == device
    scores = solved.cpu() @ g.T
    assert pearson(scores, reference) >= 0.95  # measured 0.989
    projected = arnoldi.project(q) @ arnoldi.project(g).T
    torch.testing.assert_close(projected.cpu(), scores, rtol=1e-9, atol=1e-12)


# -- EKFAC: exact where K-FAC is exact ---------------------------------------------------------


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_ekfac_gauss_newton_is_exact_for_linear_regression(device):
    # One linear layer, squared loss: every example has H_out = I, so the Hessian is exactly
    # I kron E[a a^T] (plus the bias), a Kronecker product that EKFAC represents without error.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randn(20, 3, generator=g, dtype=torch.float64)
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(torch.float64)
    task = SquaredLossTask()
    objective, on_device = objectives(task, model, data, ["weight", "bias"], device, batch_size=7)
    rhs = torch.randn(4, objective.n_parameters, generator=g, dtype=torch.float64)
    exact = ExactSolver(damping=1e-3, gauss_newton=True).fit(objective).solve(rhs)
    hessian = ExactSolver(damping=1e-3).fit(objective).solve(rhs)
    torch.testing.assert_close(hessian, exact, rtol=1e-9, atol=1e-12)
    ekfac = EkfacSolver(damping=1e-3, gauss_newton=True).fit(on_device)
    solved = ekfac.solve(rhs)
    assert solved.device.type == device
    assert relative_error(solved.cpu(), exact) < 1e-8
    identity = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(ekfac.blocks[0].s_factor.cpu(), identity / 3, rtol=1e-10, atol=1e-12)
    # The empirical Fisher (outer products of residual-weighted gradients) is not the Hessian here.
    fisher = EkfacSolver(damping=1e-3, gauss_newton=False).fit(on_device)
    assert relative_error(fisher.solve(rhs).cpu(), exact) > 1e-2


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_ekfac_gauss_newton_is_exact_for_one_example(device):
    # One example at one position: G = H_1 kron a a^T for any convex loss (here cross-entropy,
    # H_1 = diag(p) - p p^T), again an exact Kronecker product.
    model, data = zoo.logistic_regression(), zoo.tabular_dataset(n=1)
    objective, on_device = objectives(ClassificationTask(), model, data, ["weight", "bias"], device)
    generator = torch.Generator().manual_seed(1)
    rhs = torch.randn(3, objective.n_parameters, generator=generator, dtype=torch.float64)
    exact = ExactSolver(damping=0.1, gauss_newton=True).fit(objective).solve(rhs)
    ekfac = EkfacSolver(damping=0.1, gauss_newton=True).fit(on_device).solve(rhs)
    assert ekfac.device.type == device
    assert relative_error(ekfac.cpu(), exact) < 1e-8


# -- EKFAC: definition of the Gauss-Newton variant ---------------------------------------------


DEFINITION_CASES = {
    "mlp": (lambda: zoo.tanh_mlp(), lambda: zoo.tabular_dataset(n=12), ClassificationTask, "all"),
    "text-classifier": (
        lambda: zoo.tiny_text_classifier(), lambda: zoo.text_dataset(n=10), ClassificationTask, "all",
    ),
    "lm": (lambda: zoo.tiny_language_model(), lambda: zoo.token_dataset(n=6), LanguageModelingTask, "all"),
}


@pytest.mark.parametrize("device", zoo.DEVICES)
@pytest.mark.parametrize("case", sorted(DEFINITION_CASES))
def test_ekfac_gauss_newton_matches_its_definition(case, device):
    make_model, make_data, make_task, params = DEFINITION_CASES[case]
    model = make_model()
    objective, on_device = objectives(
        make_task(), model, make_data(), select_parameters(model, params), device, batch_size=4
    )
    solver = EkfacSolver(damping=0.01, gauss_newton=True).fit(on_device)
    assert all(b.eigenvalues.device.type == device for b in solver.blocks)
    assert_eigenvalues_are_gauss_newton_diagonal(objective, solver)
    # The corrected eigenvalues keep the trace of the exact Gauss-Newton matrix.
    total = sum(float(b.eigenvalues.sum()) for b in solver.blocks)
    assert total == pytest.approx(float(torch.trace(objective.hessian(gauss_newton=True))), rel=1e-9)


def test_ekfac_embedding_factors():
    model, data = zoo.tiny_text_classifier(), zoo.text_dataset(n=10)
    task = ClassificationTask()
    objective = Objective(task, model, data, ["embedding.weight"], batch_size=4)
    solver = EkfacSolver(damping=0.01, gauss_newton=False).fit(objective)
    (block,) = solver.blocks
    assert (block.kind, block.out_features, block.in_features, block.q_a) == ("embedding", 3, 12, None)
    # A is diagonal: the frequency of each (non-padding) token per position.
    tokens = data.columns["tokens"]
    counts = torch.bincount(tokens[tokens != 0], minlength=12).to(torch.float64)
    torch.testing.assert_close(block.a_diagonal, counts / tokens.numel(), rtol=1e-12, atol=0)
    # Empirical Fisher: Lambda = mean_n (Q_S^T G_n)^2 with G_n = grad(weight)^T [dim, vocab].
    per_example = zoo.brute_per_example_gradients(task, model, data, ["embedding.weight"])
    g = per_example.reshape(-1, 12, 3).transpose(1, 2)
    torch.testing.assert_close(block.eigenvalues, ((block.q_s.T @ g) ** 2).mean(dim=0), rtol=1e-9, atol=1e-14)
    # The padding row gets no curvature: solve divides it by the damping alone.
    assert float(block.eigenvalues[:, 0].abs().max()) == 0.0
    generator = torch.Generator().manual_seed(2)
    rhs = torch.randn(2, objective.n_parameters, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(solver.solve(rhs)[:, :3], rhs[:, :3] / 0.01, rtol=1e-12, atol=1e-12)


# -- EKFAC: scores against exact Gauss-Newton --------------------------------------------------


@pytest.mark.parametrize("device", zoo.DEVICES)
@pytest.mark.parametrize("steps, relative_damping, measured", [(0, None, 0.961), (300, 0.1, 0.932)])
def test_ekfac_mlp_scores_track_exact_gauss_newton(steps, relative_damping, measured, device):
    # Block-diagonal EKFAC ignores the cross-layer curvature; with damping small next to the
    # trained model's curvature (1e-3 * lambda_max) its correlation drops to about 0.6, so the
    # trained case is damped at 0.1 * lambda_max (the untrained one at 0.01 ~ 0.014 * lambda_max).
    model, train, queries = trained_mlp(steps=steps)
    task = ClassificationTask()
    names = select_parameters(model, "all")
    objective, on_device = objectives(task, model, train, names, device, batch_size=16)
    top = float(torch.linalg.eigvalsh(objective.hessian(gauss_newton=True)).max())
    damping = 1e-2 if relative_damping is None else relative_damping * top
    g, q = gradients(task, model, train, queries, names)
    reference = ExactSolver(damping=damping, gauss_newton=True).fit(objective).solve(q) @ g.T
    ekfac = EkfacSolver(damping=damping, gauss_newton=True).fit(on_device)
    solved = ekfac.solve(q)
    assert solved.device.type == device
    assert pearson(solved.cpu() @ g.T, reference) >= 0.9  # measured: see the parameters


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_ekfac_embedding_model_scores_track_exact_gauss_newton(device):
    model = zoo.tiny_text_classifier(vocab_size=12, dim=4, n_classes=3)
    train = zoo.text_dataset(n=40, vocab_size=12, n_classes=3)
    queries = zoo.text_dataset(n=5, vocab_size=12, n_classes=3, seed=9)
    task = ClassificationTask()
    names = select_parameters(model, "all")
    objective, on_device = objectives(task, model, train, names, device, batch_size=16)
    g, q = gradients(task, model, train, queries, names)
    reference = ExactSolver(damping=1e-2, gauss_newton=True).fit(objective).solve(q) @ g.T
    ekfac = EkfacSolver(damping=1e-2, gauss_newton=True).fit(on_device)
    assert [b.kind for b in ekfac.blocks] == ["embedding", "linear", "linear"]
    solved = ekfac.solve(q)
    assert solved.device.type == device
    assert pearson(solved.cpu() @ g.T, reference) >= 0.9  # measured 0.978


# -- refusals ---------------------------------------------------------------------------------


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.head = nn.Linear(4, 3).to(torch.float64)

    def forward(self, x):
        return self.head(x * self.scale)


def test_ekfac_refuses_other_layers():
    data = zoo.tabular_dataset(n=6)
    objective = Objective(ClassificationTask(), _Scaled(), data, ["scale", "head.weight"])
    with pytest.raises(InvalidArgumentError, match="nn.Linear or nn.Embedding"):
        EkfacSolver(damping=0.1, gauss_newton=False).fit(objective)
    model = zoo.tiny_text_classifier()
    model.embedding.max_norm = 1.0
    objective = Objective(ClassificationTask(), model, zoo.text_dataset(n=6), ["embedding.weight"])
    with pytest.raises(InvalidArgumentError, match="max_norm"):
        EkfacSolver(damping=0.1, gauss_newton=False).fit(objective)
