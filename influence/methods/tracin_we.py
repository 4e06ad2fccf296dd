"""TracIn-WE (Yeh et al. 2022, "First is better than last for language data influence").

TracIn restricted to the gradient of the word-embedding matrix ``E`` ``[V, d]``. An example's
gradient with respect to ``E`` is sparse: only the rows of the words it contains are non-zero,
``G(x)[w] = sum_{t: x_t = w} d loss / d e_t``. Hence

    score(x, z) = s * sum_c lr_c * sum_{w in words(x) & words(z)} <G_c(x)[w], G_c(z)[w]>,

with ``s = measurement_sign(task)`` (positive = proponent) and no ``1/n``: only words shared by
the query and the training example contribute, and each shared word's term is reported by
:func:`tracin_we_words`.

The rows are computed generically for any model whose words go through an ``nn.Embedding``
(``embedding_module``, e.g. ``"embedding"`` or HF BERT's ``"embeddings.word_embeddings"``): a
forward hook replaces the module's output ``[B, L, d]`` with a detached leaf, the *sum* of the
batch's per-example losses is differentiated with respect to it (each example only reaches its
own positions, so row ``b`` holds ``d loss_b / d e_{b, t}``), and the position gradients are summed
per ``(example, word id)``. Only the embedding-lookup path is captured (a tied output matrix is
not). The padding id (the module's ``padding_idx``, else the model's ``padding_idx`` attribute)
is left out; its row receives no gradient when padding is masked or ``padding_idx`` is set.

``top_k_rows=k`` is the paper's top-k variant: each example keeps only its ``k`` rows of largest
norm (on both the query and the training side).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate

from influence.batches import to_device
from influence.exceptions import invalid
from influence.gradients.per_example import as_loader, measurement_sign
from influence.methods.common import (
    Checkpoint,
    checkpoint_entries,
    model_at,
    require_examples,
    sum_over_checkpoints,
)
from influence.task import Task
from influence.validation import check_batch_size, check_positive_int

ROW_BUDGET_ELEMENTS = 2**24


@dataclass(frozen=True)
class EmbeddingRows:
    """Sparse word-embedding gradients of a batch: one row per (example, word) pair.

    Attributes:
        example: ``[R]`` example index within the batch.
        word: ``[R]`` word id.
        rows: ``[R, d]`` gradient of the example's loss with respect to that word's embedding row.
        n_examples: ``B``, the number of examples of the batch.
    """

    example: Tensor
    word: Tensor
    rows: Tensor
    n_examples: int


def embedding_module(model: nn.Module, name: str) -> nn.Embedding:
    """The ``nn.Embedding`` called ``name`` inside ``model``.

    Args:
        model: the model.
        name: a module name from ``model.named_modules()``, e.g. ``"embedding"``.

    Returns:
        The module.
    """
    modules = dict(model.named_modules())
    module = modules.get(name)
    if not isinstance(module, nn.Embedding):
        embeddings = sorted(n for n, m in modules.items() if isinstance(m, nn.Embedding))
        raise invalid("embedding_module", name, f"the name of an nn.Embedding among {embeddings}")
    return module


def _padding_id(model: nn.Module, module: nn.Embedding) -> int | None:
    if module.padding_idx is not None:
        return int(module.padding_idx)
    value = getattr(model, "padding_idx", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def embedding_rows(
    task: Task,
    model: nn.Module,
    batch: Any,
    *,
    module_name: str = "embedding",
    kind: str = "train_loss",
    top_k_rows: int | None = None,
    ignore_ids: Sequence[int] = (),
) -> EmbeddingRows:
    """Per-example word-embedding gradients of one batch, as sparse rows.

    Args:
        task: the task; its ``kind`` method gives per-example values ``[B]``.
        model: the model (examples must be independent: no batch norm); not modified.
        batch: a batch of ``B`` examples on the model's device.
        module_name: name of the word ``nn.Embedding`` module.
        kind: ``"train_loss"`` or ``"measurement"``.
        top_k_rows: keep only each example's ``k`` rows of largest norm (``None``: all).
        ignore_ids: more token ids to leave out besides padding, e.g. the unknown-word id, whose
            row is shared by every out-of-vocabulary word and so is no evidence of a shared word.

    Returns:
        :class:`EmbeddingRows` sorted by example; rows of the padding id are left out.
    """
    if kind not in ("train_loss", "measurement"):
        raise invalid("kind", kind, "'train_loss' or 'measurement'")
    module = embedding_module(model, module_name)
    calls: list[tuple[Tensor, Tensor]] = []

    def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> Tensor:
        if not inputs:
            raise invalid(
                "embedding_module call", "token ids given by keyword", "token ids given positionally"
            )
        leaf = output.detach().requires_grad_(True)
        calls.append((inputs[0], leaf))
        return leaf

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            values = getattr(task, kind)(model, batch)
            if not calls:
                raise invalid(
                    "embedding_module", module_name, "a module that the model calls on its inputs"
                )
            grads = torch.autograd.grad(values.sum(), [leaf for _, leaf in calls], allow_unused=True)
    finally:
        handle.remove()
    n_examples = int(values.shape[0])
    vocab = module.num_embeddings
    padding = _padding_id(model, module)
    keys, vectors = [], []
    for (ids, leaf), grad in zip(calls, grads):
        if grad is None:
            continue
        if ids.dim() != 2 or ids.shape[0] != n_examples:
            raise invalid(
                "embedding input shape", tuple(ids.shape), f"token ids [B, L] with B = {n_examples}"
            )
        ids = ids.to(grad.device)
        mask = torch.ones_like(ids, dtype=torch.bool) if padding is None else ids != padding
        for ignored in ignore_ids:
            mask &= ids != int(ignored)
        example = torch.arange(n_examples, device=ids.device)[:, None].expand_as(ids)
        keys.append((example * vocab + ids)[mask])
        vectors.append(grad[mask])
    dim = module.embedding_dim
    if not keys:
        empty = torch.zeros(0, dtype=torch.long, device=values.device)
        return EmbeddingRows(empty, empty, values.new_zeros(0, dim), n_examples)
    unique, inverse = torch.unique(torch.cat(keys), return_inverse=True)
    rows = vectors[0].new_zeros(unique.shape[0], dim).index_add_(0, inverse, torch.cat(vectors))
    result = EmbeddingRows(unique // vocab, unique % vocab, rows.detach(), n_examples)
    return result if top_k_rows is None else keep_top_rows(result, top_k_rows)


def keep_top_rows(rows: EmbeddingRows, k: int) -> EmbeddingRows:
    """Each example's ``k`` rows of largest norm (ties: smaller word id first), in the input's order.

    Args:
        rows: sparse rows of a batch.
        k: rows kept per example (a positive integer).

    Returns:
        The kept rows.
    """
    check_positive_int("top_k_rows", k)
    norms = torch.linalg.vector_norm(rows.rows, dim=1)
    order = torch.argsort(norms, descending=True, stable=True)
    order = order[torch.argsort(rows.example[order], stable=True)]
    example = rows.example[order]
    counts = torch.bincount(example, minlength=rows.n_examples)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(example.shape[0], device=example.device) - starts[example]
    keep = order[rank < k]
    keep = keep.sort().values  # back to the input's (example, word) order
    return EmbeddingRows(rows.example[keep], rows.word[keep], rows.rows[keep], rows.n_examples)


def _prepared(model: nn.Module, state: Any, module_name: str, device, dtype) -> nn.Module:
    weight = f"{module_name}.weight"
    current = model_at(model, state, [weight])
    return current.to(device=device, dtype=dtype) if dtype is not None else current.to(device=device)


def _all_rows(task, model, data, *, module_name, kind, top_k_rows, batch_size, device, dtype, ignore_ids=()):
    for batch in as_loader(data, batch_size):
        batch = to_device(batch, device, dtype)
        yield embedding_rows(task, model, batch, module_name=module_name, kind=kind, top_k_rows=top_k_rows,
                             ignore_ids=ignore_ids)


def _dense_queries(parts: list[EmbeddingRows], vocab: int) -> tuple[Tensor, Tensor]:
    """Query rows, dense ``[Q, U, d]`` over the ``U`` words the queries contain; ``[V]`` word -> slot."""
    example = torch.cat([p.example + offset for p, offset in zip(parts, _offsets(parts))])
    word = torch.cat([p.word for p in parts])
    rows = torch.cat([p.rows for p in parts])
    n_queries = sum(p.n_examples for p in parts)
    words, slot = torch.unique(word, return_inverse=True)
    dense = rows.new_zeros(n_queries, words.shape[0], rows.shape[1])
    dense[example, slot] = rows
    lookup = torch.full((vocab,), -1, dtype=torch.long, device=rows.device)
    lookup[words] = torch.arange(words.shape[0], device=rows.device)
    return dense, lookup


def _offsets(parts: list[EmbeddingRows]) -> list[int]:
    out, total = [], 0
    for p in parts:
        out.append(total)
        total += p.n_examples
    return out


def _row_scores(dense: Tensor, lookup: Tensor, train: EmbeddingRows) -> Tensor:
    """``[Q, B]``: sum over shared words of query row . training row, for one training batch."""
    scores = dense.new_zeros(dense.shape[0], train.n_examples)
    slot = lookup[train.word.to(lookup.device)]
    shared = slot >= 0
    slot, example, rows = slot[shared], train.example[shared], train.rows[shared].to(dense.dtype)
    step = max(1, ROW_BUDGET_ELEMENTS // max(1, dense.shape[0] * dense.shape[2]))
    for start in range(0, slot.shape[0], step):
        stop = start + step
        values = torch.einsum("qrd,rd->qr", dense[:, slot[start:stop]], rows[start:stop])
        scores.index_add_(1, example[start:stop], values)
    return scores


def tracin_we_scores(
    task: Task,
    model: nn.Module,
    train_data: Dataset | DataLoader,
    query_data: Dataset | DataLoader | None,
    *,
    checkpoints: Sequence[Checkpoint],
    embedding_module: str = "embedding",
    top_k_rows: int | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    ignore_ids: Sequence[int] = (),
) -> Tensor:
    """TracIn-WE scores of every (query, training example) pair, or each training example's self-influence.

    Args:
        task: gives the per-example training loss and the query measurement.
        model: a model of the trained architecture; each checkpoint is loaded into a copy of it.
        train_data: the ``n`` training examples (map-style dataset or unshuffled loader).
        query_data: the ``m`` query examples; ``None`` for self-influence.
        checkpoints: ``[(state dict or safetensors path, learning rate), ...]`` (or objects with
            ``.path`` and ``.learning_rate``).
        embedding_module: name of the word ``nn.Embedding`` module.
        top_k_rows: keep only each example's ``k`` embedding-gradient rows of largest norm.
        batch_size: examples per batch.
        device: device of the computation.
        dtype: floating dtype of the computation (default: the model's).
        ignore_ids: token ids left out besides padding (e.g. the unknown-word id).

    Returns:
        Tensor ``[m, n]`` on ``device``:
        ``s * sum_c lr_c sum_{w in words(x) & words(z)} <G_c(x)[w], G_c(z)[w]>``; for
        ``query_data=None``, ``[n]``: ``sum_c lr_c sum_w ||G_c(z)[w]||^2`` (no sign).
    """
    options = {"module_name": embedding_module, "top_k_rows": top_k_rows, "batch_size": check_batch_size(batch_size),
               "device": device, "dtype": dtype, "ignore_ids": tuple(ignore_ids)}

    def self_scores(current: nn.Module) -> Tensor:
        parts = []
        for rows in _all_rows(task, current, train_data, kind="train_loss", **options):
            squared = (rows.rows * rows.rows).sum(dim=1)
            parts.append(squared.new_zeros(rows.n_examples).index_add_(0, rows.example, squared))
        return require_examples(torch.cat(parts) if parts else torch.zeros(0))

    def at_checkpoint(current: nn.Module) -> Tensor:
        queries = list(_all_rows(task, current, query_data, kind="measurement", **options))
        if not queries:
            raise invalid("query_data", "an empty dataset", "at least one query")
        dense, lookup = _dense_queries(queries, embedding_module_size(current, embedding_module))
        blocks = [_row_scores(dense, lookup, rows) for rows in _all_rows(task, current, train_data, kind="train_loss", **options)]
        return require_examples(torch.cat(blocks, dim=1) if blocks else dense.new_zeros(dense.shape[0], 0))

    load = lambda state: _prepared(model, state, embedding_module, device, dtype)  # noqa: E731
    if query_data is None:
        return sum_over_checkpoints(checkpoints, load, self_scores)
    return sum_over_checkpoints(checkpoints, load, at_checkpoint) * measurement_sign(task)


def embedding_module_size(model: nn.Module, name: str) -> int:
    """``V``, the number of rows of the embedding module ``name``."""
    return embedding_module(model, name).num_embeddings


def tracin_we_self_scores(task: Task, model: nn.Module, train_data: Dataset | DataLoader, **options: Any) -> Tensor:
    """TracIn-WE self-influence ``sum_c lr_c sum_w ||G_c(z)[w]||^2`` of every training example: ``[n]``.

    Keyword arguments are those of :func:`tracin_we_scores` (which this calls with ``query_data=None``).
    """
    return tracin_we_scores(task, model, train_data, None, **options)


def tracin_we_words(
    task: Task,
    model: nn.Module,
    query_example: Mapping[str, Tensor] | Any,
    train_example: Mapping[str, Tensor] | Any,
    *,
    checkpoints: Sequence[Checkpoint],
    embedding_module: str = "embedding",
    top_k_rows: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    ignore_ids: Sequence[int] = (),
) -> list[tuple[int, float]]:
    """The per-word terms of one pair's TracIn-WE score.

    Args:
        task: the task.
        model: a model of the trained architecture.
        query_example: one query, as a dataset returns it (no batch dimension), e.g.
            ``{"tokens": [L], "label": []}``.
        train_example: one training example, in the same form.
        checkpoints: as in :func:`tracin_we_scores`.
        embedding_module: name of the word ``nn.Embedding`` module.
        top_k_rows: as in :func:`tracin_we_scores`.
        device: device of the computation.
        dtype: floating dtype of the computation.
        ignore_ids: as in :func:`tracin_we_scores`.

    Returns:
        ``[(word id, term), ...]`` over the words the two examples share, sorted by decreasing
        term; the terms sum to the pair's :func:`tracin_we_scores` entry.
    """
    entries = checkpoint_entries(checkpoints)
    query_batch = to_device(default_collate([query_example]), device, dtype)
    train_batch = to_device(default_collate([train_example]), device, dtype)
    terms: dict[int, float] = {}
    sign = measurement_sign(task)
    for state, learning_rate in entries:
        current = _prepared(model, state, embedding_module, device, dtype)
        query = embedding_rows(task, current, query_batch, module_name=embedding_module,
                               kind="measurement", top_k_rows=top_k_rows, ignore_ids=ignore_ids)
        train = embedding_rows(task, current, train_batch, module_name=embedding_module,
                               kind="train_loss", top_k_rows=top_k_rows, ignore_ids=ignore_ids)
        query_rows = {int(w): r for w, r in zip(query.word.tolist(), query.rows)}
        for word, row in zip(train.word.tolist(), train.rows):
            if word in query_rows:
                term = sign * learning_rate * float(query_rows[word] @ row.to(query_rows[word].dtype))
                terms[word] = terms.get(word, 0.0) + term
    return sorted(terms.items(), key=lambda item: item[1], reverse=True)


__all__ = [
    "EmbeddingRows",
    "embedding_rows",
    "keep_top_rows",
    "tracin_we_scores",
    "tracin_we_self_scores",
    "tracin_we_words",
]
