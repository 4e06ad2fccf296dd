"""Attribution methods against brute-force references, in float64 on tiny models.

- influence functions (exact solver) against actual leave-one-out retraining of an l2-regularised
  logistic regression minimised by Newton's method; CG against exact;
- TracIn against a loop over examples and checkpoints (state dicts and safetensors files, with
  and without a random projection);
- TracIn-WE against TracIn restricted to the embedding matrix, its word terms, its top-k variant;
- gradient similarities, self-influence, the public API's validation;
- training gradients cached in float32 and bfloat16 from a float64 computation;
- ``params="last"`` (the final layer) on an MLP and on the pipeline's ``TextClassifier``.

The acceptance tests run on every device of ``zoo.DEVICES`` (CUDA ones are ``gpu``-marked): the
method runs on the device with the model moved there; retraining references stay on the CPU.

Leave-one-out removes the example's term from ``(1/n) sum_i l(z_i) + R``: the others keep their
weight ``1/n``, which is the perturbation the influence function linearises. (Re-normalising by
``1/(n-1)`` also weakens ``R`` by ``1/n`` and shifts every removal's change of a query equally.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import default_collate

import influence
from influence.exceptions import CacheMismatchError, InvalidArgumentError
from influence.gradients.cache import GradientCache
from influence.gradients.layout import select_parameters
from influence.gradients.per_example import gradient_matrix
from influence.gradients.projection import RandomProjector
from influence.methods.influence_function import influence_scores
from influence.methods.similarity import similarity_scores
from influence.methods.tracin import tracin_scores
from influence.methods.tracin_we import embedding_rows, tracin_we_scores, tracin_we_words
from influence.models.text import CbowLanguageModel, TextClassifier
from influence.task import ClassificationTask, LanguageModelingTask
from tests import zoo
from tests.zoo import fit_logistic

DTYPE = torch.float64
LAMBDA = 0.1


# -- data and models ---------------------------------------------------------------------------


def logistic_data(n: int = 50, d: int = 4, n_query: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=DTYPE)
    x = torch.randn(n + n_query, d, generator=g, dtype=DTYPE)
    y = torch.bernoulli(torch.sigmoid(2 * x @ w), generator=g).long()
    rows = [{"inputs": x[i], "label": y[i]} for i in range(n + n_query)]
    return rows[:n], rows[n:]


def l2(params: dict[str, Tensor]) -> Tensor:
    return LAMBDA / 2 * sum((p**2).sum() for p in params.values())


@pytest.fixture(scope="module")
def logistic():
    torch.manual_seed(0)
    train, queries = logistic_data()
    model = nn.Linear(4, 2).double()
    fit_logistic(model, train, LAMBDA)
    return model, train, queries


class MeanPool(nn.Module):
    """Embedding (padding 0) -> masked mean -> tanh -> linear."""

    def __init__(self, vocab: int = 15, dim: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = (tokens != 0).to(self.embedding.weight.dtype)
        mean = (self.embedding(tokens) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return self.head(torch.tanh(mean))


class Nested(nn.Module):
    """A BERT-like name for the word embedding: ``embeddings.word_embeddings``."""

    def __init__(self, vocab: int = 15, dim: int = 4) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, dim)
        self.embeddings.position = nn.Parameter(torch.randn(6, dim))
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        words = self.embeddings.word_embeddings(tokens)
        hidden = torch.tanh(words + self.embeddings.position[: tokens.shape[1]])
        return self.head(hidden.mean(1))


def token_data(n: int, length: int = 6, vocab: int = 15, seed: int = 1, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, length), generator=g)
    if pad:
        lengths = torch.randint(2, length + 1, (n,), generator=g)
        tokens[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"tokens": t, "label": y} for t, y in zip(tokens, labels)]


def perturbed_states(model: nn.Module, count: int, seed: int = 2) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(count):
        state = model.state_dict()
        states.append({k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()})
    return states


def brute_gradient(model: nn.Module, fn, example, names: list[str]) -> Tensor:
    params = dict(model.named_parameters())
    value = fn(model, default_collate([example])).sum()
    grads = torch.autograd.grad(value, [params[n] for n in names], allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(params[n]) for g, n in zip(grads, names)]
    return torch.cat([g.reshape(-1) for g in grads])


def brute_tracin(task, model, train, queries, checkpoints, names, transform=lambda g: g) -> Tensor:
    sign = -1.0 if task.higher_is_better else 1.0
    total = torch.zeros(len(queries), len(train), dtype=DTYPE)
    for state, lr in checkpoints:
        current = copy.deepcopy(model)
        current.load_state_dict(state)
        q = torch.stack([transform(brute_gradient(current, task.measurement, x, names)) for x in queries])
        t = torch.stack([transform(brute_gradient(current, task.train_loss, z, names)) for z in train])
        total += lr * q @ t.T
    return sign * total


def pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


# -- influence functions -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def leave_one_out(logistic):
    """Actual change ``[m, 12]`` of each query's loss when each of the first 12 examples is removed
    and the model refitted (Newton, on the CPU)."""
    model, train, queries = logistic
    task = ClassificationTask()
    removed = list(range(12))
    base = task.measurement(model, default_collate(queries)).detach()
    actual = torch.zeros(len(queries), len(removed), dtype=DTYPE)
    for column, index in enumerate(removed):
        refit = nn.Linear(4, 2).double()
        refit.load_state_dict(model.state_dict())
        weights = torch.ones(len(train), dtype=DTYPE)
        weights[index] = 0.0
        fit_logistic(refit, train, LAMBDA, weights)
        actual[:, column] = task.measurement(refit, default_collate(queries)).detach() - base
    return removed, actual


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_influence_matches_leave_one_out(logistic, leave_one_out, device):
    model, train, queries = logistic
    task = ClassificationTask()
    scores = influence_scores(task, zoo.on_device(model, device), train, queries, solver="exact", damping=0.0,
                              regularizer=l2, device=device)
    assert scores.shape == (len(queries), len(train)) and scores.device.type == device
    removed, actual = leave_one_out
    predicted = scores[:, removed].cpu()
    correlation = pearson(predicted, actual)
    print(f"influence function vs leave-one-out: Pearson {correlation:.5f} over {actual.numel()} pairs")
    assert correlation >= 0.99
    # Signs agree on every pair whose change is above the retraining's resolution: Newton stops at
    # a gradient norm of 1e-11, which moves a query's loss by ~1e-10, far below the threshold of
    # 1e-6 of the largest change (0.061). That is every pair here: the smallest change, 2.2e-4, is
    # 3.6e-3 of the largest.
    significant = actual.abs() > 1e-6 * actual.abs().max()
    assert bool(significant.all())
    assert bool((torch.sign(predicted) == torch.sign(actual))[significant].all())
    slope = float((predicted * actual).sum() / (predicted * predicted).sum())
    assert 0.9 <= slope <= 1.1


def test_cg_matches_exact(logistic):
    model, train, queries = logistic
    task = ClassificationTask()
    exact = influence_scores(task, model, train, queries, solver="exact", damping=1e-3, regularizer=l2)
    cg = influence_scores(task, model, train, queries, solver="cg", damping=1e-3, regularizer=l2,
                          solver_options={"rtol": 1e-12, "max_iterations": 200}, batch_size=7)
    torch.testing.assert_close(cg, exact, rtol=1e-7, atol=1e-12)


def test_margin_scores_are_oriented_like_loss_scores(logistic):
    """Two classes: loss = softplus(-margin), so loss scores = sigmoid(-margin) * margin scores."""
    model, train, queries = logistic
    loss_task, margin_task = ClassificationTask(), ClassificationTask(measurement="margin")
    exact = {"solver": "exact", "damping": 0.0, "regularizer": l2}
    by_loss = influence_scores(loss_task, model, train, queries, **exact)
    by_margin = influence_scores(margin_task, model, train, queries, **exact)
    margins = margin_task.measurement(model, default_collate(queries)).detach()
    torch.testing.assert_close(by_loss, torch.sigmoid(-margins)[:, None] * by_margin, rtol=1e-9, atol=1e-14)


def test_gradient_cache_gives_the_same_scores(logistic, tmp_path):
    model, train, queries = logistic
    task = ClassificationTask()
    exact = {"method": "if", "solver": "exact", "damping": 0.0, "regularizer": l2}
    plain = influence.attribute(task, model, train, queries, **exact)
    cached = influence.attribute(task, model, train, queries, cache_dir=tmp_path / "cache", **exact)
    again = influence.attribute(task, model, train, queries, cache_dir=tmp_path / "cache", **exact)
    torch.testing.assert_close(cached, plain, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(again, plain, rtol=1e-12, atol=1e-15)


# storage dtype -> bound on |cached - float64| / max |float64 score| of the influence scores:
# float32 rounds each stored entry by at most 2^-24 relative, bfloat16 by 2^-9 (measured: 3.0e-8
# and 1.6e-3); the bounds leave a factor of 3 to 6.
LOW_PRECISION = {torch.float32: 1e-7, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("storage", sorted(LOW_PRECISION, key=str), ids=lambda dtype: str(dtype)[6:])
def test_gradients_cached_in_lower_precision(logistic, tmp_path, storage):
    model, train, queries = logistic
    task = ClassificationTask()
    names = ["weight", "bias"]
    computed = gradient_matrix(task, model, train, names, batch_size=8)
    assert computed.dtype == DTYPE
    brute = torch.stack([brute_gradient(model, task.train_loss, z, names) for z in train])
    torch.testing.assert_close(computed, brute, rtol=1e-10, atol=1e-14)
    cache = GradientCache(tmp_path / "direct").build(task, model, train, names, dtype_storage=storage,
                                                     shard_size=16, batch_size=8)
    stored = cache.matrix()
    assert stored.dtype == storage
    assert torch.equal(stored, computed.to(storage))  # float64 gradients rounded once to the storage dtype
    exact = {"method": "if", "solver": "exact", "damping": 0.0, "regularizer": l2}
    full = influence.attribute(task, model, train, queries, **exact)
    cached = influence.attribute(task, model, train, queries, cache_dir=tmp_path / "api", cache_dtype=storage,
                                 **exact)
    manifest = GradientCache(tmp_path / "api").manifest
    assert (manifest["arguments"]["dtype"], manifest["dtype_storage"]) == ("float64", str(storage)[6:])
    assert torch.equal(GradientCache(tmp_path / "api").matrix(), stored)
    assert cached.dtype == DTYPE
    error = float((cached - full).abs().max() / full.abs().max())
    print(f"{storage} cache: largest score error {error:.2e} of the largest score")
    assert 0 < error <= LOW_PRECISION[storage]
    with pytest.raises(CacheMismatchError, match="dtype_storage"):
        influence.attribute(task, model, train, queries, cache_dir=tmp_path / "api", **exact)


def test_cache_dtype_is_validated(logistic, tmp_path):
    model, train, queries = logistic
    task = ClassificationTask()
    with pytest.raises(InvalidArgumentError, match="cache_dtype=torch.int32.*torch.bfloat16"):
        influence.attribute(task, model, train, queries, cache_dir=tmp_path, cache_dtype=torch.int32)
    with pytest.raises(InvalidArgumentError, match="cache_dtype='bfloat16'"):
        influence.attribute(task, model, train, queries, cache_dir=tmp_path, cache_dtype="bfloat16")
    with pytest.raises(InvalidArgumentError, match="cache_dtype=torch.float32.*cache_dir is None"):
        influence.attribute(task, model, train, queries, cache_dtype=torch.float32)


# -- half-precision gradients ---------------------------------------------------------------------


def _rounded(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).to(DTYPE)


def _unit_rows(t: Tensor) -> Tensor:
    return t / t.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_gradients_round_once_and_accumulate_in_float32(logistic, half, tmp_path):
    """Each method with ``gradient_dtype`` equals float64 products of the once-rounded gradients
    (the solve stays in float64), to the one rounding of each float32-accumulated score."""
    model, train, queries = logistic
    task = ClassificationTask(measurement="margin")
    names = ["weight", "bias"]
    blocks = list(influence.gradients.per_example.iter_gradients(task, model, train, names, batch_size=8,
                                                                  gradient_dtype=half))
    full = gradient_matrix(task, model, train, names, batch_size=8)
    assert {b.dtype for b in blocks} == {half} and torch.equal(torch.cat(blocks), full.to(half))
    q = gradient_matrix(task, model, queries, names, kind="measurement")
    sign, n = influence.gradients.per_example.measurement_sign(task), len(train)
    exact = {"method": "if", "solver": "exact", "damping": 0.0, "regularizer": l2}
    solver = influence.methods.influence_function.fit_inverse_hessian(
        task, model, train, names, solver="exact", damping=0.0, solver_options=None, regularizer=l2, batch_size=8,
        device="cpu", dtype=None)
    expected = {
        "if": _rounded(solver.solve(q), half) @ _rounded(full, half).T * sign / n,
        "grad_dot": _rounded(q, half) @ _rounded(full, half).T * sign,
        "grad_cos": _rounded(_unit_rows(_rounded(q, half)), half) @ _rounded(_unit_rows(_rounded(full, half)), half).T * sign,
    }
    for method, reference in expected.items():
        options = exact if method == "if" else {"method": method}
        scores = influence.attribute(task, model, train, queries, gradient_dtype=half, **options)
        assert scores.dtype == torch.float32, method
        unit = 2.0 ** -8 if half == torch.bfloat16 else 2.0 ** -11  # one rounding of the result
        torch.testing.assert_close(scores.double(), reference, rtol=unit, atol=1e-6 * float(reference.abs().max()),
                                   msg=lambda text: f"{method}: {text}")
        full_precision = influence.attribute(task, model, train, queries, **options)
        error = float((scores.double() - full_precision).abs().max() / full_precision.abs().max())
        assert 0 < error < 2e-2, (method, error)
    cached = influence.attribute(task, model, train, queries, gradient_dtype=half, cache_dir=tmp_path / "cache", **exact)
    torch.testing.assert_close(cached.double(), expected["if"], rtol=2.0 ** -8, atol=1e-6 * float(expected["if"].abs().max()))
    checkpoints = [(s, 0.1) for s in perturbed_states(model, 2)]
    tracin = influence.attribute(task, model, train, queries, method="tracin", checkpoints=checkpoints,
                                 gradient_dtype=half)
    reference = brute_tracin(task, model, train, queries, checkpoints, names)
    assert tracin.dtype == torch.float32
    torch.testing.assert_close(tracin.double(), reference, rtol=2e-2, atol=2e-2 * float(reference.abs().max()))
    self_dot = influence.self_influence(task, model, train, method="grad_dot", gradient_dtype=half)
    torch.testing.assert_close(self_dot.double(), (_rounded(full, half) ** 2).sum(dim=1), rtol=1e-6, atol=0)


def test_half_precision_products_accumulate_in_float32():
    """100,000 products of ones: float32 accumulation gives 100,000; bfloat16 would stall at 256, float16 overflow."""
    from influence.precision import product_t

    for half in (torch.bfloat16, torch.float16):  # float16 also past its largest value, 65,504
        ones = torch.ones(2, 100_000, dtype=half)
        result = product_t(ones, ones)
        assert result.dtype == torch.float32
        torch.testing.assert_close(result, torch.full((2, 2), 100_000.0), rtol=2.0 ** -8, atol=0)


def test_float32_output_kernel_is_probed_once_and_only_a_missing_kernel_means_no(monkeypatch):
    """The probe answers False for a missing kernel (this torch's CPU: NotImplementedError; a torch without
    ``out_dtype``: TypeError) and raises any other error instead of taking it for a missing kernel."""
    from influence import precision

    cpu = torch.device("cpu")
    assert precision._has_float32_output_mm(cpu, torch.bfloat16) is False  # no CPU kernel in this torch
    calls = []

    def mm(*args, **kwargs):
        calls.append(kwargs)
        raise error

    monkeypatch.setattr(precision.torch, "mm", mm)
    for error, expected in ((TypeError("mm() got an unexpected keyword argument 'out_dtype'"), False),
                            (RuntimeError("CUDA error: an illegal memory access"), None)):
        precision._has_float32_output_mm.cache_clear()
        if expected is None:
            with pytest.raises(RuntimeError, match="illegal memory access"):
                precision._has_float32_output_mm(cpu, torch.float16)
        else:
            assert precision._has_float32_output_mm(cpu, torch.float16) is expected
            assert precision._has_float32_output_mm(cpu, torch.float16) is expected  # cached: probed once
    assert len(calls) == 2
    precision._has_float32_output_mm.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_on_cuda_matches_the_cpu(logistic, half):
    """On CUDA the half-precision products (float32 output where torch.mm takes out_dtype) agree with
    the CPU's to one rounding of each score, and the float32 accumulation holds over 100,000 terms."""
    from influence.precision import product_t

    model, train, queries = logistic
    task = ClassificationTask(measurement="margin")
    for method in ("if", "grad_dot"):
        options = {"solver": "exact", "damping": 0.0, "regularizer": l2} if method == "if" else {}
        cpu = influence.attribute(task, model, train, queries, method=method, gradient_dtype=half, **options)
        gpu = influence.attribute(task, zoo.on_device(model, "cuda"), train, queries, method=method, gradient_dtype=half,
                                  device="cuda", **options)
        assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=2.0 ** -7, atol=1e-4 * float(cpu.abs().max()))
    ones = torch.ones(2, 100_000, dtype=half, device="cuda")
    torch.testing.assert_close(product_t(ones, ones).cpu(), torch.full((2, 2), 100_000.0), rtol=2.0 ** -8, atol=0)


