"""Small helpers shared by the attribution methods: solvers by name, checkpoints, score streaming.

Nothing here is an attribution method itself; every method module composes these pieces with the
gradient and solver modules.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from influence.exceptions import InvalidArgumentError, invalid
from influence.precision import is_half, product_t
from influence.solvers import SOLVERS, InverseHessianSolver, make_solver

Checkpoint = tuple[Mapping[str, Tensor] | str | Path, float]
_CHECKPOINTS = "a non-empty sequence of (state dict or path, learning rate) pairs"


def build_solver(
    solver: str | InverseHessianSolver,
    *,
    damping: float,
    solver_options: Mapping[str, Any] | None,
    argument: str = "solver",
) -> InverseHessianSolver:
    """An unfitted solver from a name (with ``damping`` and options) or a solver instance as is.

    Args:
        solver: a name among :data:`influence.solvers.SOLVERS` or an ``InverseHessianSolver``
            (then ``damping`` and ``solver_options`` are not used: the instance carries its own).
        damping: ``lambda >= 0`` added to the Hessian's diagonal.
        solver_options: extra keyword arguments of the solver's class (``max_iterations``, ...).
        argument: the argument's name in error messages.

    Returns:
        An ``InverseHessianSolver``, to be fitted by the caller.
    """
    if isinstance(solver, InverseHessianSolver):
        return solver
    if not isinstance(solver, str) or solver not in SOLVERS:
        names = ", ".join(repr(s) for s in SOLVERS)
        raise invalid(argument, solver, f"an InverseHessianSolver or one of {names}")
    options = dict(solver_options or {})
    if "damping" in options:
        raise invalid("solver_options", sorted(options), "options without 'damping' (pass damping=...)")
    return make_solver(solver, damping=damping, **options)


def stream_products(left: Tensor, blocks: Iterable[Tensor], *, dtype: torch.dtype | None = None) -> Tensor:
    """``left @ G^T`` where ``G`` arrives as row blocks; never holds ``G`` whole.

    Args:
        left: ``[m, P]`` query-side vectors.
        blocks: iterable of ``[b_i, P]`` blocks whose rows follow the training order.
        dtype: dtype both sides are multiplied in (default: ``left``'s); a half dtype
            (:data:`influence.precision.GRADIENT_DTYPES`) accumulates in float32.

    Returns:
        Tensor ``[m, N]`` with ``N = sum_i b_i``, on ``left``'s device; float32 when multiplied in half
        precision, else in ``left``'s dtype.
    """
    compute = dtype or left.dtype
    result = torch.float32 if is_half(compute) else left.dtype
    lhs = left.to(compute)
    parts = []
    for block in blocks:
        if block.shape[-1] != left.shape[-1]:
            raise invalid("gradient block width", block.shape[-1], f"{left.shape[-1]} (the query side's)")
        parts.append(product_t(lhs, block.to(device=left.device, dtype=compute)).to(result))
    if not parts:
        return left.new_zeros(left.shape[0], 0, dtype=result)
    return torch.cat(parts, dim=1)


def checkpoint_entries(checkpoints: Any) -> list[tuple[Mapping[str, Tensor] | str | Path, float]]:
    """Normalise TracIn checkpoints into ``[(state dict or path, learning rate), ...]``.

    Args:
        checkpoints: a non-empty sequence of ``(state, lr)`` pairs, where ``state`` is a state dict
            or a safetensors path, or of objects with ``.path`` and ``.learning_rate`` attributes
            (``influence.models.checkpoints.CheckpointInfo``).

    Returns:
        The list of ``(state, learning_rate)`` pairs.
    """
    if isinstance(checkpoints, (str, Path, Mapping)) or not isinstance(checkpoints, Sequence):
        raise invalid("checkpoints", type(checkpoints).__name__, _CHECKPOINTS)
    entries = []
    for item in checkpoints:
        if hasattr(item, "path") and hasattr(item, "learning_rate"):
            state, lr = item.path, item.learning_rate
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            state, lr = item
        else:
            raise invalid("checkpoint", item, "a (state dict or path, learning rate) pair")
        if not isinstance(state, (Mapping, str, Path)):
            raise invalid("checkpoint state", type(state).__name__, "a state dict or a safetensors path")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise invalid("checkpoint learning rate", lr, "a finite number")
        entries.append((state, float(lr)))
    if not entries:
        raise invalid("checkpoints", checkpoints, _CHECKPOINTS)
    return entries


def model_at(model: nn.Module, state: Mapping[str, Tensor] | str | Path, names: Sequence[str]) -> nn.Module:
    """A deep copy of ``model`` with a checkpoint's state loaded into it.

    Args:
        model: the model (not modified).
        state: a state dict, or the path of a safetensors file holding one.
        names: parameters that the checkpoint must contain (the ones attribution differentiates).

    Returns:
        The copy, in ``eval()`` mode. Entries of the model missing from the checkpoint keep the
        model's values; unknown entries and missing ``names`` raise.
    """
    if isinstance(state, (str, Path)):
        path = Path(state)
        if not path.is_file():
            raise invalid("checkpoint path", str(path), "an existing safetensors file")
        state = load_file(str(path))
    copied = copy.deepcopy(model)
    try:
        result = copied.load_state_dict(dict(state), strict=False)
    except RuntimeError as error:
        raise InvalidArgumentError(f"the checkpoint does not fit the model: {error}") from error
    if result.unexpected_keys:
        raise invalid(
            "checkpoint keys", sorted(result.unexpected_keys), "only names of the model's state dict"
        )
    missing = sorted(set(result.missing_keys) & set(names))
    if missing:
        raise invalid("checkpoint", f"without {missing}", "a state dict holding every attributed parameter")
    return copied.eval()


def sum_over_checkpoints(
    checkpoints: Any, load: Callable[[Any], nn.Module], score: Callable[[nn.Module], Tensor]
) -> Tensor:
    """``sum_c lr_c * score(model at checkpoint c)``: the sum every TracIn-style method takes.

    Args:
        checkpoints: as :func:`checkpoint_entries` accepts them.
        load: ``state -> model`` at that checkpoint (e.g. ``lambda s: model_at(model, s, names)``).
        score: ``model -> tensor`` (scores ``[m, n]`` or self-scores ``[n]``) at one checkpoint.

    Returns:
        The weighted sum, of ``score``'s shape.
    """
    total: Tensor | None = None
    for state, learning_rate in checkpoint_entries(checkpoints):
        value = learning_rate * score(load(state))
        total = value if total is None else total + value
    return total


def require_examples(scores: Tensor, argument: str = "train_data", what: str = "at least one training example") -> Tensor:
    """``scores`` ``[..., n]`` when ``n > 0``, else raise that ``argument`` is empty."""
    if scores.shape[-1] == 0:
        raise invalid(argument, "an empty dataset", what)
    return scores
