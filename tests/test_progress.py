"""Progress bars (``influence.progress``): on and off by ``enable`` and ``INFLUENCE_PROGRESS``, off by default
when stderr is not a terminal, written to stderr, and without any effect on the numbers or the random draws."""

from __future__ import annotations

import copy

import pytest
import torch

import influence
from influence import progress as progress_module
from influence.evaluation.case_deletion import case_deletion
from influence.exceptions import InvalidArgumentError
from influence.gradients import GradientCache, Objective
from influence.index import AttributionIndex
from influence.methods.magic import TrainingRecipe, magic_scores
from influence.models.batched_training import train_without
from influence.models.training import train
from influence.progress import ENVIRONMENT_VARIABLE, enable, is_enabled, progress
from influence.solvers import ArnoldiSolver, ConjugateGradientSolver, LissaSolver
from influence.task import ClassificationTask
from tests import zoo

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = ClassificationTask()
RECIPE = dict(epochs=2, batch_size=8, learning_rate=0.05, seed=3, optimizer="adam", l2=0.01)


@pytest.fixture(autouse=True)
def _environment_choice(monkeypatch):
    """Each test starts from the environment's choice (no ``enable``), with ``INFLUENCE_PROGRESS`` unset."""
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    enable(None)
    yield
    enable(None)


def _cg_solve() -> torch.Tensor:
    solver = ConjugateGradientSolver(damping=0.1, max_iterations=50, rtol=1e-10).fit(
        zoo.MatrixObjective(zoo.random_spd(12, low=0.2, high=4.0)))
    return solver.solve(torch.randn(3, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64))


def _trained() -> dict[str, torch.Tensor]:
    model = zoo.tanh_mlp()
    train(model, TASK, zoo.tabular_dataset(), **RECIPE)
    return model.state_dict()


def _stderr(capfd) -> str:
    return capfd.readouterr().err


def test_the_default_is_off_when_stderr_is_not_a_terminal(capfd):
    assert not is_enabled()  # pytest captures stderr: not a terminal
    items = [1, 2, 3]
    assert progress(items, desc="x") is items
    _cg_solve()
    _trained()
    assert _stderr(capfd) == ""


@pytest.mark.parametrize("how", ["enable", "environment"])
def test_cg_and_training_write_bars_to_stderr_when_on(capfd, monkeypatch, how):
    if how == "enable":
        enable(True)
    else:
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    assert is_enabled()
    _cg_solve()
    err = _stderr(capfd)
    assert "conjugate gradient" in err and "it" in err
    _trained()
    err = _stderr(capfd)
    assert "training" in err and "epoch" in err and "100%" in err
    assert "epoch 2/2" in err  # the inner bar of each epoch's steps


def test_off_by_enable_or_environment_writes_nothing(capfd, monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")
    assert not is_enabled()
    _cg_solve()
    _trained()
    enable(False)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")  # enable() wins over the environment
    assert not is_enabled()
    _cg_solve()
    _trained()
    assert _stderr(capfd) == ""
    enable(True)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "0")
    assert is_enabled()
    enable(None)
    assert not is_enabled()


def test_bad_switch_values_are_refused(monkeypatch):
    with pytest.raises(InvalidArgumentError, match="flag"):
        enable("yes")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "yes")
    with pytest.raises(InvalidArgumentError, match=f"{ENVIRONMENT_VARIABLE}='yes'.*'1'.*'0'"):
        is_enabled()
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "")  # empty: the terminal default
    assert not is_enabled()


def test_the_switch_is_exported():
    assert influence.enable_progress is enable and "enable_progress" in influence.__all__
    assert progress_module.progress is progress


def test_an_inner_bar_is_cleared(capfd):
    enable(True)
    for _ in progress(range(2), desc="outer"):
        list(progress(range(3), desc="inner", leave=False))
    err = _stderr(capfd)
    assert "outer" in err and "inner" in err
    assert err.rstrip("\n").splitlines()[-1].lstrip("\r").startswith("outer")  # the last thing shown is the outer bar