def test_gradient_dtype_is_validated(logistic):
    model, train, queries = logistic
    task = ClassificationTask()
    for bad in (torch.float32, "bfloat16", torch.int8):
        with pytest.raises(InvalidArgumentError, match=r"gradient_dtype=.*torch.bfloat16, torch.float16 or None"):
            influence.attribute(task, model, train, queries, gradient_dtype=bad)
    with pytest.raises(InvalidArgumentError, match="gradient_dtype=torch.bfloat16.*tracin_we"):
        influence.attribute(task, model, train, queries, method="tracin_we", checkpoints=[(model.state_dict(), 1.0)],
                            gradient_dtype=torch.bfloat16)


def test_self_influence_is_the_diagonal(logistic):
    model, train, _ = logistic
    task = ClassificationTask()
    exact = {"method": "if", "solver": "exact", "damping": 0.0, "regularizer": l2}
    full = influence.attribute(task, model, train, train, **exact)
    diagonal = influence.self_influence(task, model, train, **exact)
    torch.testing.assert_close(diagonal, full.diagonal(), rtol=1e-10, atol=1e-15)
    assert bool((diagonal > 0).all())


# -- TracIn ------------------------------------------------------------------------------------


def test_tracin_matches_brute_force(logistic, tmp_path):
    model, train, queries = logistic
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = ClassificationTask(measurement="margin")
    states = perturbed_states(model, 3)
    save_file({k: v.contiguous() for k, v in states[1].items()}, str(tmp_path / "c1.safetensors"))
    path = tmp_path / "c1.safetensors"
    checkpoints = [(states[0], 0.5), (path, 0.2), (str(path), 0.1), (states[2], 0.05)]
    reference_checkpoints = [(states[0], 0.5), (states[1], 0.3), (states[2], 0.05)]
    names = ["weight", "bias"]
    expected = brute_tracin(task, model, train, queries, reference_checkpoints, names)
    scores = tracin_scores(task, model, train, queries, checkpoints=checkpoints, batch_size=8)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-13)
    last = tracin_scores(task, model, train, queries, checkpoints=checkpoints, params="last")
    torch.testing.assert_close(last, expected, rtol=1e-10, atol=1e-13)  # one layer: last = all
    only_bias = influence.attribute(task, model, train, queries, method="tracin", checkpoints=checkpoints,
                                    params=["bias"])
    expected_bias = brute_tracin(task, model, train, queries, reference_checkpoints, ["bias"])
    torch.testing.assert_close(only_bias, expected_bias, rtol=1e-10, atol=1e-13)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched


