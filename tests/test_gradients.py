"""Per-example gradients, the objective's curvature products, projection and the gradient cache,
checked in float64 against brute-force references from ``tests/zoo.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import influence.gradients.cache as cache_module
import influence.storage as storage_module
from influence.exceptions import (
    CacheMismatchError,
    CorruptedArtifactError,
    InvalidArgumentError,
)
from influence.gradients import (
    GradientCache,
    Objective,
    RandomProjector,
    gradient_matrix,
    iter_gradients,
    measurement_sign,
    per_example_gradients,
    select_parameters,
)
from influence.task import ClassificationTask, LanguageModelingTask
from tests import zoo

RTOL, ATOL = 1e-6, 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")


def close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# -- per-example gradients --------------------------------------------------------------------

CASES = {
    "logistic": (zoo.logistic_regression, zoo.tabular_dataset, ClassificationTask()),
    "mlp": (zoo.tanh_mlp, zoo.tabular_dataset, ClassificationTask()),
    "text": (zoo.tiny_text_classifier, zoo.text_dataset, ClassificationTask()),
    "lm": (zoo.tiny_language_model, zoo.token_dataset, LanguageModelingTask()),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("selection", ["all", "last"])
def test_per_example_gradients_match_autograd_loop(case, selection):
    make_model, make_data, task = CASES[case]
    model, data = make_model(), make_data()
    names = select_parameters(model, selection)
    expected = zoo.brute_per_example_gradients(task, model, data, names)
    got = per_example_gradients(task, model, zoo.full_batch(data), names)
    assert got.shape == (len(data), sum(dict(model.named_parameters())[n].numel() for n in names))
    close(got, expected)


def test_measurement_gradients_and_sign():
    model, data = zoo.tanh_mlp(), zoo.tabular_dataset(n=6)
    task = ClassificationTask(measurement="margin")
    names = select_parameters(model, "all")
    expected = zoo.brute_per_example_gradients(task, model, data, names, kind="measurement")
    close(per_example_gradients(task, model, zoo.full_batch(data), names, kind="measurement"), expected)
    assert measurement_sign(task) == -1.0
    assert measurement_sign(ClassificationTask()) == 1.0


def test_unselected_parameters_and_buffers_are_fixed():
    model, data = zoo.tanh_mlp(), zoo.tabular_dataset(n=5)
    task = ClassificationTask()
    batch = zoo.full_batch(data)
    head_only = per_example_gradients(task, model, batch, ["head.weight"])
    full = per_example_gradients(task, model, batch, select_parameters(model, "all"))
    start = model.hidden.weight.numel() + model.hidden.bias.numel()
    close(head_only, full[:, start:start + model.head.weight.numel()])
    assert all(p.grad is None for p in model.parameters())


def test_invalid_arguments_are_refused():
    model, data = zoo.logistic_regression(), zoo.tabular_dataset(n=4)
    batch = zoo.full_batch(data)
    with pytest.raises(InvalidArgumentError, match="nope"):
        per_example_gradients(ClassificationTask(), model, batch, ["nope"])
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        per_example_gradients(ClassificationTask(), model, batch, [])
    with pytest.raises(InvalidArgumentError, match="kind"):
        per_example_gradients(ClassificationTask(), model, batch, ["weight"], kind="loss")


def test_iter_gradients_chunks_in_dataset_order():
    model, data = zoo.tiny_text_classifier(), zoo.text_dataset(n=13)
    task = ClassificationTask()
    names = select_parameters(model, "all")
    expected = zoo.brute_per_example_gradients(task, model, data, names)
    p = expected.shape[1]
    blocks = list(iter_gradients(task, model, data, names, batch_size=5, memory_budget_bytes=2 * p * 8))
    assert [b.shape[0] for b in blocks] == [2, 2, 1, 2, 2, 1, 2, 1]
    close(torch.cat(blocks), expected)
    loader = DataLoader(data, batch_size=4, shuffle=False)
    close(gradient_matrix(task, model, loader, names), expected)


def test_iter_gradients_casts_dtype_and_projects():
    model, data = zoo.logistic_regression(), zoo.tabular_dataset(n=7)
    task = ClassificationTask()
    names = ["weight", "bias"]
    full = gradient_matrix(task, model, data, names, batch_size=3)
    single = gradient_matrix(task, model, data, names, batch_size=3, dtype=torch.float32)
    assert single.dtype == torch.float32
    close(single.double(), full, rtol=1e-4, atol=1e-6)
    projector = RandomProjector(full.shape[1], 4, seed=7, chunk_size=5)
    projected = gradient_matrix(task, model, data, names, batch_size=3, projector=projector)
    close(projected, full @ projector.matrix(dtype=torch.float64))


# -- objective ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_problem():
    model, data = zoo.tanh_mlp(), zoo.tabular_dataset(n=18)
    task = ClassificationTask()
    names = select_parameters(model, "all")
    penalty = zoo.proximity_penalty(model, alpha=0.3)
    objective = Objective(task, model, data, names, batch_size=7, regularizer=penalty)
    return task, model, data, names, penalty, objective


def test_objective_loss_and_gradient(mlp_problem):
    task, model, data, names, penalty, objective = mlp_problem
    f = zoo.brute_objective(task, model, data, names, penalty)
    theta = zoo.flat_parameters(model, names).requires_grad_(True)
    value = f(theta)
    assert objective.n_examples == len(data)
    assert objective.loss() == pytest.approx(float(value.detach()), rel=1e-12)
    close(objective.gradient(), torch.autograd.grad(value, theta)[0])


def test_hvp_matches_dense_hessian(mlp_problem):
    task, model, data, names, penalty, objective = mlp_problem
    hessian = zoo.brute_hessian(task, model, data, names, penalty)
    v = torch.randn(3, hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    close(objective.hvp(v), v @ hessian)
    close(objective.hvp(v[0]), hessian @ v[0])
    close(objective.hessian(), hessian)
    close(objective.matvec(v, gauss_newton=False), v @ hessian)


def test_hvp_only_selected_block_and_penalty_on_others():
    model, data = zoo.tanh_mlp(), zoo.tabular_dataset(n=10)
    task = ClassificationTask()
    penalty = zoo.proximity_penalty(model, alpha=0.5)
    objective = Objective(task, model, data, ["head"], batch_size=4, regularizer=penalty)
    names = ["head.weight", "head.bias"]
    close(objective.hessian(), zoo.brute_hessian(task, model, data, names, penalty))


def test_gauss_newton_products(mlp_problem):
    task, model, data, names, penalty, objective = mlp_problem
    gn = zoo.brute_gauss_newton(task, model, data, names, penalty)
    v = torch.randn(2, gn.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    close(objective.gnhvp(v), v @ gn)
    close(objective.hessian(gauss_newton=True), gn)
    assert torch.linalg.eigvalsh(gn).min() > 0


def test_gauss_newton_language_model():
    model, data = zoo.tiny_language_model(), zoo.token_dataset(n=6)
    task = LanguageModelingTask()
    names = select_parameters(model, "all")
    objective = Objective(task, model, data, names, batch_size=4)
    close(objective.hessian(gauss_newton=True), zoo.brute_gauss_newton(task, model, data, names))
    close(objective.hessian(), zoo.brute_hessian(task, model, data, names))


def test_subsample_and_batch_subset():
    model, data = zoo.logistic_regression(), zoo.tabular_dataset(n=20)
    task = ClassificationTask()
    names = ["weight", "bias"]
    a = Objective(task, model, data, names, batch_size=4, max_examples=8, seed=3)
    b = Objective(task, model, data, names, batch_size=4, max_examples=8, seed=3)
    assert a.n_examples == 8
    assert a.loss() == b.loss()
    whole = Objective(task, model, data, names, batch_size=5)
    first = torch.utils.data.Subset(data, range(5))
    v = torch.ones(whole.n_parameters, dtype=torch.float64)
    close(whole.hvp(v, batch_indices=[0]), zoo.brute_hessian(task, model, first, names) @ v)
    with pytest.raises(InvalidArgumentError, match="batch_indices"):
        whole.hvp(v, batch_indices=[9])
    with pytest.raises(InvalidArgumentError, match="P = 15"):
        whole.hvp(torch.ones(3, dtype=torch.float64))


# -- projection -------------------------------------------------------------------------------


def test_projection_is_reproducible_from_the_seed():
    g = torch.randn(5, 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = RandomProjector(23, 6, seed=11, chunk_size=4)
    b = RandomProjector(23, 6, seed=11, chunk_size=4, max_cached_bytes=0)
    assert torch.equal(a.project(g), b.project(g))
    close(a.project(g), g @ a.matrix(dtype=torch.float64))
    assert not torch.equal(a.project(g), RandomProjector(23, 6, seed=12, chunk_size=4).project(g))
    assert a.project(g[0]).shape == (6,)
    with pytest.raises(InvalidArgumentError, match="P = 23"):
        a.project(torch.ones(2, 22))


def test_rademacher_entries_and_norm_preservation():
    r = RandomProjector(50, 16, seed=0, kind="rademacher").matrix()
    assert set((r * 4).round().unique().tolist()) == {-1.0, 1.0}
    proj = RandomProjector(400, 2000, seed=1, chunk_size=128)
    g = torch.randn(3, 400, generator=torch.Generator().manual_seed(2))
    ratio = proj.project(g).norm(dim=1) / g.norm(dim=1)
    assert torch.allclose(ratio, torch.ones(3), atol=0.1)


def test_sparse_projection_has_one_signed_entry_per_slice_and_equals_its_matrix():
    """SJLT (Kane-Nelson block construction): every input row has s entries +-1/sqrt(s), one in each
    of the s slices of the outputs; the sparse product equals g @ R, cached or not, in every dtype."""
    a = RandomProjector(300, 10, seed=5, kind="sjlt", nonzeros=3, chunk_size=64)
    r = a.matrix(dtype=torch.float64)
    assert bool((r != 0).sum(dim=1).eq(3).all())
    assert torch.allclose(r[r != 0].abs(), torch.full_like(r[r != 0], 3**-0.5))
    slices = [(0, 3), (3, 6), (6, 10)]  # j * k // s
    for lo, hi in slices:
        assert bool((r[:, lo:hi] != 0).sum(dim=1).eq(1).all())
    g = torch.randn(7, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    close(a.project(g), g @ r)
    uncached = RandomProjector(300, 10, seed=5, kind="sjlt", nonzeros=3, chunk_size=64, max_cached_bytes=0)
    assert torch.equal(uncached.project(g), a.project(g)) and torch.equal(uncached.matrix(), a.matrix())
    half = a.project(g.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.allclose(half.double(), g.to(torch.bfloat16).double() @ r, rtol=0.02, atol=0.05)
    assert not torch.equal(RandomProjector(300, 10, seed=6, kind="sjlt").matrix(), a.matrix())
    with pytest.raises(InvalidArgumentError, match="nonzeros"):
        RandomProjector(300, 2, seed=0, kind="sjlt", nonzeros=3)
    with pytest.raises(InvalidArgumentError, match="'sjlt'"):
        RandomProjector(300, 2, seed=0, kind="sparse")


def test_sparse_projection_is_unbiased_with_the_gaussian_variance():
    """Projected inner products over 400 seeds: mean within 4 standard errors of the true product, and
    the spread within 25% of the Gaussian projection's (1/k)(|x|^2 |y|^2 + (x.y)^2)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 500, generator=generator, dtype=torch.float64)
    x[1] = 0.6 * x[0] + 0.8 * x[1]
    k, truth = 32, float(x[0] @ x[1])
    estimates = torch.tensor([float(p[0] @ p[1]) for p in (
        RandomProjector(500, k, seed=s, kind="sjlt").project(x) for s in range(400))], dtype=torch.float64)
    expected_sd = ((x[0].norm() ** 2 * x[1].norm() ** 2 + truth**2) / k).sqrt().item()
    assert abs(estimates.mean().item() - truth) < 4 * expected_sd / 20
    assert 0.75 < estimates.std().item() / expected_sd < 1.25


