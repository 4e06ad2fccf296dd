"""Multi-stage influence against actual two-stage retraining without single pretraining examples.

A word embedding ``E`` is pretrained with a linear decoder (predict a target word from the ``tanh``
of the mean context embedding, l2 on every parameter), then carried into a classifier whose head
is finetuned (l2 on the head) with ``E`` either frozen (``"fixed"``) or trained with the
proximity penalty ``(alpha/2)||E - E_pt||^2`` (``"updated"``). Both stages are minimised to a
gradient norm below 1e-10 in float64 (L-BFGS then Newton). For each removed pretraining example
both stages are re-run from a warm start and the actual change of every query's finetuned loss is
compared with the predicted score (which includes the ``1/n_pt`` factor).

Removing ``z`` means dropping its term from ``(1/n_pt) sum_i l(z_i) + R``: every remaining example
keeps its weight ``1/n_pt``. (Re-normalising the mean to ``1/(n_pt - 1)`` also weakens the l2
regulariser relative to the data by ``1/n_pt``, which shifts every removal's actual change of a
query by the same amount, ``-(1/n_pt) grad f^T H^{-1} grad R``: rankings per query are unchanged,
pooled correlations are not.)

The comparison with retraining runs on every device of ``zoo.DEVICES`` (CUDA ones are
``gpu``-marked): the predicted scores are computed there, the retraining stays on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from influence.exceptions import InvalidArgumentError
from influence.gradients.layout import ParameterLayout
from influence.index import AttributionIndex
from influence.methods.multistage import embedding_sensitivity, multistage_scores
from influence.task import ClassificationTask
from tests import zoo

VOCAB, DIM, CONTEXT, SENTENCE = 12, 3, 3, 4
N_PRETRAIN, N_FINETUNE, N_QUERY, N_REMOVED = 300, 40, 4, 25
LAMBDA_PRETRAIN, LAMBDA_FINETUNE, ALPHA = 0.05, 0.02, 0.05
GRADIENT_TOLERANCE = 1e-10


class Pretrainer(nn.Module):
    """Predict a word from ``tanh(mean of its context's embeddings)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.decoder = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(torch.tanh(self.embedding(tokens).mean(dim=1)))


class Classifier(nn.Module):
    """Two classes from ``tanh(mean of the sentence's embeddings)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embedding(tokens).mean(dim=1)))


def l2_all(params: dict[str, Tensor]) -> Tensor:
    return LAMBDA_PRETRAIN / 2 * sum((p**2).sum() for p in params.values())


def l2_head(params: dict[str, Tensor]) -> Tensor:
    return LAMBDA_FINETUNE / 2 * ((params["head.weight"] ** 2).sum() + (params["head.bias"] ** 2).sum())


def examples(tokens: Tensor, labels: Tensor) -> list[dict[str, Tensor]]:
    return [{"tokens": t, "label": y} for t, y in zip(tokens, labels)]


def make_data() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    true_embedding = torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64)
    true_decoder = torch.randn(VOCAB, DIM, generator=g, dtype=torch.float64)
    context = torch.randint(1, VOCAB, (N_PRETRAIN, CONTEXT), generator=g)
    probabilities = torch.softmax(3 * true_embedding[context].mean(1) @ true_decoder.T, dim=-1)
    target = torch.multinomial(probabilities, 1, generator=g).squeeze(1)
    sentences = torch.randint(1, VOCAB, (N_FINETUNE, SENTENCE), generator=g)
    direction = torch.randn(DIM, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(N_FINETUNE, generator=g, dtype=torch.float64)
    labels = ((true_embedding[sentences].mean(1) @ direction + noise) > 0).long()
    queries = torch.randint(1, VOCAB, (N_QUERY, SENTENCE), generator=g)
    query_labels = torch.randint(0, 2, (N_QUERY,), generator=g)
    return {"context": context, "target": target, "sentences": sentences, "labels": labels,
            "queries": queries, "query_labels": query_labels}


def minimise(model: nn.Module, names: list[str], objective, *, warm: bool) -> None:
    """Minimise ``objective(params) -> scalar`` over ``names`` in place: L-BFGS (unless started
    from a nearby minimum, ``warm``), then Newton."""
    layout = ParameterLayout.of(model, names)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}

    def f(x: Tensor) -> Tensor:
        return objective({**state, **layout.unflatten(x)})

    x = layout.flatten({n: state[n] for n in names})
    if not warm:
        x.requires_grad_(True)
        lbfgs = torch.optim.LBFGS([x], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-15,
                                  history_size=50, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            lbfgs.zero_grad()
            value = f(x)
            value.backward()
            return value

        lbfgs.step(closure)
        x = x.detach()
    gradient_of = torch.func.grad(f)
    factor, previous = None, float("inf")
    for _ in range(100):
        gradient = gradient_of(x)
        norm = float(gradient.norm())
        if norm < GRADIENT_TOLERANCE:
            break
        if factor is None or norm > 0.1 * previous:  # Newton, reusing the Hessian while it contracts fast
            factor = torch.linalg.lu_factor(torch.autograd.functional.hessian(f, x, vectorize=True))
        x = x - torch.linalg.lu_solve(*factor, gradient[:, None])[:, 0]
        previous = norm
    else:
        raise RuntimeError(f"Newton did not converge: gradient norm {norm:.3e}")
    with torch.no_grad():
        for name, value in layout.unflatten(x).items():
            dict(model.named_parameters())[name].copy_(value)


def pretrain(model: Pretrainer, data: dict[str, Tensor], weights: Tensor, *, warm: bool = False) -> None:
    def objective(params: dict[str, Tensor]) -> Tensor:
        logits = functional_call(model, params, (data["context"],))
        losses = F.cross_entropy(logits, data["target"], reduction="none")
        return (losses * weights).sum() / N_PRETRAIN + l2_all(params)

    minimise(model, [n for n, _ in model.named_parameters()], objective, warm=warm)


def finetune(
    model: Classifier, data: dict[str, Tensor], reference: Tensor, mode: str, *, warm: bool = False
) -> None:
    def objective(params: dict[str, Tensor]) -> Tensor:
        logits = functional_call(model, params, (data["sentences"],))
        value = F.cross_entropy(logits, data["labels"]) + l2_head(params)
        if mode == "updated":
            value = value + ALPHA / 2 * ((params["embedding.weight"] - reference) ** 2).sum()
        return value

    names = ["head.weight", "head.bias"] + (["embedding.weight"] if mode == "updated" else [])
    minimise(model, names, objective, warm=warm)


def query_losses(model: Classifier, data: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(data["queries"]), data["query_labels"], reduction="none")


def pearson(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def predict(task, pretrained, finetuned, pretrain_data, finetune_data, query_data, mode, device="cpu"):
    """Multi-stage scores ``[N_QUERY, N_PRETRAIN]`` with exact solvers, computed on ``device``."""
    return multistage_scores(
        task, zoo.on_device(pretrained, device), pretrain_data, task, zoo.on_device(finetuned, device),
        finetune_data, query_data, embedding=mode, alpha=ALPHA if mode == "updated" else 0.0,
        finetune_solver="exact", pretrain_solver="exact", damping=0.0,
        finetune_regularizer=l2_head, pretrain_regularizer=l2_all, batch_size=128, device=device,
    )


@pytest.fixture(scope="module")
def two_stage():
    """Trained models of both modes, predicted scores (exact solvers) and actual changes."""
    torch.manual_seed(0)
    data = make_data()
    pretrained = Pretrainer().double()
    with torch.no_grad():
        for p in pretrained.parameters():
            p.mul_(0.3)
    pretrain(pretrained, data, torch.ones(N_PRETRAIN, dtype=torch.float64))
    pretrain_data = examples(data["context"], data["target"])
    finetune_data = examples(data["sentences"], data["labels"])
    query_data = examples(data["queries"], data["query_labels"])
    task = ClassificationTask()
    head_init = Classifier().double().head.state_dict()
    finetuned, predicted = {}, {}
    for mode in ("fixed", "updated"):
        model = Classifier().double()
        model.head.load_state_dict(head_init)
        with torch.no_grad():
            model.embedding.weight.copy_(pretrained.embedding.weight)
        model.embedding.weight.requires_grad_(mode == "updated")
        finetune(model, data, pretrained.embedding.weight.detach().clone(), mode)
        finetuned[mode] = model
        predicted[mode] = predict(task, pretrained, model, pretrain_data, finetune_data, query_data, mode)
    removed = list(range(N_REMOVED))
    actual = {mode: torch.zeros(N_QUERY, N_REMOVED, dtype=torch.float64) for mode in finetuned}
    base = {mode: query_losses(model, data) for mode, model in finetuned.items()}
    for column, index in enumerate(removed):
        weights = torch.ones(N_PRETRAIN, dtype=torch.float64)
        weights[index] = 0.0
        retrained = Pretrainer().double()
        retrained.load_state_dict(pretrained.state_dict())
        pretrain(retrained, data, weights, warm=True)
        for mode, model in finetuned.items():
            refit = Classifier().double()
            refit.load_state_dict(model.state_dict())
            refit.embedding.weight.requires_grad_(mode == "updated")
            with torch.no_grad():
                if mode == "fixed":
                    refit.embedding.weight.copy_(retrained.embedding.weight)
            finetune(refit, data, retrained.embedding.weight.detach().clone(), mode, warm=True)
            actual[mode][:, column] = query_losses(refit, data) - base[mode]
    return {"data": data, "pretrained": pretrained, "finetuned": finetuned, "predicted": predicted,
            "actual": actual, "removed": removed, "task": task, "pretrain_data": pretrain_data,
            "finetune_data": finetune_data, "query_data": query_data}


@pytest.mark.parametrize("device", zoo.DEVICES)
@pytest.mark.parametrize("mode", ["fixed", "updated"])
def test_multistage_matches_two_stage_retraining(two_stage, mode, device):
    if device == "cpu":  # the fixture's scores were computed on the CPU
        scores = two_stage["predicted"][mode]
    else:
        scores = predict(two_stage["task"], two_stage["pretrained"], two_stage["finetuned"][mode],
                         two_stage["pretrain_data"], two_stage["finetune_data"], two_stage["query_data"],
                         mode, device)
        assert scores.device.type == device
        expected = two_stage["predicted"][mode]
        atol = 1e-10 * float(expected.abs().max())
        torch.testing.assert_close(scores.cpu(), expected, rtol=1e-6, atol=atol)
    predicted = scores[:, two_stage["removed"]].cpu()
    actual = two_stage["actual"][mode]
    assert predicted.shape == (N_QUERY, N_REMOVED)
    correlation = pearson(predicted, actual)
    print(f"multistage {mode}: Pearson {correlation:.4f}")
    assert correlation >= 0.95
    # the scale includes 1/n_pt: a least-squares slope of actual on predicted near one
    slope = float((predicted * actual).sum() / (predicted * predicted).sum())
    assert 0.8 <= slope <= 1.25


def test_modes_are_distinguished(two_stage):
    """Each mode's prediction explains its own retraining better than the other mode's."""
    removed = two_stage["removed"]
    fixed_pred = two_stage["predicted"]["fixed"][:, removed]
    updated_pred = two_stage["predicted"]["updated"][:, removed]
    fixed_actual, updated_actual = two_stage["actual"]["fixed"], two_stage["actual"]["updated"]
    assert pearson(fixed_pred, fixed_actual) > pearson(updated_pred, fixed_actual) + 0.1
    assert pearson(updated_pred, updated_actual) > pearson(fixed_pred, updated_actual) + 0.1


@pytest.mark.parametrize("mode", ["fixed", "updated"])
def test_cg_matches_exact(two_stage, mode):
    scores = multistage_scores(
        two_stage["task"], two_stage["pretrained"], two_stage["pretrain_data"], two_stage["task"],
        two_stage["finetuned"][mode], two_stage["finetune_data"], two_stage["query_data"],
        embedding=mode, alpha=ALPHA, finetune_solver="cg", pretrain_solver="cg", damping=0.0,
        solver_options={"max_iterations": 500, "rtol": 1e-10},
        finetune_regularizer=l2_head, pretrain_regularizer=l2_all, batch_size=512,
    )
    expected = two_stage["predicted"][mode]
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))


@pytest.mark.parametrize("mode", ["fixed", "updated"])
def test_pretraining_index_gives_the_multistage_scores(two_stage, mode, tmp_path):
    """The pretraining half through an attribution index (fit once; each query is one pass over the
    stored rows) equals the one-call multi-stage scores."""
    t = two_stage
    shared = {"embedding.weight": "embedding.weight"}
    sensitivity = embedding_sensitivity(
        t["pretrained"], t["task"], t["finetuned"][mode], t["finetune_data"], t["query_data"], shared=shared,
        embedding=mode, alpha=ALPHA if mode == "updated" else 0.0, finetune_solver="exact", damping=0.0,
        solver_options=None, finetune_regularizer=l2_head, batch_size=128, device="cpu", dtype=None,
    )
    index = AttributionIndex.fit(tmp_path / "pretraining", t["task"], t["pretrained"], t["pretrain_data"], solver="exact",
                                 damping=0.0, regularizer=l2_all, storage_dtype=torch.float64, shard_size=7)
    expected = t["predicted"][mode]
    got = index.score_vectors(sensitivity, names=list(shared.values()))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    top = AttributionIndex.load(tmp_path / "pretraining").top_k_vectors(sensitivity, k=3, names=list(shared.values()))
    torch.testing.assert_close(top.proponents, expected.argsort(dim=1, descending=True)[:, :3], rtol=0, atol=0)


def test_margin_measurement_is_oriented_like_the_loss(two_stage):
    """With two classes, loss = softplus(-margin): the loss scores are sigmoid(-margin) times the
    margin scores (the margin's higher_is_better flips its sign back)."""
    margin_task = ClassificationTask(measurement="margin")
    model = two_stage["finetuned"]["fixed"]
    by_margin = multistage_scores(
        two_stage["task"], two_stage["pretrained"], two_stage["pretrain_data"], margin_task, model,
        two_stage["finetune_data"], two_stage["query_data"], embedding="fixed",
        finetune_solver="exact", pretrain_solver="exact", damping=0.0,
        finetune_regularizer=l2_head, pretrain_regularizer=l2_all,
    )
    batch = {"tokens": two_stage["data"]["queries"], "label": two_stage["data"]["query_labels"]}
    with torch.no_grad():
        margins = margin_task.measurement(model, batch)
    expected = torch.sigmoid(-margins)[:, None] * by_margin
    torch.testing.assert_close(two_stage["predicted"]["fixed"], expected, rtol=1e-8, atol=1e-12)


def test_invalid_arguments(two_stage):
    args = (two_stage["task"], two_stage["pretrained"], two_stage["pretrain_data"], two_stage["task"],
            two_stage["finetuned"]["fixed"], two_stage["finetune_data"], two_stage["query_data"])
    with pytest.raises(InvalidArgumentError, match="'fixed' or 'updated'"):
        multistage_scores(*args, embedding="frozen")
    with pytest.raises(InvalidArgumentError, match="alpha"):
        multistage_scores(*args, embedding="updated", alpha=0.0)
    with pytest.raises(InvalidArgumentError, match="shared"):
        multistage_scores(*args, embedding="fixed", shared={"embedding.weight": "decoder.nothing"})
    with pytest.raises(InvalidArgumentError, match="shape"):
        multistage_scores(*args, embedding="fixed", shared={"embedding.weight": "decoder.bias"})
    with pytest.raises(InvalidArgumentError, match="finetune_params"):
        multistage_scores(*args, embedding="fixed", finetune_params=["embedding"])


# -- the Schur term's curvature, and negative controls ----------------------------------------------


def fixed_sensitivity(task, model, finetune_data, query_data, theta, regularizer, *, inverse_gn: bool, cross_gn: bool | None):
    """``g_W`` of the fixed mode built by hand: ``G_W - H_WTheta H_ThetaTheta^{-1} G_Theta`` with each
    block's curvature chosen (``cross_gn=None``: no Schur term at all)."""
    from influence.gradients.objective import Objective
    from influence.gradients.per_example import gradient_matrix
    from influence.methods.influence_function import fit_inverse_hessian

    w = ["embedding.weight"]
    layout = ParameterLayout.of(model, theta + w)
    queries = gradient_matrix(task, model, query_data, theta + w, kind="measurement", batch_size=128)
    if cross_gn is None:
        return layout.block(queries, w)
    inner = fit_inverse_hessian(task, model, finetune_data, theta, solver="exact", damping=0.0,
                                solver_options={"gauss_newton": inverse_gn}, regularizer=regularizer,
                                batch_size=128, device="cpu", dtype=None)
    u = inner.solve(layout.block(queries, theta))
    full = Objective(task, model, finetune_data, theta + w, regularizer=regularizer, batch_size=128)
    return layout.block(queries, w) - layout.block(full.matvec(layout.embed(u, theta), cross_gn), w)


def pretraining_half(t, sensitivity: Tensor) -> Tensor:
    from influence.methods.multistage import pretraining_scores

    return pretraining_scores(t["task"], t["pretrained"], t["pretrain_data"], sensitivity, shared_names=["embedding.weight"],
                              pretrain_solver="exact", pretrain_damping=0.0, pretrain_regularizer=l2_all,
                              batch_size=128)[:, t["removed"]]


def test_dropping_the_schur_term_fails_the_fixed_mode(two_stage):
    """Negative control: without the head's re-adaptation term the fixed-mode scores no longer explain
    retraining (measured: Pearson 0.51, against 0.9985 with it)."""
    t = two_stage
    sensitivity = fixed_sensitivity(t["task"], t["finetuned"]["fixed"], t["finetune_data"], t["query_data"],
                                    ["head.weight", "head.bias"], l2_head, inverse_gn=False, cross_gn=None)
    correlation = pearson(pretraining_half(t, sensitivity), t["actual"]["fixed"])
    print(f"fixed mode without the Schur term: Pearson {correlation:.4f}")
    assert correlation < 0.7


class DeepClassifier(nn.Module):
    """A hidden layer between the embedding and the head: its Gauss-Newton matrix differs from its Hessian."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.hidden = nn.Linear(DIM, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(torch.tanh(self.embedding(tokens).mean(dim=1)))))


DEEP_THETA = ["hidden.weight", "hidden.bias", "head.weight", "head.bias"]
LAMBDA_DEEP = 1e-3  # at 0.02 the hidden layer collapses to zero (no signal reaches the embedding)


def l2_deep(params: dict[str, Tensor]) -> Tensor:
    return LAMBDA_DEEP / 2 * sum((params[n] ** 2).sum() for n in DEEP_THETA if n in params)


@pytest.fixture(scope="module")
def deep_fixed(two_stage):
    """The fixed mode with :class:`DeepClassifier`: finetuned, and re-finetuned on each retrained embedding."""
    t, data = two_stage, two_stage["data"]

    def finetune_deep(model: nn.Module, warm: bool) -> None:
        def objective(params: dict[str, Tensor]) -> Tensor:
            logits = functional_call(model, params, (data["sentences"],))
            return F.cross_entropy(logits, data["labels"]) + l2_deep(params)

        minimise(model, DEEP_THETA, objective, warm=warm)

    torch.manual_seed(1)
    model = DeepClassifier().double()
    with torch.no_grad():
        model.embedding.weight.copy_(t["pretrained"].embedding.weight)
    finetune_deep(model, warm=False)
    base = query_losses(model, data)
    actual = torch.zeros(N_QUERY, N_REMOVED, dtype=torch.float64)
    for column, index in enumerate(t["removed"]):
        weights = torch.ones(N_PRETRAIN, dtype=torch.float64)
        weights[index] = 0.0
        retrained = Pretrainer().double()
        retrained.load_state_dict(t["pretrained"].state_dict())
        pretrain(retrained, data, weights, warm=True)
        refit = DeepClassifier().double()
        refit.load_state_dict(model.state_dict())
        with torch.no_grad():
            refit.embedding.weight.copy_(retrained.embedding.weight)
        finetune_deep(refit, warm=True)
        actual[:, column] = query_losses(refit, data) - base
    return {**t, "model": model, "actual": actual}


@pytest.mark.parametrize("gauss_newton", [False, True])
def test_fixed_mode_with_a_hidden_layer_matches_retraining(deep_fixed, gauss_newton):
    """The library's fixed mode, with the Hessian or the Gauss-Newton matrix for ``H_ThetaTheta`` (the
    pipeline's default), explains retraining (measured Pearson 0.9985 and 0.9977)."""
    t = deep_fixed
    scores = multistage_scores(
        t["task"], t["pretrained"], t["pretrain_data"], t["task"], t["model"], t["finetune_data"], t["query_data"],
        embedding="fixed", finetune_params=DEEP_THETA, finetune_solver="exact", pretrain_solver="exact", damping=0.0,
        solver_options={"gauss_newton": gauss_newton}, finetune_regularizer=l2_deep, pretrain_regularizer=l2_all,
        pretrain_solver_options={}, batch_size=128,
    )[:, t["removed"]]
    correlation = pearson(scores, t["actual"])
    print(f"fixed mode, hidden layer, gauss_newton={gauss_newton}: Pearson {correlation:.4f}")
    assert correlation >= 0.99


def test_a_gauss_newton_cross_term_fails(deep_fixed):
    """The Schur term's cross block must be the true Hessian's, whatever ``H_ThetaTheta`` is: the
    Gauss-Newton cross block drops a first-order residual term (measured: Pearson -0.15; no Schur term
    at all 0.12; the library's mix 0.998)."""
    t = deep_fixed
    for cross_gn, bound in ((True, 0.3), (None, 0.5)):
        sensitivity = fixed_sensitivity(t["task"], t["model"], t["finetune_data"], t["query_data"], DEEP_THETA,
                                        l2_deep, inverse_gn=True, cross_gn=cross_gn)
        correlation = pearson(pretraining_half(t, sensitivity), t["actual"])
        print(f"cross block {'Gauss-Newton' if cross_gn else 'absent'}: Pearson {correlation:.4f}")
        assert correlation < bound


@pytest.mark.parametrize(("ratio", "slopes"), [(0.1, (0.8, 1.25)), (100.0, (20.0, float("inf")))])
def test_updated_mode_damping_against_alpha(two_stage, ratio, slopes):
    """The updated mode's scores are ``alpha (K + damping I)^{-1}``: a damping of alpha/10 keeps their
    scale (measured slope 1.08), 100 alpha shrinks them about 57-fold, which is why
    ``finetune_damping`` caps the default at alpha/10."""
    t = two_stage
    scores = multistage_scores(
        t["task"], t["pretrained"], t["pretrain_data"], t["task"], t["finetuned"]["updated"], t["finetune_data"],
        t["query_data"], embedding="updated", alpha=ALPHA, finetune_solver="exact", pretrain_solver="exact",
        damping=ratio * ALPHA, pretrain_damping=0.0, finetune_regularizer=l2_head, pretrain_regularizer=l2_all,
        batch_size=128,
    )[:, t["removed"]]
    actual = t["actual"]["updated"]
    slope = float((scores * actual).sum() / (scores * scores).sum())
    print(f"updated mode, damping {ratio} alpha: slope {slope:.3f}")
    assert slopes[0] <= slope <= slopes[1]


def test_default_damping_follows_the_mode():
    from influence.methods.multistage import finetune_damping

    assert finetune_damping(None, "fixed", 0.0) == 1e-3
    assert finetune_damping(None, "updated", 1e-4) == pytest.approx(1e-5)
    assert finetune_damping(None, "updated", 1.0) == 1e-3
    assert finetune_damping(0.5, "updated", 1e-4) == 0.5  # a caller's damping is used as given