LAST_LAYER_CASES = {
    "mlp": lambda: zoo.tanh_mlp(n_features=4, hidden=5, n_classes=3),
    "TextClassifier": lambda: TextClassifier(15, embed_dim=4, hidden_dim=5, num_classes=2).double(),
}


@pytest.mark.parametrize("case", sorted(LAST_LAYER_CASES))
def test_tracin_last_is_the_final_layer(case):
    torch.manual_seed(0)
    model = LAST_LAYER_CASES[case]().eval()
    if case == "mlp":
        train, queries = logistic_data(n=12, d=4, n_query=3, seed=5)
        train = [{"inputs": z["inputs"], "label": z["label"] % 3} for z in train]
        queries = [{"inputs": x["inputs"], "label": (x["label"] + 1) % 3} for x in queries]
    else:
        train, queries = token_data(10, seed=3), token_data(3, seed=4)
    # "last" = the parameters of the module applied last (the head), not of earlier layers.
    assert select_parameters(model, "last") == ["head.weight", "head.bias"]
    assert select_parameters(model, "all")[-2:] == ["head.weight", "head.bias"]
    assert len(select_parameters(model, "all")) > 2
    task = ClassificationTask()
    checkpoints = [(s, lr) for s, lr in zip(perturbed_states(model, 2), (0.2, 0.1))]
    last = tracin_scores(task, model, train, queries, checkpoints=checkpoints, params="last", batch_size=4)
    expected = brute_tracin(task, model, train, queries, checkpoints, ["head.weight", "head.bias"])
    torch.testing.assert_close(last, expected, rtol=1e-10, atol=1e-13)
    every = brute_tracin(task, model, train, queries, checkpoints, select_parameters(model, "all"))
    assert not torch.allclose(last, every)