def test_auto_projection_is_gaussian_while_r_fits_and_sparse_above():
    assert RandomProjector(16_384, 4_096, seed=0).kind == "gaussian"  # 256 MiB of float32
    large = RandomProjector(16_385, 4_096, seed=0)
    assert large.kind == "sjlt" and large.arguments["nonzeros"] == 4 and large.chunk_size == 65_536
    assert "nonzeros" not in RandomProjector(10, 4, seed=0).arguments  # the dense kinds keep their old identity


# -- cache ------------------------------------------------------------------------------------


@pytest.fixture()
def cache_problem():
    model, data = zoo.tiny_text_classifier(), zoo.text_dataset(n=11)
    return ClassificationTask(), model, data, select_parameters(model, "all")


def build(directory, problem, **options):
    task, model, data, names = problem
    arguments = {"shard_size": 3, "batch_size": 2, "dtype_storage": torch.float64, **options}
    return GradientCache(directory).build(task, model, data, names, **arguments)


def test_cache_matches_direct_gradients(tmp_path, cache_problem):
    task, model, data, names = cache_problem
    cache = build(tmp_path, cache_problem)
    manifest = cache.manifest
    assert manifest["complete"] and manifest["n_shards"] == 4 and manifest["n_examples"] == 11
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == [f"shard_0000{i}.safetensors" for i in range(4)]
    close(cache.matrix(), zoo.brute_per_example_gradients(task, model, data, names))
    assert [s.shape[0] for s in cache.iter_shards()] == [3, 3, 3, 2]
    assert GradientCache(tmp_path).exists()


