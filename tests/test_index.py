"""The attribution index against the one-call API and brute force, in float64 on tiny models; its
shards (resume after a kill, refusal of other arguments, checksums); the solvers' saved states and
representations, Arnoldi's eigenvalue choice and damped complement on an indefinite Hessian."""

from __future__ import annotations

import json

import pytest
import torch

from influence.api import attribute
from influence.exceptions import CacheMismatchError, CorruptedArtifactError, InvalidArgumentError
from influence.gradients import Objective
from influence.gradients.projection import RandomProjector
from influence.index import AttributionIndex, RepresentationStore
from influence.solvers import ArnoldiSolver, EkfacSolver, ExactSolver, make_solver
from influence.task import ClassificationTask
from tests import zoo

pytestmark = pytest.mark.usefixtures("one_thread")
TASK = ClassificationTask()
DAMPING = 0.05


@pytest.fixture(scope="module")
def problem():
    model = zoo.tanh_mlp().eval()
    train, queries = zoo.tabular_dataset(n=40, seed=1), zoo.tabular_dataset(n=6, seed=9)
    return model, train, queries


def indefinite(values=(10.0, 8.0, -6.0, 0.5, 0.3, 0.2, 0.1, 0.05), seed=4):
    values = torch.tensor(values, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return (q * values) @ q.T, q, values


# -- solvers: representations, saved states --------------------------------------------------------


@pytest.mark.parametrize("select", ["positive", "magnitude"])
@pytest.mark.parametrize("complement", ["none", "damping", "last"])
def test_arnoldi_solve_matches_its_low_rank_formula_on_an_indefinite_hessian(select, complement):
    matrix, q, values = indefinite()
    solver = ArnoldiSolver(damping=DAMPING, n_iterations=8, top_k=3, select=select, complement=complement)
    solver.fit(zoo.MatrixObjective(matrix))
    kept = [0, 1, 2] if select == "magnitude" else [0, 1, 3]  # -6 is the third largest in magnitude
    torch.testing.assert_close(solver.eigenvalues.sort().values, values[kept].sort().values, rtol=1e-8, atol=1e-10)
    u = q[:, kept]
    expected = u @ torch.diag(1 / (values[kept] + DAMPING)) @ u.T
    scale = {"none": 0.0, "damping": 1 / DAMPING, "last": 1 / (DAMPING + float(values[kept].abs().min()))}[complement]
    expected = expected + (torch.eye(8, dtype=torch.float64) - u @ u.T) * scale
    rhs = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(solver.solve(rhs), rhs @ expected, rtol=1e-8, atol=1e-8)
    # The representations' inner products are the same bilinear form, negative eigenvalues included.
    scores = solver.representation(rhs[:2], "query") @ solver.representation(rhs, "train").T
    torch.testing.assert_close(scores, rhs[:2] @ expected @ rhs.T, rtol=1e-8, atol=1e-8)
    assert solver.representation(rhs, "train").shape == (5, solver.representation_dim())


def test_arnoldi_full_rank_with_complement_is_exact_and_low_rank_complement_helps_a_spiked_spectrum():
    matrix = zoo.random_spd(10, low=0.01, high=5.0)
    exact = ExactSolver(damping=DAMPING).fit(zoo.MatrixObjective(matrix))
    rhs = torch.randn(3, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = ArnoldiSolver(damping=DAMPING, n_iterations=10, top_k=10, complement="damping").fit(zoo.MatrixObjective(matrix))
    torch.testing.assert_close(full.solve(rhs), exact.solve(rhs), rtol=1e-7, atol=1e-9)
    # A few large eigenvalues and many far below the damping (the shape of network Hessians): with
    # the 3 large pairs, the complement's 1/damping is nearly the exact 1/(e + damping) on the rest,
    # while dropping the rest loses most of the solve.
    spiked, _, _ = indefinite((10.0, 8.0, 5.0, 1e-3, 5e-4, 2e-4, 1e-4, 0.0))
    exact = ExactSolver(damping=DAMPING).fit(zoo.MatrixObjective(spiked)).solve(rhs[:, :8])

    def error(complement):
        low = ArnoldiSolver(damping=DAMPING, n_iterations=8, top_k=3, complement=complement).fit(zoo.MatrixObjective(spiked))
        return float((low.solve(rhs[:, :8]) - exact).norm() / exact.norm())

    assert error("damping") < 0.03 < 0.9 < error("none")


def test_arnoldi_options_are_checked():
    with pytest.raises(InvalidArgumentError, match="select"):
        ArnoldiSolver(select="largest")
    with pytest.raises(InvalidArgumentError, match="complement='damping'"):
        ArnoldiSolver(damping=0.0, complement="damping")
    with pytest.raises(InvalidArgumentError, match="'none', 'damping' or 'last'"):
        ArnoldiSolver(complement=True)


@pytest.mark.parametrize("name", ["exact", "exact-indefinite", "arnoldi", "ekfac"])
def test_saved_solver_state_solves_without_its_objective(problem, name):
    model, train, _ = problem
    objective = Objective(TASK, model, train, ["head.weight", "head.bias"], batch_size=16)
    if name == "exact-indefinite":
        matrix, _, _ = indefinite()
        objective, solver = zoo.MatrixObjective(matrix), ExactSolver(damping=0.0)
    elif name == "ekfac":
        solver = EkfacSolver(damping=DAMPING, gauss_newton=True)
    else:
        solver = make_solver(name, damping=DAMPING, **({"n_iterations": 10, "top_k": 6} if name == "arnoldi" else {}))
    solver.fit(objective)
    assert (solver.cholesky is None) == (name == "exact-indefinite") if name.startswith("exact") else True
    rhs = torch.randn(4, objective.n_parameters, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    restored = make_solver(solver.name, **{k: v for k, v in solver.arguments.items() if k != "solver"})
    restored.load_state(solver.state_dict(), solver.state_info())
    assert restored.objective is None
    # Equal up to rounding (the saved tensors are contiguous copies, which BLAS may sum in another order).
    torch.testing.assert_close(restored.solve(rhs), solver.solve(rhs), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(restored.representation(rhs, "train"), solver.representation(rhs, "train"),
                               rtol=1e-12, atol=1e-13)


def test_iterative_solvers_have_no_state_to_save(problem):
    model, train, _ = problem
    solver = make_solver("cg", damping=DAMPING).fit(Objective(TASK, model, train, "all", batch_size=16))
    with pytest.raises(InvalidArgumentError, match="no state to save"):
        solver.state_dict()


# -- the index against the one-call API ------------------------------------------------------------


@pytest.mark.parametrize("solver,options,projection", [
    ("exact", {}, None),
    ("arnoldi", {"n_iterations": 30, "top_k": 10, "complement": "last"}, None),
    ("arnoldi", {"n_iterations": 30, "top_k": 10, "select": "magnitude"}, None),
    ("ekfac", {"gauss_newton": True}, None),
    (None, {}, None),
])
def test_index_scores_equal_the_one_call_api(problem, tmp_path, solver, options, projection):
    model, train, queries = problem
    index = AttributionIndex.fit(tmp_path / "index", TASK, model, train, solver=solver, damping=DAMPING,
                                 solver_options=options, shard_size=16, storage_dtype=torch.float64)
    assert index.manifest["n_shards"] == 3 and index.n_train == 40
    got = index.scores(TASK, model, queries)
    if solver is None:
        expected = attribute(TASK, model, train, queries, method="grad_dot") * (1 / 40)
    else:
        expected = attribute(TASK, model, train, queries, method="if", solver=solver, damping=DAMPING,
                             solver_options=options)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)
    # Top-k streamed over 3 shards equals sorting the full matrix.
    top = AttributionIndex.load(tmp_path / "index", verify=True).query(TASK, model, queries, k=5)
    order = expected.argsort(dim=1, descending=True)
    torch.testing.assert_close(top.proponents, order[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(top.opponents, expected.argsort(dim=1)[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(top.proponent_scores, expected.gather(1, order[:, :5]), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("kind", ["gaussian", "sjlt"])
def test_projected_index_approximates_the_exact_scores(problem, tmp_path, kind):
    model, train, queries = problem
    exact = attribute(TASK, model, train, queries, method="if", solver="exact", damping=DAMPING)
    index = AttributionIndex.fit(tmp_path / "p", TASK, model, train, solver="exact", damping=DAMPING,
                                 projection_dim=2000, projection_kind=kind, storage_dtype=torch.float64)
    assert index.dim == 2000 and index.projector.kind == kind
    scores = index.scores(TASK, model, queries)
    correlation = torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1]
    assert correlation > 0.95
    reopened = AttributionIndex.load(tmp_path / "p")
    assert reopened.projector.arguments == index.projector.arguments
    assert torch.equal(reopened.scores(TASK, model, queries), scores)


# -- the index on disk -----------------------------------------------------------------------------


def test_index_resumes_after_a_kill_without_refitting(problem, tmp_path, monkeypatch):
    model, train, queries = problem
    options = {"solver": "arnoldi", "damping": DAMPING, "solver_options": {"n_iterations": 20, "top_k": 8}, "shard_size": 8}
    whole = AttributionIndex.fit(tmp_path / "whole", TASK, model, train, **options)
    calls = {"put": 0, "fit": 0}
    original_put, original_fit = RepresentationStore.put_shard, ArnoldiSolver._fit

    def killed_put(self, index, rows):
        calls["put"] += 1
        if calls["put"] == 3:
            raise KeyboardInterrupt("killed")
        return original_put(self, index, rows)

    def counted_fit(self, objective):
        calls["fit"] += 1
        return original_fit(self, objective)

    monkeypatch.setattr(RepresentationStore, "put_shard", killed_put)
    monkeypatch.setattr(ArnoldiSolver, "_fit", counted_fit)
    with pytest.raises(KeyboardInterrupt):
        AttributionIndex.fit(tmp_path / "resumed", TASK, model, train, **options)
    with pytest.raises(CorruptedArtifactError, match="incomplete"):
        AttributionIndex.load(tmp_path / "resumed")
    resumed = AttributionIndex.fit(tmp_path / "resumed", TASK, model, train, **options)
    assert calls == {"put": 6, "fit": 1}  # 2 shards kept, 3 written after the kill; the solver state reloaded
    torch.testing.assert_close(resumed.scores(TASK, model, queries), whole.scores(TASK, model, queries), rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["arnoldi", "exact", None])
def test_index_shards_computed_elsewhere_equal_the_fit(problem, tmp_path, solver):
    """``fit(shards=False)`` fits the solver only; each shard's rows from the index reopened incomplete (as a worker
    on another machine would, from the folder's manifest and solver state) equal those of a whole fit, bit for bit."""
    model, train, queries = problem
    options = {"solver": solver, "damping": DAMPING, "shard_size": 8,
               "solver_options": {"n_iterations": 20, "top_k": 8} if solver == "arnoldi" else None}
    whole = AttributionIndex.fit(tmp_path / "whole", TASK, model, train, **options)
    fitted = AttributionIndex.fit(tmp_path / "parts", TASK, model, train, shards=False, **options)
    assert fitted.missing_shards() == [0, 1, 2, 3, 4]
    with pytest.raises(CorruptedArtifactError, match="incomplete"):
        AttributionIndex.load(tmp_path / "parts")
    elsewhere = AttributionIndex.load(tmp_path / "parts", complete=False)
    for shard in reversed(fitted.missing_shards()):
        fitted.store.put_shard(shard, elsewhere.representation_shard(TASK, model, train, shard))
    fitted.complete()
    for shard in range(5):
        name = RepresentationStore.shard_name(shard)
        assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    loaded = AttributionIndex.load(tmp_path / "parts", verify=True)
    torch.testing.assert_close(loaded.scores(TASK, model, queries), whole.scores(TASK, model, queries), rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="differs"):
        elsewhere.representation_shard(TASK, zoo.tanh_mlp(seed=5), train, 0)


def test_ekfac_index_rows_from_layers_and_from_flat_gradients_agree(problem, tmp_path, monkeypatch):
    """A fresh EK-FAC fit writes rows straight from layer inputs and output gradients; a fit resumed after a
    kill (state reloaded, no objective) writes the rest from flat gradients: the same rows, the same scores.
    An index of the older layout (no ``rows`` field) is refused on load."""
    model, train, queries = problem
    options = {"solver": "ekfac", "damping": DAMPING, "shard_size": 8, "storage_dtype": torch.float64}
    whole = AttributionIndex.fit(tmp_path / "whole", TASK, model, train, **options)
    assert whole.manifest["rows"] == "eigenbasis"
    calls = {"put": 0}
    original_put = RepresentationStore.put_shard

    def killed_put(self, index, rows):
        calls["put"] += 1
        if calls["put"] == 3:
            raise KeyboardInterrupt("killed")
        return original_put(self, index, rows)

    monkeypatch.setattr(RepresentationStore, "put_shard", killed_put)
    with pytest.raises(KeyboardInterrupt):
        AttributionIndex.fit(tmp_path / "resumed", TASK, model, train, **options)
    monkeypatch.setattr(RepresentationStore, "put_shard", original_put)
    resumed = AttributionIndex.fit(tmp_path / "resumed", TASK, model, train, **options)
    for shard in range(whole.manifest["n_shards"]):
        torch.testing.assert_close(resumed.store.read_shard(shard), whole.store.read_shard(shard), rtol=1e-9, atol=1e-12)
    expected = attribute(TASK, model, train, queries, method="if", solver="ekfac", damping=DAMPING)
    torch.testing.assert_close(resumed.scores(TASK, model, queries), expected, rtol=1e-7, atol=1e-10)
    manifest_path = tmp_path / "whole" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["rows"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptedArtifactError, match="older layout"):
        AttributionIndex.load(tmp_path / "whole")


def test_index_refuses_other_arguments_models_and_corruption(problem, tmp_path):
    model, train, queries = problem
    folder = tmp_path / "index"
    AttributionIndex.fit(folder, TASK, model, train, solver="exact", damping=DAMPING, shard_size=16)
    with pytest.raises(CacheMismatchError, match=r"solver.damping \(recorded 0.05, given 0.1\)"):
        AttributionIndex.fit(folder, TASK, model, train, solver="exact", damping=0.1, shard_size=16)
    other = zoo.tanh_mlp(seed=5).eval()
    with pytest.raises(CacheMismatchError, match="model_fingerprint"):
        AttributionIndex.fit(folder, TASK, other, train, solver="exact", damping=DAMPING, shard_size=16)
    with pytest.raises(InvalidArgumentError, match="differs from the one"):
        AttributionIndex.load(folder).query(TASK, other, queries, k=3)
    with pytest.raises(InvalidArgumentError, match="'exact', 'arnoldi', 'ekfac', or None"):
        AttributionIndex.fit(tmp_path / "cg", TASK, model, train, solver="cg")
    replaced = AttributionIndex.fit(folder, TASK, model, train, solver="exact", damping=0.1, shard_size=16, overwrite=True)
    assert replaced.manifest["solver"]["damping"] == 0.1
    shard = folder / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(CorruptedArtifactError, match="shard_00001.safetensors fails its sha256"):
        AttributionIndex.load(folder, verify=True)


def test_store_top_k_streams_shards_like_a_full_sort(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows, queries = torch.randn(103, 7, generator=g), torch.randn(4, 7, generator=g)
    store = RepresentationStore(tmp_path / "s")
    store.open({"n_rows": 103, "shard_size": 10, "storage_dtype": "float32"})
    store.write(rows.split(33))
    store = RepresentationStore(tmp_path / "s").load()
    full = queries @ rows.T * -0.5
    for k in (1, 10, 25, 103, 500):
        top = store.top_k(queries, k, scale=-0.5)
        kept = min(k, 103)
        torch.testing.assert_close(top.proponent_scores, full.sort(dim=1, descending=True).values[:, :kept])
        torch.testing.assert_close(top.opponent_scores, full.sort(dim=1).values[:, :kept])
        torch.testing.assert_close(full.gather(1, top.proponents), top.proponent_scores)
    torch.testing.assert_close(store.scores(queries, scale=-0.5), full)
    with pytest.raises(InvalidArgumentError, match="D = 7"):
        store.top_k(torch.ones(2, 5), 3)
    assert len(top.to_rows()) == 4 * 2 * 103


def test_store_products_in_half_precision_accumulate_in_float32(tmp_path):
    """bfloat16 rows and queries multiplied with ``dtype=torch.bfloat16``: float32 scores equal to the
    float64 products of the rounded operands up to one rounding of each score."""
    g = torch.Generator().manual_seed(1)
    rows, queries = torch.randn(60, 2048, generator=g), torch.randn(3, 2048, generator=g)
    store = RepresentationStore(tmp_path / "s")
    store.open({"n_rows": 60, "shard_size": 25, "storage_dtype": "bfloat16"})
    store.write([rows])
    store = RepresentationStore(tmp_path / "s").load()
    half = store.scores(queries, scale=0.5, dtype=torch.bfloat16)
    rounded = (queries.bfloat16() * 0.5).double() @ rows.bfloat16().double().T
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), rounded, rtol=2.0 ** -8, atol=1e-3)
    top = store.top_k(queries, 5, scale=0.5, dtype=torch.bfloat16)
    torch.testing.assert_close(top.proponent_scores, half.sort(dim=1, descending=True).values[:, :5])
    assert store.scores(queries).dtype == torch.float32  # default: the half rows widened, float32 products


def test_random_projector_keeps_complement_width():
    matrix, _, _ = indefinite()
    solver = ArnoldiSolver(damping=DAMPING, n_iterations=8, top_k=2, complement="damping").fit(zoo.MatrixObjective(matrix))
    projector = RandomProjector(8, 5, seed=0)
    assert solver.representation(torch.ones(3, 8, dtype=torch.float64), "train", projector).shape == (3, 7)
    assert solver.representation_dim(projector) == 7


def test_automatic_batch_size_follows_the_parameter_count(problem):
    from influence.batches import auto_batch_size

    assert auto_batch_size(7_850, 4) == 1024 and auto_batch_size(101_770, 4) == 659 and auto_batch_size(22_000_000, 4) == 32
    model, train, queries = problem
    automatic = attribute(TASK, model, train, queries, method="if", solver="exact", damping=DAMPING)
    explicit = attribute(TASK, model, train, queries, method="if", solver="exact", damping=DAMPING, batch_size=7)
    torch.testing.assert_close(automatic, explicit, rtol=1e-10, atol=1e-13)