def test_tracin_with_projection_matches_projected_brute_force(logistic):
    model, train, queries = logistic
    task = ClassificationTask()
    checkpoints = [(s, 0.1) for s in perturbed_states(model, 2)]
    projection = RandomProjector(10, 6, seed=3).matrix(dtype=DTYPE)
    expected = brute_tracin(task, model, train, queries, checkpoints, ["weight", "bias"],
                            transform=lambda g: g @ projection)
    scores = influence.attribute(task, model, train, queries, method="tracin", checkpoints=checkpoints,
                                 projection_dim=6, projection_seed=3)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-13)


# -- TracIn-WE ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_setup():
    torch.manual_seed(0)
    model = MeanPool().double().eval()
    train, queries = token_data(24, seed=1), token_data(5, seed=2)
    checkpoints = [(s, lr) for s, lr in zip(perturbed_states(model, 3), (0.3, 0.2, 0.1))]
    return model, train, queries, checkpoints


def on_device(text_setup, device):
    """``text_setup``'s model and checkpoints moved to ``device``."""
    model, train, queries, checkpoints = text_setup
    if device == "cpu":
        return text_setup
    moved = [({k: v.to(device) for k, v in state.items()}, lr) for state, lr in checkpoints]
    return zoo.on_device(model, device), train, queries, moved


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_tracin_we_equals_tracin_on_the_embedding(text_setup, device):
    model, train, queries, checkpoints = on_device(text_setup, device)
    task = ClassificationTask()
    sparse = tracin_we_scores(task, model, train, queries, checkpoints=checkpoints, batch_size=7,
                              device=device)
    dense = tracin_scores(task, model, train, queries, checkpoints=checkpoints, params="embedding",
                          device=device)
    assert sparse.device.type == device and dense.device.type == device
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-13)
    assert float(sparse.abs().max()) > 0