def test_shards_computed_elsewhere_make_the_same_cache(tmp_path, cache_problem):
    """``open`` + ``gradient_shard`` (another process or machine, in any order) + ``put_shard`` + ``finish``: the cache
    ``build`` makes, byte for byte; a shard of another shape is refused, an unfinished cache cannot be finished."""
    from influence.gradients import gradient_shard

    task, model, data, names = cache_problem
    options = {"shard_size": 3, "batch_size": 2, "dtype_storage": torch.float64}
    whole = build(tmp_path / "whole", cache_problem)
    parts = GradientCache(tmp_path / "parts")
    assert parts.open(task, model, data, names, **options) == [0, 1, 2, 3]
    for index in (2, 0, 3):
        parts.put_shard(index, gradient_shard(task, model, data, names, index, **options))
    with pytest.raises(InvalidArgumentError, match="missing shards"):
        parts.finish()
    assert GradientCache(tmp_path / "parts").open(task, model, data, names, **options) == [1]  # resumable
    with pytest.raises(InvalidArgumentError, match=r"\[3, "):
        parts.put_shard(1, gradient_shard(task, model, data, names, 3, **options))
    parts.put_shard(1, gradient_shard(task, model, data, names, 1, **options))
    assert parts.finish().exists()
    for name in [f"shard_0000{i}.safetensors" for i in range(4)]:
        assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert {k: v for k, v in parts.manifest.items() if k != "created"} == {k: v for k, v in whole.manifest.items() if k != "created"}


