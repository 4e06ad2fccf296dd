"""The public entry points: one call to attribute queries to training examples.

``attribute`` dispatches to a method by name (``"if"``, ``"tracin"``, ``"tracin_we"``,
``"grad_dot"``, ``"grad_cos"``, ``"magic"``); every method returns ``[n_query, n_train]`` scores with the same
orientation (positive = proponent: removing the training example would make the query worse).
``self_influence`` gives each training example's score on itself, ``multistage`` the influence of
pretraining examples on a finetuned model, ``tracin_we_words`` the per-word terms of a TracIn-WE
score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from influence.batches import auto_batch_size
from influence.exceptions import invalid
from influence.gradients.cache import GradientCache
from influence.gradients.layout import ParameterLayout, select_parameters
from influence.gradients.projection import RandomProjector
from influence.methods.influence_function import influence_scores
from influence.methods.magic import TrainingRecipe, magic_scores
from influence.methods.multistage import multistage_scores
from influence.methods.multistage_magic import multistage_magic_scores
from influence.methods.similarity import similarity_scores
from influence.methods.tracin import tracin_scores
from influence.methods.tracin_we import tracin_we_scores, tracin_we_words
from influence.precision import check_gradient_dtype
from influence.solvers import SOLVERS, InverseHessianSolver
from influence.task import Task
from influence.validation import check_batch_size, check_positive_int

METHODS: tuple[str, ...] = ("if", "tracin", "tracin_we", "grad_dot", "grad_cos", "magic")

# method -> keyword options accepted through ``**options`` besides the common arguments
_OPTIONS: dict[str, tuple[str, ...]] = {
    "if": ("solver_options", "regularizer", "hessian_data"),
    "tracin": (),
    "tracin_we": ("embedding_module", "top_k_rows", "ignore_ids"),
    "grad_dot": (),
    "grad_cos": (),
    "magic": ("training", "segment_steps", "replay_tolerance", "query_batch"),
}

multistage = multistage_scores
multistage_magic = multistage_magic_scores

# storage dtypes a gradient cache accepts (``cache_dtype``)
CACHE_DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check(
    method: str,
    solver: Any,
    options: dict[str, Any],
    *,
    checkpoints: Any,
    projection_dim: Any,
    cache_dir: Any,
    cache_dtype: Any = None,
    self_scores: bool = False,
    gradient_dtype: Any = None,
) -> None:
    if method not in METHODS:
        raise invalid("method", method, "one of " + ", ".join(repr(m) for m in METHODS))
    if not isinstance(solver, InverseHessianSolver) and solver not in SOLVERS:
        names = ", ".join(repr(s) for s in SOLVERS)
        raise invalid("solver", solver, f"an InverseHessianSolver or one of {names}")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        accepted = ", ".join(repr(o) for o in _OPTIONS[method]) or "none"
        raise invalid(f"options of method={method!r}", unknown, f"options among: {accepted}")
    if method == "magic" and "training" not in options:
        raise invalid("training", None, "a TrainingRecipe (how the model was trained) for method='magic'")
    if method in ("magic",) and self_scores:
        raise invalid("query_data", None, "queries for method='magic' (it has no self-influence)")
    if method in ("tracin", "tracin_we") and checkpoints is None:
        raise invalid(
            "checkpoints", None,
            f"a sequence of (state dict or path, learning rate) pairs for method={method!r}",
        )
    if projection_dim is not None:
        if method in ("if", "tracin_we"):
            raise invalid(
                "projection_dim", projection_dim,
                f"None for method={method!r} (only 'tracin', 'grad_dot' and 'grad_cos' project)",
            )
        check_positive_int("projection_dim", projection_dim, allow_none=True)
    if cache_dir is not None and (method != "if" or self_scores):
        reason = "self-influence caches no gradients" if self_scores else "only 'if' caches training gradients"
        raise invalid("cache_dir", str(cache_dir), f"None for method={method!r} ({reason})")
    if cache_dtype is not None:
        if not isinstance(cache_dtype, torch.dtype) or cache_dtype not in CACHE_DTYPES:
            names = ", ".join(str(d) for d in CACHE_DTYPES)
            raise invalid("cache_dtype", cache_dtype, f"one of {names}, or None (the computation dtype)")
        if cache_dir is None:
            raise invalid(
                "cache_dtype", cache_dtype,
                "None when cache_dir is None (it is the storage dtype of the gradient cache)",
            )
    if check_gradient_dtype(gradient_dtype) is not None and method in ("tracin_we", "magic"):
        reason = "its word-embedding rows are sparse" if method == "tracin_we" else "it differentiates the training run"
        raise invalid("gradient_dtype", gradient_dtype, f"None for method={method!r} ({reason})")


def _projector(
    model: nn.Module, params: Any, projection_dim: int | None, projection_seed: int
) -> RandomProjector | None:
    if projection_dim is None:
        return None
    names = select_parameters(model, params)
    return RandomProjector(ParameterLayout.of(model, names).numel, projection_dim, seed=projection_seed)


def _batch_size(batch_size: int | None, model: nn.Module, params: Any, dtype: torch.dtype | None, method: str) -> int:
    """The caller's batch size, or :func:`~influence.batches.auto_batch_size` for the attributed parameters."""
    if batch_size is not None:
        return check_batch_size(batch_size)
    if method == "tracin_we":
        return 64
    layout = ParameterLayout.of(model, select_parameters(model, params))
    itemsize = (dtype or next(p for _, p in model.named_parameters()).dtype).itemsize
    return auto_batch_size(layout.numel, itemsize)