@pytest.mark.parametrize("kind", ["conv classifier", "cbow language model", "nested embedding"])
def test_tracin_we_is_generic(kind):
    torch.manual_seed(0)
    if kind == "conv classifier":
        model, task, module = TextClassifier(15, embed_dim=4, hidden_dim=5), ClassificationTask(), "embedding"
        train, queries = token_data(10, seed=3), token_data(3, seed=4)
    elif kind == "cbow language model":
        model, task = CbowLanguageModel(15, embed_dim=4, hidden_dim=5), LanguageModelingTask()
        module = "embedding"
        train = [{"tokens": e["tokens"]} for e in token_data(10, seed=3)]
        queries = [{"tokens": e["tokens"]} for e in token_data(3, seed=4)]
    else:
        model, task = Nested(), ClassificationTask(measurement="margin")
        module = "embeddings.word_embeddings"
        train, queries = token_data(10, seed=3, pad=False), token_data(3, seed=4, pad=False)
    model = model.double().eval()
    checkpoints = [(s, lr) for s, lr in zip(perturbed_states(model, 2), (0.2, 0.1))]
    sparse = tracin_we_scores(task, model, train, queries, checkpoints=checkpoints, embedding_module=module,
                              batch_size=4)
    dense = tracin_scores(task, model, train, queries, checkpoints=checkpoints, params=[module])
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("device", zoo.DEVICES)
def test_tracin_we_word_terms_sum_to_the_score(text_setup, device):
    model, train, queries, checkpoints = on_device(text_setup, device)
    task = ClassificationTask(measurement="margin")
    scores = tracin_we_scores(task, model, train, queries, checkpoints=checkpoints, device=device)
    assert scores.device.type == device
    for q, z in [(0, 0), (1, 5), (4, 23), (2, 11)]:
        terms = tracin_we_words(task, model, queries[q], train[z], checkpoints=checkpoints, device=device)
        shared = set(queries[q]["tokens"].tolist()) & set(train[z]["tokens"].tolist()) - {0}
        assert {w for w, _ in terms} == shared
        assert [t for _, t in terms] == sorted((t for _, t in terms), reverse=True)
        assert sum(t for _, t in terms) == pytest.approx(float(scores[q, z]), rel=1e-10, abs=1e-14)