def temporaries(directory):
    return sorted(p.name for p in directory.glob(".*.tmp-*"))


class _ReplaceKilledOnShard2:
    """Stands in for ``os`` inside the storage module: ``os.replace`` of shard 2 is interrupted."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def replace(source, destination):
        if Path(destination).name == "shard_00002.safetensors":
            raise KeyboardInterrupt
        os.replace(source, destination)


CRASHES = ["after shard 2", "mid-shard computation", "mid-shard write", "leftover partial files"]


@pytest.mark.parametrize("device", zoo.DEVICES)
@pytest.mark.parametrize("crash", CRASHES)
def test_cache_resume_is_bit_identical(tmp_path, cache_problem, monkeypatch, crash, device):
    task, model, data, names = cache_problem
    problem = (task, zoo.on_device(model, device), data, names)
    if device != "cpu":  # CUDA atomics may otherwise reorder float sums from one run to the next
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        enabled = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        check_resume(tmp_path, problem, monkeypatch, crash, device)
    finally:
        if device != "cpu":
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def check_resume(tmp_path, problem, monkeypatch, crash, device):
    """Build whole; build again killed by ``crash`` (11 examples in 4 shards of 3, batches of 2);
    resume: the same files, byte for byte, computing only the shards that were not stored."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    build(whole, problem, device=device)
    original, options = cache_module.iter_gradients, {}
    if crash == "after shard 2":
        def kill_after_two(done, total):
            if done == 2:
                raise KeyboardInterrupt

        options["on_shard"] = kill_after_two
    elif crash == "mid-shard computation":  # killed after the first of shard 2's two batches
        started = []

        def interrupted(*args, **kwargs):
            started.append(1)
            for i, block in enumerate(original(*args, **kwargs)):
                if len(started) == 3 and i == 1:
                    raise KeyboardInterrupt
                yield block

        monkeypatch.setattr(cache_module, "iter_gradients", interrupted)
    elif crash == "mid-shard write":  # killed inside the write of shard 2: no partial file stays
        monkeypatch.setattr(storage_module, "os", _ReplaceKilledOnShard2())
    else:  # what SIGKILL mid-write can leave: a truncated temporary of another process and a
        # truncated shard file that the manifest does not list
        write = storage_module.atomic_write

        def torn(path, payload):
            if path.name == "shard_00002.safetensors":
                (path.parent / f".{path.name}.tmp-999999").write_bytes(payload[: len(payload) // 2])
                path.write_bytes(payload[: len(payload) // 3])
                raise KeyboardInterrupt
            write(path, payload)

        monkeypatch.setattr(storage_module, "atomic_write", torn)
    with pytest.raises(KeyboardInterrupt):
        build(resumed, problem, device=device, **options)
    monkeypatch.undo()
    assert not GradientCache(resumed).exists()
    assert sorted(GradientCache(resumed).manifest["files"]) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    if crash == "leftover partial files":
        assert temporaries(resumed) == [".shard_00002.safetensors.tmp-999999"]
        assert (resumed / "shard_00002.safetensors").is_file()
    else:
        assert temporaries(resumed) == []
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "iter_gradients", counting)
    build(resumed, problem, device=device)
    assert len(calls) == 2  # shards 2 and 3
    for i in range(4):
        name = f"shard_0000{i}.safetensors"
        assert (whole / name).read_bytes() == (resumed / name).read_bytes()
    assert json.loads((whole / "manifest.json").read_text()) == GradientCache(resumed).manifest
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in whole.iterdir())
    assert temporaries(resumed) == []


def test_cache_refuses_other_arguments(tmp_path, cache_problem):
    build(tmp_path, cache_problem)
    with pytest.raises(CacheMismatchError, match="batch_size") as error:
        build(tmp_path, cache_problem, batch_size=3, dtype_storage=torch.float32)
    assert "dtype_storage" in str(error.value)
    task, model, data, names = cache_problem
    with torch.no_grad():
        model.head.bias += 1.0
    with pytest.raises(CacheMismatchError, match="model_fingerprint"):
        build(tmp_path, cache_problem)
    projector = RandomProjector(len(zoo.flat_parameters(model, names)), 4, seed=0)
    rebuilt = build(tmp_path, cache_problem, projector=projector, overwrite=True)
    assert rebuilt.manifest["dim"] == 4 and rebuilt.manifest["projection"]["seed"] == 0


def test_cache_names_a_corrupted_shard(tmp_path, cache_problem):
    cache = build(tmp_path, cache_problem)
    path = tmp_path / "shard_00001.safetensors"
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.raises(CorruptedArtifactError, match="shard_00001.safetensors"):
        cache.matrix()
    with pytest.raises(CorruptedArtifactError, match="shard_00001.safetensors"):
        build(tmp_path, cache_problem)
    with pytest.raises(CorruptedArtifactError, match="manifest.json"):
        GradientCache(tmp_path / "empty").matrix()


# -- the pipeline's own models, loaders, contexts -----------------------------------------------


def pipeline_models():
    from influence.models.text import CbowLanguageModel, TextClassifier

    torch.manual_seed(0)
    classifier = TextClassifier(vocab_size=9, embed_dim=3, hidden_dim=4, num_classes=2).double()
    language_model = CbowLanguageModel(vocab_size=7, embed_dim=3, hidden_dim=4, window=1).double()
    return [
        (classifier, zoo.text_dataset(n=8, vocab_size=9), ClassificationTask()),
        (language_model, zoo.token_dataset(n=6, vocab_size=7), LanguageModelingTask()),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["TextClassifier", "CbowLanguageModel"])
def test_pipeline_models(index):
    model, data, task = pipeline_models()[index]
    names = select_parameters(model, "all")
    close(gradient_matrix(task, model, data, names, batch_size=3),
          zoo.brute_per_example_gradients(task, model, data, names))
    objective = Objective(task, model, DataLoader(data, batch_size=5), names, batch_size=4)
    v = torch.randn(2, objective.n_parameters, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    close(objective.hvp(v), v @ zoo.brute_hessian(task, model, data, names))
    close(objective.gnhvp(v), v @ zoo.brute_gauss_newton(task, model, data, names))


def test_works_inside_no_grad():
    model, data = zoo.tanh_mlp(), zoo.tabular_dataset(n=6)
    task = ClassificationTask()
    names = select_parameters(model, "all")
    expected = zoo.brute_per_example_gradients(task, model, data, names)
    objective = Objective(task, model, data, names, batch_size=4)
    v = torch.ones(objective.n_parameters, dtype=torch.float64)
    reference = objective.hvp(v)
    with torch.no_grad():
        close(per_example_gradients(task, model, zoo.full_batch(data), names), expected)
        close(objective.hvp(v), reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path):
    model, data = zoo.tiny_text_classifier(), zoo.text_dataset(n=9)
    task = ClassificationTask()
    names = select_parameters(model, "all")
    cpu = gradient_matrix(task, model, data, names, batch_size=4)
    gpu = gradient_matrix(task, model, data, names, batch_size=4, device="cuda")
    assert gpu.device.type == "cuda"
    close(gpu.cpu(), cpu)
    for kind in ("gaussian", "sjlt"):
        projector = RandomProjector(cpu.shape[1], 5, seed=3, kind=kind, chunk_size=7, nonzeros=2)
        close(projector.project(gpu).cpu(), projector.project(cpu))
    objective = Objective(task, model, data, names, batch_size=4)
    on_gpu = Objective(task, model, data, names, batch_size=4, device="cuda")
    v = torch.randn(3, objective.n_parameters, dtype=torch.float64)
    close(on_gpu.hvp(v.cuda()).cpu(), objective.hvp(v))
    close(on_gpu.gnhvp(v.cuda()).cpu(), objective.gnhvp(v))
    cache = GradientCache(tmp_path).build(task, model, data, names, shard_size=4, batch_size=4,
                                          dtype_storage=torch.float64, device="cuda")
    close(cache.matrix(), cpu)