def attribute(
    task: Task,
    model: nn.Module,
    train_data: Dataset | DataLoader,
    query_data: Dataset | DataLoader | None,
    *,
    method: str = "if",
    solver: str | InverseHessianSolver = "cg",
    damping: float = 1e-3,
    params: str | Sequence[str] = "all",
    checkpoints: Sequence[Any] | None = None,
    projection_dim: int | None = None,
    projection_seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    cache_dtype: torch.dtype | None = None,
    gradient_dtype: torch.dtype | None = None,
    **options: Any,
) -> Tensor:
    """Score every training example's influence on every query (or, with no queries, on itself).

    Args:
        task: gives the per-example training loss and the query measurement.
        model: the trained model (not modified).
        train_data: the ``n`` training examples (map-style dataset or unshuffled loader).
        query_data: the ``m`` queries; ``None``: each training example's self-influence (see
            :func:`self_influence`).
        method: ``"if"`` (influence function), ``"tracin"``, ``"tracin_we"`` (TracIn on the word
            embedding), ``"grad_dot"``, ``"grad_cos"`` or ``"magic"`` (exact metagradients through the
            recorded training run, :mod:`influence.methods.magic`; ``model`` is the trained model).
        solver: inverse-Hessian solver of ``"if"``: a name among ``influence.solvers.SOLVERS`` or
            an instance.
        damping: damping of ``"if"``'s Hessian.
        params: parameters differentiated (``"all"``, ``"last"``, ``"embedding"`` or names); not
            used by ``"tracin_we"``, which always uses the word embedding.
        checkpoints: ``[(state dict or safetensors path, learning rate), ...]`` for ``"tracin"``
            and ``"tracin_we"``.
        projection_dim: randomly project gradients to this many dimensions (``"tracin"``,
            ``"grad_dot"``, ``"grad_cos"``).
        projection_seed: seed of the projection.
        device: device of the computation.
        batch_size: examples per batch of the gradients and of the Hessian-vector products;
            ``None``: as many rows of gradients as fit in 256 MiB, between 32 and 1,024
            (:func:`influence.batches.auto_batch_size`; 64 for ``"tracin_we"``).
        dtype: floating dtype of the computation (default: the model's).
        cache_dir: for ``"if"``: a directory where the training gradients are cached (built or
            resumed, refused when it was made with other arguments).
        cache_dtype: storage dtype of the cached gradients (``torch.float64``, ``float32``,
            ``float16`` or ``bfloat16``; default: the computation dtype), only with ``cache_dir``.
            Gradients are computed in ``dtype``, rounded to ``cache_dtype`` when stored, and cast
            back to ``dtype`` when scored: e.g. a float64 computation with bfloat16 storage takes
            a quarter of the disk, at a relative rounding error of ``2^-9`` per entry.
        gradient_dtype: ``torch.bfloat16`` or ``torch.float16`` (not for ``"tracin_we"``): the
            per-example gradients are computed in ``dtype``, rounded once to this dtype and
            multiplied in it with float32 accumulation, for half the memory traffic and the
            half-precision matrix units (GPU tensor cores; AMX on recent Xeons; elsewhere it may be
            slower); the curvature fit and solve stay in ``dtype``; scores come back in float32.
            On Fashion-MNIST (``bench/peers.py``) bfloat16 changed the LDS by less than 0.01.
        **options: method-specific options: ``"if"``: ``solver_options``, ``regularizer``,
            ``hessian_data``; ``"tracin_we"``: ``embedding_module``, ``top_k_rows``, ``ignore_ids``
            (token ids left out besides padding, e.g. the unknown-word id); ``"magic"``: ``training``
            (a :class:`~influence.methods.magic.TrainingRecipe`, required), ``segment_steps``,
            ``replay_tolerance``.

    Returns:
        Tensor ``[m, n]``; positive = proponent (removing the training example makes the query
        worse). ``"if"`` scores include the factor ``1/n``; the TracIn family and similarities do
        not. With ``query_data=None``, ``[n]``.
    """
    _check(
        method, solver, options, checkpoints=checkpoints, projection_dim=projection_dim, cache_dir=cache_dir,
        cache_dtype=cache_dtype, self_scores=query_data is None, gradient_dtype=gradient_dtype,
    )
    common = {"batch_size": _batch_size(batch_size, model, params, dtype, method), "device": device, "dtype": dtype}
    if method == "if":
        train_gradients = None
        if cache_dir is not None:
            names = select_parameters(model, params)
            storage = cache_dtype or dtype or dict(model.named_parameters())[names[0]].dtype
            train_gradients = GradientCache(cache_dir).build(
                task, model, train_data, names, kind="train_loss", dtype_storage=storage, **common,
            )
        return influence_scores(
            task, model, train_data, query_data, params=params, solver=solver, damping=damping,
            train_gradients=train_gradients, gradient_dtype=gradient_dtype, **options, **common,
        )
    if method == "magic":
        return magic_scores(task, model, train_data, query_data, **options, **common)
    if method == "tracin_we":
        return tracin_we_scores(task, model, train_data, query_data, checkpoints=checkpoints, **options, **common)
    projector = _projector(model, params, projection_dim, projection_seed)
    if method == "tracin":
        return tracin_scores(task, model, train_data, query_data, checkpoints=checkpoints, params=params,
                             projector=projector, gradient_dtype=gradient_dtype, **common)
    return similarity_scores(task, model, train_data, query_data, similarity=method.removeprefix("grad_"),
                             params=params, projector=projector, gradient_dtype=gradient_dtype, **common)


def self_influence(task: Task, model: nn.Module, train_data: Dataset | DataLoader, **options: Any) -> Tensor:
    """Each training example's score on its own training loss (large for outliers and mislabels): ``[n]``.

    The query side uses the training loss (not the task's measurement) and no sign flip:
    ``"if"``: ``(1/n) g^T (H + damping I)^{-1} g``; ``"tracin"``: ``sum_c lr_c ||g_c||^2``;
    ``"tracin_we"``: ``sum_c lr_c sum_w ||G_c[w]||^2``; ``"grad_dot"``: ``||g||^2``;
    ``"grad_cos"``: 1 (0 for a zero gradient).

    Keyword arguments are those of :func:`attribute` (``method``, ``solver``, ``damping``,
    ``params``, ``checkpoints``, ``projection_dim``, ``device``, ``batch_size``, ``dtype`` and the
    method's options), which this calls with ``query_data=None`` (without ``cache_dir``).
    """
    return attribute(task, model, train_data, None, **options)


__all__ = ["CACHE_DTYPES", "METHODS", "TrainingRecipe", "attribute", "multistage", "multistage_magic", "self_influence",
           "tracin_we_words"]