def test_tracin_we_word_terms_are_each_words_own_rows():
    """Each word's term is that word's embedding row alone: ``s * sum_c lr_c <grad_E[w] f(x), grad_E[w] l(z)>``,
    from dense brute-force gradients. The sum check above would not see words swapped between terms;
    this one does (negative control: the swapped assignment fails it)."""
    torch.manual_seed(0)  # a convolution gives every position its own gradient: words' terms differ
    model = TextClassifier(15, embed_dim=4, hidden_dim=5).double().eval()
    train, queries = token_data(24, seed=1), token_data(5, seed=2)
    checkpoints = [(s, lr) for s, lr in zip(perturbed_states(model, 2), (0.2, 0.1))]
    task = ClassificationTask(measurement="margin")
    vocab, width = model.embedding.weight.shape
    sign = -1.0 if task.higher_is_better else 1.0
    pairs = [(q, z) for q in range(len(queries)) for z in range(len(train))
             if len(set(queries[q]["tokens"].tolist()) & set(train[z]["tokens"].tolist()) - {0}) >= 2][:4]
    assert len(pairs) >= 2
    for q, z in pairs:
        terms = dict(tracin_we_words(task, model, queries[q], train[z], checkpoints=checkpoints))
        per_row = torch.zeros(vocab, dtype=DTYPE)
        for state, lr in checkpoints:
            current = copy.deepcopy(model)
            current.load_state_dict(state)
            gq = brute_gradient(current, task.measurement, queries[q], ["embedding.weight"]).reshape(vocab, width)
            gz = brute_gradient(current, task.train_loss, train[z], ["embedding.weight"]).reshape(vocab, width)
            per_row += sign * lr * (gq * gz).sum(dim=1)

        def matches(assigned: dict[int, float]) -> bool:
            return all(abs(t - float(per_row[w])) <= 1e-10 * max(1.0, abs(float(per_row[w]))) for w, t in assigned.items())

        assert len(terms) >= 2 and matches(terms)
        words = sorted(terms, key=lambda w: terms[w])
        swapped = dict(terms)
        swapped[words[0]], swapped[words[-1]] = terms[words[-1]], terms[words[0]]
        assert not matches(swapped)