def _everything() -> dict[str, torch.Tensor]:
    """A tiny float64 run through every loop that shows progress, and the next random draw after it."""
    torch.manual_seed(0)
    data = zoo.tabular_dataset(n=16)
    queries = zoo.tabular_dataset(n=3, seed=7)
    model = zoo.tanh_mlp()
    initial = copy.deepcopy(model.state_dict())
    train(model, TASK, data, **RECIPE)
    out = {name: value.clone() for name, value in model.state_dict().items()}
    out["cg"] = _cg_solve()
    out["if"] = influence.attribute(TASK, model, data, queries, method="if", solver="cg", damping=1.0)
    objective = Objective(TASK, model, data, [n for n, _ in model.named_parameters()], batch_size=4)
    rhs = torch.randn(2, objective.n_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out["lissa"] = LissaSolver(damping=1.0, gauss_newton=True, depth=20, batches_per_step=1).fit(objective).solve(rhs)
    out["arnoldi"] = ArnoldiSolver(damping=0.01, n_iterations=10).fit(objective).solve(rhs)
    out["magic"] = magic_scores(TASK, model, data, queries, training=TrainingRecipe(initial_state=initial, **RECIPE),
                                segment_steps=2)
    batched = train_without(zoo.tanh_mlp(), TASK, data, [[0, 1], [2]], group_size=1, **RECIPE)
    out.update({f"batched{r}.{name}": value for r, state in enumerate(batched.states) for name, value in state.items()})
    out["next_draw"] = torch.rand(4, dtype=torch.float64)
    return out


def _with_files(tmp_path, model_data) -> dict[str, torch.Tensor]:
    model, data, queries = model_data
    names = [n for n, _ in model.named_parameters()]
    cache = GradientCache(tmp_path / "cache").build(TASK, model, data, names, shard_size=5, batch_size=4,
                                                      dtype_storage=torch.float64)
    index = AttributionIndex.fit(tmp_path / "index", TASK, model, data, solver="arnoldi", damping=0.01,
                                 solver_options={"n_iterations": 10}, projection_dim=None, shard_size=6,
                                 storage_dtype=torch.float64)

    def retrain(keep):
        fresh = zoo.tanh_mlp()
        train(fresh, TASK, data, exclude=sorted(set(range(len(data))) - set(keep)), **RECIPE)
        return fresh

    def measure(fitted):
        return TASK.measurement(fitted, zoo.full_batch(queries)).detach()

    scores = {"a": torch.randn(3, len(data), generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    deletion = case_deletion(scores, retrain=retrain, measure=measure, base=measure(model), n_train=len(data), k=2,
                             random_repeats=1)
    return {"cache": cache.matrix(), "index": index.scores(TASK, model, queries),
            "deletion": torch.tensor(deletion[0].delta_top + deletion[0].delta_random[0])}


def test_results_are_bit_identical_on_and_off(tmp_path, capfd):
    enable(False)
    off = _everything()
    model = zoo.tanh_mlp()
    data, queries = zoo.tabular_dataset(n=16), zoo.tabular_dataset(n=3, seed=7)
    train(model, TASK, data, **RECIPE)
    off_files = _with_files(tmp_path / "off", (model, data, queries))
    assert _stderr(capfd) == ""
    enable(True)
    on = _everything()
    on_files = _with_files(tmp_path / "on", (model, data, queries))
    err = _stderr(capfd)
    for label in ("training", "conjugate gradient", "LiSSA", "Arnoldi", "MAGIC replay", "MAGIC reverse pass",
                  "retraining 2 runs", "gradient shards", "index shards", "case deletion"):
        assert label in err, label
    assert sorted(on) == sorted(off) and sorted(on_files) == sorted(off_files)
    for name in off:
        assert torch.equal(on[name], off[name]), name
    for name in off_files:
        assert torch.equal(on_files[name], off_files[name]), name
