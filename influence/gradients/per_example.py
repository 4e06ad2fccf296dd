"""Per-example gradients of a task's training loss or query measurement.

Each example is treated as a batch of one (its tensors are ``unsqueeze``-d) and the gradient of
``task.train_loss`` (or ``task.measurement``) with respect to the selected parameters is taken with
``torch.func.grad``, vectorised over the batch with ``torch.func.vmap``. The model is called
through ``torch.func.functional_call`` so the selected parameters are functional variables while
every other parameter and every buffer is held fixed. Gradients are returned flat, ``[B, P]``, in
the order of :class:`~influence.gradients.layout.ParameterLayout`.

The model should be in ``eval()`` mode: ``vmap`` refuses random operations such as dropout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset

from influence.batches import Batch, map_batch, to_device
from influence.batches import rows as batch_rows
from influence.exceptions import invalid
from influence.gradients.layout import ParameterLayout, select_parameters
from influence.precision import check_gradient_dtype
from influence.task import Task
from influence.validation import check_batch_size

GradientKind = Literal["train_loss", "measurement"]
KINDS: tuple[str, ...] = ("train_loss", "measurement")


def measurement_sign(task: Task) -> float:
    """Orientation factor of scores: ``+1.0`` when a lower measurement is better, else ``-1.0``.

    Multiplying a query-side gradient by this factor makes every score mean "removing the training
    example makes the query worse" when positive.

    Args:
        task: the task.

    Returns:
        ``1.0`` if ``not task.higher_is_better`` else ``-1.0``.
    """
    return -1.0 if task.higher_is_better else 1.0


def resolve_names(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    """Check parameter names against ``model``.

    Args:
        model: the model.
        names: parameter names (kept in the order given), or anything ``select_parameters``
            accepts: a selector such as ``"all"``/``"last"``/``"embedding"``, or module names.

    Returns:
        The list of parameter names.
    """
    if isinstance(names, str):
        return select_parameters(model, names)
    names = list(names)
    if not names:
        raise invalid("names", names, "a non-empty list of parameter names")
    available = dict(model.named_parameters())
    if not all(isinstance(n, str) and n in available for n in names):
        names = select_parameters(model, names)
    if len(set(names)) != len(names):
        raise invalid("names", names, "parameter names without repetition")
    return names


class _TaskCall(nn.Module):
    """Module whose forward evaluates a task, so ``functional_call`` can swap the model's state."""

    def __init__(self, task: Task, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self._task = task
        self._method = method

    def forward(self, batch: Batch) -> Tensor:
        return getattr(self._task, self._method)(self.model, batch)


def functional_state(
    model: nn.Module,
    names: Sequence[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached copies of the selected parameters and of everything held fixed.

    Args:
        model: the model.
        names: selected parameter names.
        device: where to place the tensors (default: where they are).
        dtype: floating dtype to cast floating tensors to (default: unchanged).

    Returns:
        ``(selected, fixed)``: ``{name: tensor}`` for the selected parameters, and for every other
        parameter and every buffer.
    """
    selected_set = set(names)
    params = dict(model.named_parameters())
    selected = {n: to_device(params[n].detach(), device, dtype) for n in names}
    fixed = {n: to_device(p.detach(), device, dtype) for n, p in params.items() if n not in selected_set}
    for n, b in model.named_buffers():
        fixed[n] = to_device(b.detach(), device, dtype)
    return selected, fixed


def task_function(task: Task, model: nn.Module, method: str, fixed: dict[str, Tensor]):
    """``f(selected, batch) -> [B]``: ``task.<method>`` with the selected parameters as variables.

    Args:
        task: the task.
        model: the model whose structure is used.
        method: ``"train_loss"``, ``"measurement"`` or ``"outputs"``.
        fixed: the parameters and buffers held fixed (from :func:`functional_state`).

    Returns:
        A function of ``({name: tensor}, batch)`` suitable for ``torch.func`` transforms.
    """
    wrapper = _TaskCall(task, model, method)
    fixed_prefixed = {f"model.{n}": t for n, t in fixed.items()}

    def call(selected: dict[str, Tensor], batch: Batch) -> Tensor:
        state = dict(fixed_prefixed)
        state.update({f"model.{n}": t for n, t in selected.items()})
        return functional_call(wrapper, state, (batch,))

    return call


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise invalid("kind", kind, "'train_loss' or 'measurement'")


def _per_example(
    task: Task,
    model: nn.Module,
    batch: Batch,
    layout: ParameterLayout,
    selected: dict[str, Tensor],
    fixed: dict[str, Tensor],
    kind: str,
    gradient_dtype: torch.dtype | None = None,
) -> Tensor:
    call = task_function(task, model, kind, fixed)

    def one(sel: dict[str, Tensor], example: Batch) -> Tensor:
        return call(sel, map_batch(example, lambda t: t.unsqueeze(0))).sum()

    grads = vmap(grad(one), in_dims=(None, map_batch(batch, lambda t: 0, lambda v: None)))(selected, batch)
    return layout.flatten_copy({n: g.detach() for n, g in grads.items()}, batch_dims=1, dtype=gradient_dtype)


def per_example_gradients(
    task: Task,
    model: nn.Module,
    batch: Batch,
    names: str | Sequence[str],
    *,
    kind: GradientKind = "train_loss",
) -> Tensor:
    """Gradient of every example's loss (or measurement) with respect to the selected parameters.

    Args:
        task: gives ``train_loss`` / ``measurement`` per example.
        model: the model; parameters outside ``names`` and all buffers are held fixed.
        batch: a batch of ``B`` examples, already on the model's device.
        names: parameter names (or a selector string for ``select_parameters``).
        kind: ``"train_loss"`` or ``"measurement"``.

    Returns:
        Tensor ``[B, P]`` where ``P = ParameterLayout.of(model, names).numel``; the raw gradient of
        ``task.<kind>`` (no sign flip; see :func:`measurement_sign`).
    """
    _check_kind(kind)
    names = resolve_names(model, names)
    layout = ParameterLayout.of(model, names)
    selected, fixed = functional_state(model, names)
    return _per_example(task, model, batch, layout, selected, fixed, kind).detach()


def as_loader(data: Dataset | DataLoader, batch_size: int) -> DataLoader:
    """``data`` itself when it is a ``DataLoader``, else an unshuffled loader over the dataset."""
    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_size=check_batch_size(batch_size), shuffle=False)


def rows_per_chunk(n_params: int, itemsize: int, memory_budget_bytes: int) -> int:
    """How many gradient rows of ``n_params`` entries fit in ``memory_budget_bytes`` (at least 1)."""
    return max(1, int(memory_budget_bytes) // max(1, n_params * itemsize))


def iter_gradients(
    task: Task,
    model: nn.Module,
    data: Dataset | DataLoader,
    names: str | Sequence[str],
    *,
    kind: GradientKind = "train_loss",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    projector: Any = None,
    memory_budget_bytes: int = 256 * 2**20,
    gradient_dtype: torch.dtype | None = None,
) -> Iterator[Tensor]:
    """Per-example gradients over a dataset, in dataset order, in memory-bounded blocks.

    Args:
        task: the task.
        model: the model (its state is read once; it is not modified or moved).
        data: a map-style ``Dataset`` (wrapped in an unshuffled ``DataLoader`` of ``batch_size``)
            or a ``DataLoader`` used as is (it should not shuffle).
        names: parameter names (or a selector string).
        kind: ``"train_loss"`` or ``"measurement"``.
        batch_size: examples per loader batch when ``data`` is a dataset.
        device: device of the computation and of the yielded tensors.
        dtype: floating dtype of the computation (default: the model's).
        projector: optional object with ``project(g [b, P]) -> [b, k]`` (e.g.
            :class:`~influence.gradients.projection.RandomProjector`).
        memory_budget_bytes: bound on one block of raw gradients, ``b * P * itemsize``; a loader
            batch is split into blocks of at most that many rows.
        gradient_dtype: ``torch.bfloat16`` or ``torch.float16``: each gradient (projected gradient
            with a projector) is rounded once to it (:mod:`influence.precision`); ``None``: kept in
            the computation dtype.

    Yields:
        Tensors ``[b, P]`` (or ``[b, k]`` with a projector; projected blocks of one loader batch
        are concatenated), on ``device``, in ``gradient_dtype`` or the computation dtype, whose rows
        follow the dataset order.
    """
    _check_kind(kind)
    gradient_dtype = check_gradient_dtype(gradient_dtype)
    names = resolve_names(model, names)
    layout = ParameterLayout.of(model, names)
    selected, fixed = functional_state(model, names, device=device, dtype=dtype)
    if projector is not None and getattr(projector, "input_dim", layout.numel) != layout.numel:
        raise invalid("projector.input_dim", projector.input_dim, f"P = {layout.numel}")
    work_dtype = next(iter(selected.values())).dtype
    itemsize = (gradient_dtype if projector is None and gradient_dtype is not None else work_dtype).itemsize
    rows = rows_per_chunk(layout.numel, itemsize, memory_budget_bytes)
    for batch in as_loader(data, batch_size):
        batch = to_device(batch, device, dtype)
        n = task.batch_size(batch)
        blocks = []
        for start in range(0, n, rows):
            part = batch_rows(batch, slice(start, min(n, start + rows)))
            if projector is None:
                yield _per_example(task, model, part, layout, selected, fixed, kind, gradient_dtype).detach()
            else:
                projected = projector.project(_per_example(task, model, part, layout, selected, fixed, kind).detach())
                blocks.append(projected if gradient_dtype is None else projected.to(gradient_dtype))
        if projector is not None and blocks:
            yield torch.cat(blocks, dim=0)


def gradient_matrix(
    task: Task,
    model: nn.Module,
    data: Dataset | DataLoader,
    names: str | Sequence[str],
    **options: Any,
) -> Tensor:
    """All per-example gradients of a dataset as one matrix.

    Args:
        task: the task.
        model: the model.
        data: dataset or loader (see :func:`iter_gradients`).
        names: parameter names (or a selector string).
        **options: keyword arguments of :func:`iter_gradients` (``kind``, ``batch_size``,
            ``device``, ``dtype``, ``projector``, ``memory_budget_bytes``, ``gradient_dtype``).

    Returns:
        Tensor ``[N, P]`` (or ``[N, k]`` with a projector) on ``options["device"]``.
    """
    blocks = list(iter_gradients(task, model, data, names, **options))
    if not blocks:
        names = resolve_names(model, names)
        projector = options.get("projector")
        dim = projector.output_dim if projector is not None else ParameterLayout.of(model, names).numel
        return torch.empty(0, dim, device=options.get("device", "cpu"), dtype=options.get("gradient_dtype"))
    return torch.cat(blocks, dim=0)