def test_tracin_we_top_k_rows():
    torch.manual_seed(0)  # a convolution gives every position its own gradient: no ties in row norms
    model = TextClassifier(15, embed_dim=4, hidden_dim=5).double().eval()
    train, queries = token_data(12, seed=5), token_data(3, seed=6)
    checkpoints = [(s, lr) for s, lr in zip(perturbed_states(model, 2), (0.2, 0.1))]
    task = ClassificationTask()
    full = tracin_we_scores(task, model, train, queries, checkpoints=checkpoints)
    every_row = tracin_we_scores(task, model, train, queries, checkpoints=checkpoints, top_k_rows=6)
    torch.testing.assert_close(every_row, full, rtol=0, atol=0)
    top2 = tracin_we_scores(task, model, train, queries, checkpoints=checkpoints, top_k_rows=2)

    def kept(example, current):  # dense [V, d] gradient with only its 2 largest rows
        g = brute_gradient(current, task.train_loss, example, ["embedding.weight"]).reshape(15, 4)
        mask = torch.zeros(15, dtype=torch.bool)
        mask[torch.linalg.vector_norm(g, dim=1).topk(2).indices] = True
        return g * mask[:, None]

    expected = torch.zeros_like(full)
    for state, lr in checkpoints:
        current = copy.deepcopy(model)
        current.load_state_dict(state)
        q = torch.stack([kept(x, current).reshape(-1) for x in queries])  # measurement = loss here
        t = torch.stack([kept(z, current).reshape(-1) for z in train])
        expected += lr * q @ t.T
    torch.testing.assert_close(top2, expected, rtol=1e-10, atol=1e-13)
    assert not torch.allclose(top2, full)


def test_embedding_rows_leave_out_padding(text_setup):
    model, train, _, _ = text_setup
    batch = default_collate(train[:4])
    rows = embedding_rows(ClassificationTask(), model, batch)
    assert bool((rows.word != 0).all())
    for b in range(4):
        words = set(rows.word[rows.example == b].tolist())
        assert words == set(batch["tokens"][b].tolist()) - {0}


# -- similarities and the API ------------------------------------------------------------------


def test_grad_similarities(text_setup):
    model, train, queries, _ = text_setup
    task = ClassificationTask()
    cos = influence.attribute(task, model, train, queries, method="grad_cos")
    assert bool((cos.abs() <= 1 + 1e-12).all())
    same = similarity_scores(task, model, train, train[:3], similarity="cos")
    torch.testing.assert_close(same[:, :3].diagonal(), torch.ones(3, dtype=DTYPE), rtol=1e-12, atol=1e-12)
    dot = influence.attribute(task, model, train, queries, method="grad_dot")
    tracin_once = tracin_scores(task, model, train, queries, checkpoints=[(model.state_dict(), 1.0)])
    torch.testing.assert_close(dot, tracin_once, rtol=1e-12, atol=1e-15)
    names = [n for n, _ in model.named_parameters()]
    norms = torch.stack([brute_gradient(model, task.train_loss, z, names) for z in train]).norm(dim=1)
    self_dot = influence.self_influence(task, model, train, method="grad_dot")
    torch.testing.assert_close(self_dot, norms**2, rtol=1e-10, atol=1e-14)


def test_self_influence_of_tracin_methods(text_setup):
    model, train, _, checkpoints = text_setup
    task = ClassificationTask()
    for method in ("tracin", "tracin_we"):
        full = influence.attribute(task, model, train, train, method=method, checkpoints=checkpoints)
        diagonal = influence.self_influence(task, model, train, method=method, checkpoints=checkpoints)
        torch.testing.assert_close(diagonal, full.diagonal(), rtol=1e-10, atol=1e-14)


