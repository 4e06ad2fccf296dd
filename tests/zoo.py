"""Tiny float64 models, datasets and brute-force references shared by the numerical tests.

Models: logistic regression, a two-layer tanh MLP (with a buffer), a tiny embedding + mean-pool
text classifier (dict batches) and a tiny masked-word language model. References are computed
with plain ``torch.autograd`` on a flat-parameter wrapper: a loop of per-example gradients, the
dense Hessian via ``torch.autograd.functional.hessian``, and the Gauss-Newton matrix from explicit
Jacobians. ``DEVICES`` parametrizes an acceptance test over the CPU and CUDA (``gpu``-marked, so
skipped without a device); ``on_device`` moves a model there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from influence.gradients.layout import ParameterLayout
from influence.task import Task

DTYPE = torch.float64

# Devices of the acceptance tests: the CUDA case carries the ``gpu`` marker (skipped without CUDA).
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


def on_device(model: nn.Module, device: str) -> nn.Module:
    """``model`` itself on the CPU, else a copy moved to ``device`` (same dtype, same state)."""
    return model if torch.device(device).type == "cpu" else copy.deepcopy(model).to(device)


def logistic_regression(n_features: int = 4, n_classes: int = 3, seed: int = 0) -> nn.Module:
    """``nn.Linear`` (a multinomial logistic regression), float64."""
    torch.manual_seed(seed)
    return nn.Linear(n_features, n_classes).to(DTYPE)


class TanhMLP(nn.Module):
    """Two-layer tanh MLP ``[B, d] -> [B, C]`` with a fixed input-scaling buffer."""

    def __init__(self, n_features: int = 4, hidden: int = 5, n_classes: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_features, hidden)
        self.head = nn.Linear(hidden, n_classes)
        self.register_buffer("input_scale", torch.linspace(0.5, 1.5, n_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(x * self.input_scale)))


def tanh_mlp(n_features: int = 4, hidden: int = 5, n_classes: int = 3, seed: int = 0) -> nn.Module:
    """A float64 :class:`TanhMLP`."""
    torch.manual_seed(seed)
    return TanhMLP(n_features, hidden, n_classes).to(DTYPE)


class TinyTextClassifier(nn.Module):
    """Embedding, masked mean-pool over non-padding tokens, tanh encoder and linear head."""

    def __init__(self, vocab_size: int = 12, dim: int = 3, n_classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.encoder = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = (tokens != 0).to(self.embedding.weight.dtype)
        pooled = (self.embedding(tokens) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(torch.tanh(self.encoder(pooled)))


def tiny_text_classifier(vocab_size: int = 12, dim: int = 3, n_classes: int = 2, seed: int = 0) -> nn.Module:
    """A float64 :class:`TinyTextClassifier`."""
    torch.manual_seed(seed)
    return TinyTextClassifier(vocab_size, dim, n_classes).to(DTYPE)


class TinyLanguageModel(nn.Module):
    """Tokens ``[B, L]`` -> logits ``[B, L, V]`` from the mean embedding of the sequence."""

    def __init__(self, vocab_size: int = 7, dim: int = 3) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.output = nn.Linear(dim, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        e = self.embedding(tokens)
        context = torch.tanh(e + e.mean(1, keepdim=True))
        return self.output(context)


def tiny_language_model(vocab_size: int = 7, dim: int = 3, seed: int = 0) -> nn.Module:
    """A float64 :class:`TinyLanguageModel`."""
    torch.manual_seed(seed)
    return TinyLanguageModel(vocab_size, dim).to(DTYPE)


class DictDataset(Dataset):
    """Examples as dicts of tensors (batched by the default collate into dicts)."""

    def __init__(self, columns: dict[str, Tensor]) -> None:
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[index] for k, v in self.columns.items()}


def tabular_dataset(n: int = 24, n_features: int = 4, n_classes: int = 3, seed: int = 1) -> TensorDataset:
    """``(x [d] float64, y long)`` tuples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_features, generator=g, dtype=DTYPE)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return TensorDataset(x, y)


def text_dataset(n: int = 20, length: int = 5, vocab_size: int = 12, n_classes: int = 2, seed: int = 2) -> DictDataset:
    """``{"tokens": [L] long (0 = padding), "label": long}`` examples."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab_size, (n, length), generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    tokens[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    labels = torch.randint(0, n_classes, (n,), generator=g)
    return DictDataset({"tokens": tokens, "label": labels})


def token_dataset(n: int = 12, length: int = 4, vocab_size: int = 7, seed: int = 3) -> DictDataset:
    """``{"tokens": [L] long}`` examples with some padding (id 0)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab_size, (n, length), generator=g)
    tokens[::3, -1] = 0
    return DictDataset({"tokens": tokens})


def full_batch(dataset: Dataset) -> Any:
    """The whole dataset as one collated batch."""
    return next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False)))


def flat_parameters(model: nn.Module, names: Sequence[str]) -> Tensor:
    """Selected parameters flattened ``[P]`` (detached)."""
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


def flat_function(
    model: nn.Module,
    names: Sequence[str],
    fn: Callable[[nn.Module], Tensor],
) -> Callable[[Tensor], Tensor]:
    """``theta [P] -> fn(model with selected parameters theta)`` via ``functional_call``."""
    layout = ParameterLayout.of(model, names)

    class _Call(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self) -> Tensor:
            return fn(self.model)

    wrapper = _Call()

    def call(theta: Tensor) -> Tensor:
        state = {f"model.{k}": v for k, v in layout.unflatten(theta).items()}
        return functional_call(wrapper, state, ())

    return call