def test_bad_names_list_the_accepted_values(logistic):
    model, train, queries = logistic
    task = ClassificationTask()
    with pytest.raises(InvalidArgumentError, match="'if'.*'tracin'.*'tracin_we'.*'grad_dot'.*'grad_cos'"):
        influence.attribute(task, model, train, queries, method="influence")
    with pytest.raises(InvalidArgumentError, match="'exact'.*'cg'"):
        influence.attribute(task, model, train, queries, solver="newton")
    with pytest.raises(InvalidArgumentError, match="'exact'.*'cg'"):
        influence_scores(task, model, train, queries, solver="newton")
    with pytest.raises(InvalidArgumentError, match="embedding_module.*top_k_rows"):
        influence.attribute(task, model, train, queries, method="tracin_we", checkpoints=[], top_k=3)
    with pytest.raises(InvalidArgumentError, match="checkpoints"):
        influence.attribute(task, model, train, queries, method="tracin")
    with pytest.raises(InvalidArgumentError, match="projection_dim"):
        influence.attribute(task, model, train, queries, method="if", projection_dim=4)
    with pytest.raises(InvalidArgumentError, match="embedding_module"):
        tracin_we_scores(task, model, train, queries, checkpoints=[(model.state_dict(), 1.0)],
                         embedding_module="head")
    with pytest.raises(InvalidArgumentError, match="learning rate"):
        tracin_scores(task, model, train, queries, checkpoints=[(model.state_dict(), "fast")])
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        influence_scores(task, model, train, queries, batch_size=0)


def test_public_exports():
    assert influence.Task is not None and influence.ClassificationTask is ClassificationTask
    assert influence.LanguageModelingTask is LanguageModelingTask
    assert influence.METHODS == ("if", "tracin", "tracin_we", "grad_dot", "grad_cos", "magic")
    assert influence.TrainingRecipe is not None
    assert callable(influence.multistage) and callable(influence.tracin_we_words)


@pytest.mark.gpu
def test_cuda_matches_cpu(text_setup, logistic):
    model, train, queries, checkpoints = text_setup
    task = ClassificationTask()
    for method in ("tracin", "tracin_we", "grad_cos"):
        cpu = influence.attribute(task, model, train, queries, method=method, checkpoints=checkpoints)
        gpu = influence.attribute(task, model, train, queries, method=method, checkpoints=checkpoints,
                                  device="cuda")
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)
    linear, linear_train, linear_queries = logistic
    options = {"solver": "cg", "damping": 1e-3, "regularizer": l2, "solver_options": {"rtol": 1e-12}}
    cpu = influence_scores(task, linear, linear_train, linear_queries, **options)
    gpu = influence_scores(task, linear, linear_train, linear_queries, device="cuda", **options)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-8, atol=1e-12)


def test_a_cache_of_another_model_is_refused(logistic, tmp_path):
    model, train, queries = logistic
    task = ClassificationTask()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.bias.add_(0.1)
    cache = GradientCache(tmp_path / "other").build(task, other, train, ["weight", "bias"], dtype_storage=DTYPE)
    with pytest.raises(InvalidArgumentError, match="this model"):
        influence_scores(task, model, train, queries, solver="exact", regularizer=l2, train_gradients=cache)
    projected = GradientCache(tmp_path / "projected").build(
        task, model, train, ["weight", "bias"], projector=RandomProjector(10, 4, seed=0))
    with pytest.raises(InvalidArgumentError, match="unprojected"):
        influence_scores(task, model, train, queries, solver="exact", regularizer=l2, train_gradients=projected)


def test_tracin_we_ignore_ids_drops_those_words(text_setup):
    """Leaving out a token id (e.g. <unk>) removes exactly that word's terms."""
    from influence.methods.tracin_we import tracin_we_scores, tracin_we_words

    model, train, queries, checkpoints = text_setup
    task = ClassificationTask()
    word = int(queries[0]["tokens"][0])
    full = tracin_we_scores(task, model, train, queries, checkpoints=checkpoints)
    dropped = tracin_we_scores(task, model, train, queries, checkpoints=checkpoints, ignore_ids=(word,))
    for z in range(len(train)):
        terms = dict(tracin_we_words(task, model, queries[0], train[z], checkpoints=checkpoints))
        expected = float(full[0, z]) - terms.get(word, 0.0)
        assert float(dropped[0, z]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert word not in dict(tracin_we_words(task, model, queries[0], train[z], checkpoints=checkpoints, ignore_ids=(word,)))