def brute_per_example_gradients(
    task: Task, model: nn.Module, dataset: Dataset, names: Sequence[str], kind: str = "train_loss"
) -> Tensor:
    """A Python loop of ``torch.autograd.grad`` over single examples: ``[N, P]``."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(dataset)):
        batch = full_batch(torch.utils.data.Subset(dataset, [i]))
        value = getattr(task, kind)(model, batch).sum()
        grads = torch.autograd.grad(value, [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(params[n])).reshape(-1) for g, n in zip(grads, names)
        ]))
    return torch.stack(rows)


def brute_objective(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    names: Sequence[str],
    regularizer: Callable[[dict[str, Tensor]], Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """``theta -> mean train loss over the dataset (+ regulariser)``, as a flat function."""
    batch = full_batch(dataset)

    def fn(m: nn.Module) -> Tensor:
        value = task.train_loss(m, batch).mean()
        if regularizer is not None:
            value = value + regularizer(dict(m.named_parameters()))
        return value

    return flat_function(model, names, fn)


def brute_hessian(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    names: Sequence[str],
    regularizer: Callable[[dict[str, Tensor]], Tensor] | None = None,
) -> Tensor:
    """Dense Hessian ``[P, P]`` of the mean training loss (+ regulariser)."""
    f = brute_objective(task, model, dataset, names, regularizer)
    return torch.autograd.functional.hessian(f, flat_parameters(model, names))


def brute_gauss_newton(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    names: Sequence[str],
    regularizer: Callable[[dict[str, Tensor]], Tensor] | None = None,
) -> Tensor:
    """``J^T H_out J`` ``[P, P]`` from explicit Jacobians, plus the regulariser's Hessian."""
    batch = full_batch(dataset)
    theta = flat_parameters(model, names)
    n = len(dataset)
    outputs_fn = flat_function(model, names, lambda m: task.outputs(m, batch).reshape(-1))
    outputs = outputs_fn(theta).detach()
    shape = task.outputs(model, batch).shape
    jac = torch.autograd.functional.jacobian(outputs_fn, theta)

    def out_loss(o: Tensor) -> Tensor:
        return task.loss_from_outputs(o.reshape(shape), batch).sum() / n

    h_out = torch.autograd.functional.hessian(out_loss, outputs)
    gn = jac.T @ h_out @ jac
    if regularizer is not None:
        reg = flat_function(model, names, lambda m: regularizer(dict(m.named_parameters())))
        gn = gn + torch.autograd.functional.hessian(reg, theta)
    return gn


def proximity_penalty(model: nn.Module, alpha: float, shift: float = 0.1) -> Callable[[dict[str, Tensor]], Tensor]:
    """``(alpha/2) sum ||W - W_ref||^2`` over every parameter, ``W_ref = W + shift``."""
    reference = {n: p.detach().clone() + shift for n, p in model.named_parameters()}

    def penalty(params: dict[str, Tensor]) -> Tensor:
        return alpha / 2 * sum(((params[n] - w) ** 2).sum() for n, w in reference.items())

    return penalty


class MatrixObjective:
    """A stand-in objective whose Hessian is a given symmetric matrix (for solver unit tests)."""

    def __init__(self, matrix: Tensor, gauss_newton_matrix: Tensor | None = None) -> None:
        self.matrix = matrix
        self.gn_matrix = matrix if gauss_newton_matrix is None else gauss_newton_matrix
        self.n_parameters = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.batches = [None]
        self.products = 0

    def matvec(self, v: Tensor, gauss_newton: bool = False, *, batch_indices: Any = None) -> Tensor:
        self.products += 1
        m = self.gn_matrix if gauss_newton else self.matrix
        return v @ m.T

    def hessian(self, gauss_newton: bool = False) -> Tensor:
        return (self.gn_matrix if gauss_newton else self.matrix).clone()


def random_spd(n: int, *, low: float = 0.5, high: float = 5.0, seed: int = 0) -> Tensor:
    """A symmetric positive-definite ``[n, n]`` float64 matrix with eigenvalues in ``[low, high]``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    values = torch.linspace(low, high, n, dtype=DTYPE)
    return (q * values) @ q.T


def fit_logistic(model: nn.Module, rows: list[dict[str, Tensor]], lam: float, weights: Tensor | None = None,
                 tolerance: float = 1e-11) -> None:
    """Fit ``sum_i w_i l_i / n + (lam/2)||theta||^2`` (cross-entropy; ``w = 1`` by default) by Newton's
    method with backtracking, to a gradient norm below ``tolerance`` (in place): retraining to convergence."""
    import torch.nn.functional as F
    from torch.utils.data import default_collate

    batch = default_collate(rows)
    weights = torch.ones(len(rows), dtype=DTYPE) if weights is None else weights
    layout = ParameterLayout.of(model, [n for n, _ in model.named_parameters()])

    def objective(x: Tensor) -> Tensor:
        params = layout.unflatten(x)
        losses = F.cross_entropy(functional_call(model, params, (batch["inputs"],)), batch["label"], reduction="none")
        return (losses * weights).sum() / len(rows) + lam / 2 * sum((p**2).sum() for p in params.values())

    x = layout.flatten({n: p.detach() for n, p in model.named_parameters()})
    gradient_of = torch.func.grad(objective)
    for _ in range(100):
        gradient = gradient_of(x)
        if gradient.norm() < tolerance:
            break
        step = torch.linalg.solve(torch.autograd.functional.hessian(objective, x, vectorize=True), gradient)
        size, value = 1.0, objective(x)
        while objective(x - size * step) > value + 1e-14 and size > 1e-8:  # allowance for rounding
            size /= 2
        x = x - size * step
    else:
        raise RuntimeError("Newton did not converge")
    with torch.no_grad():
        for name, value in layout.unflatten(x).items():
            dict(model.named_parameters())[name].copy_(value)
