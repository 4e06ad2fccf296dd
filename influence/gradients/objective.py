"""The training objective as a function of the selected parameters, with exact curvature products.

``Objective`` is ``L(theta) = (1/n) sum_i task.train_loss(z_i; theta) + R(theta)`` over a dataset
(or a seeded subsample of it), where ``theta`` are the selected parameters (every other parameter
and every buffer is held fixed) and ``R`` an optional regulariser that receives the full
``{name: parameter}`` dict.

Curvature products:

- :meth:`Objective.hvp` gives exact Hessian-vector products ``H v`` by forward-over-reverse
  differentiation (``torch.func.jvp`` of ``torch.func.grad``), vectorised over several vectors with
  ``torch.func.vmap`` and accumulated over data batches.
- :meth:`Objective.gnhvp` gives Gauss-Newton products ``J^T H_out J v`` (``J`` the Jacobian of
  ``task.outputs`` and ``H_out`` the Hessian of ``task.loss_from_outputs`` with respect to the
  outputs), which is positive semi-definite for convex losses such as cross-entropy; the
  regulariser's own Hessian is added exactly.

Data batches are collated once at construction, so repeated products do not re-read the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap
from torch.utils.data import DataLoader, Dataset, Subset

from influence.batches import Batch, to_device
from influence.exceptions import invalid
from influence.gradients.layout import ParameterLayout
from influence.gradients.per_example import (
    functional_state,
    resolve_names,
    task_function,
)
from influence.regularizers import RegularizerLike
from influence.task import Task
from influence.validation import check_batch_size, check_positive_int


class Objective:
    """Mean training loss (plus regulariser) over a dataset, as a function of selected parameters.

    Args:
        task: gives the per-example training loss (and, for Gauss-Newton, ``outputs`` and
            ``loss_from_outputs``).
        model: the model at the point where curvature is wanted; its parameters are read (not
            copied unless ``device``/``dtype`` convert them) at construction.
        data: a map-style dataset, or a ``DataLoader`` whose dataset and collate function are used.
        names: selected parameter names (or a selector string such as ``"last"``).
        batch_size: examples per data batch of the products.
        device: device of the computation.
        dtype: floating dtype of the computation (default: the model's).
        regularizer: optional ``R(params) -> scalar`` receiving every named parameter (selected
            ones as differentiable variables), e.g. ``lambda p: alpha / 2 * ((p["w"] - w0) ** 2).sum()``.
        max_examples: use a seeded random subsample of this many examples (default: all).
        seed: seed of the subsample.
        vector_chunk_size: how many vectors one vectorised product handles at once
            (``None``: all of them).
    """

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        data: Dataset | DataLoader,
        names: str | Sequence[str],
        *,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        regularizer: RegularizerLike | None = None,
        max_examples: int | None = None,
        seed: int = 0,
        vector_chunk_size: int | None = 32,
    ) -> None:
        check_batch_size(batch_size)
        check_positive_int("vector_chunk_size", vector_chunk_size, allow_none=True)
        self.task = task
        self.model = model
        self.names = resolve_names(model, names)
        self.layout = ParameterLayout.of(model, self.names)
        self.device = torch.device(device)
        self.regularizer = regularizer
        self.vector_chunk_size = vector_chunk_size
        self.params, self._fixed = functional_state(model, self.names, device=device, dtype=dtype)
        self.dtype = next(iter(self.params.values())).dtype
        self._fixed_params = {
            n: self._fixed[n] for n, _ in model.named_parameters() if n in self._fixed
        }
        self.batches, self.batch_sizes = self._materialise(data, batch_size, max_examples, seed, dtype)
        self.n_examples = int(sum(self.batch_sizes))
        if self.n_examples == 0:
            raise invalid("data", f"{type(data).__name__} of length 0", "a non-empty dataset")
        self._loss_fn = task_function(task, model, "train_loss", self._fixed)
        self._outputs_fn = task_function(task, model, "outputs", self._fixed)

    def _materialise(self, data, batch_size, max_examples, seed, dtype):
        if isinstance(data, DataLoader):
            dataset, collate = data.dataset, data.collate_fn
        else:
            dataset, collate = data, None
        if max_examples is not None:
            check_positive_int("max_examples", max_examples)
            n = len(dataset)
            if max_examples < n:
                generator = torch.Generator().manual_seed(int(seed))
                index = torch.randperm(n, generator=generator)[:max_examples].sort().values
                dataset = Subset(dataset, index.tolist())
        loader_options = {"batch_size": batch_size, "shuffle": False}
        if collate is not None:
            loader_options["collate_fn"] = collate
        batches, sizes = [], []
        for batch in DataLoader(dataset, **loader_options):
            batches.append(to_device(batch, self.device, dtype))
            sizes.append(self.task.batch_size(batches[-1]))
        return batches, sizes

    # -- values ---------------------------------------------------------------------------------

    @property
    def n_parameters(self) -> int:
        """``P``, the number of selected scalar parameters."""
        return self.layout.numel

    def full_parameters(self, selected: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every named parameter: ``selected`` (variables) merged with the fixed ones."""
        out = dict(self._fixed_params)
        out.update(selected)
        return out

    def _regular(self, selected: dict[str, Tensor]) -> Tensor:
        return self.regularizer(self.full_parameters(selected))

    def per_example_loss(self, selected: dict[str, Tensor], batch: Batch) -> Tensor:
        """``task.train_loss`` of a batch with the selected parameters given as tensors.

        Args:
            selected: ``{name: tensor}`` for every selected parameter (e.g. ``self.params``, or
                copies that require grad).
            batch: one of ``self.batches``.

        Returns:
            Tensor ``[B]``; unscaled (the objective's data term is their sum over all batches
            divided by ``n_examples``).
        """
        return self._loss_fn(selected, batch)

    def example_function(self, kind: str):
        """``f(selected, batch) -> [B]``: ``task.<kind>`` (``"train_loss"`` or ``"measurement"``) per example."""
        if kind == "train_loss":
            return self._loss_fn
        if kind == "measurement":
            return task_function(self.task, self.model, "measurement", self._fixed)
        raise invalid("kind", kind, "'train_loss' or 'measurement'")

    def _batch_loss(self, selected: dict[str, Tensor], batch: Batch) -> Tensor:
        return self._loss_fn(selected, batch).sum() / self.n_examples

    def _select(self, batch_indices: Sequence[int] | None) -> tuple[list[int], float]:
        if batch_indices is None:
            return list(range(len(self.batches))), 1.0
        index = [int(i) for i in batch_indices]
        for i in index:
            if not 0 <= i < len(self.batches):
                raise invalid("batch_indices", i, f"indices in [0, {len(self.batches)})")
        count = sum(self.batch_sizes[i] for i in index)
        return index, self.n_examples / max(count, 1)

    def loss(self) -> float:
        """The objective's value ``L(theta)`` at the model's parameters."""
        with torch.no_grad():
            total = sum(float(self._batch_loss(self.params, b)) for b in self.batches)
            if self.regularizer is not None:
                total += float(self._regular(self.params))
        return total

    def gradient(self) -> Tensor:
        """The objective's gradient.

        Returns:
            Tensor ``[P]``.
        """
        total = torch.zeros(self.n_parameters, dtype=self.dtype, device=self.device)
        for batch in self.batches:
            total += self.layout.flatten(grad(self._batch_loss)(self.params, batch))
        if self.regularizer is not None:
            total += self.layout.flatten(grad(self._regular)(self.params))
        return total

    # -- curvature products -------------------------------------------------------------------

    def _as_matrix(self, v: Tensor) -> tuple[Tensor, bool]:
        if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[-1] != self.n_parameters:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise invalid("v", shape, f"a tensor [P] or [m, P] with P = {self.n_parameters}")
        single = v.dim() == 1
        v = v.to(device=self.device, dtype=self.dtype)
        return (v[None] if single else v), single

    def _vectorised(self, product: Callable[[dict[str, Tensor]], dict[str, Tensor]], v: Tensor) -> Tensor:
        tangents = self.layout.unflatten(v)
        out = vmap(product, chunk_size=self.vector_chunk_size)(tangents)
        return self.layout.flatten(out, batch_dims=1).detach()

    def _regular_hvp(self, v: Tensor) -> Tensor:
        def product(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(grad(self._regular), (self.params,), (tangent,))[1]

        return self._vectorised(product, v)

    def _accumulate(self, v: Tensor, batch_indices: Sequence[int] | None, product_of_batch) -> Tensor:
        """``sum`` over the (selected) data batches of ``product_of_batch(batch)`` applied to every row of ``v``,
        rescaled to the whole data term, plus the regulariser's Hessian times ``v``."""
        vm, single = self._as_matrix(v)
        index, scale = self._select(batch_indices)
        total = torch.zeros_like(vm)
        for i in index:
            total += self._vectorised(product_of_batch(self.batches[i]), vm)
        if scale != 1.0:
            total *= scale
        if self.regularizer is not None:
            total += self._regular_hvp(vm)
        return total[0] if single else total

    def hvp(self, v: Tensor, *, batch_indices: Sequence[int] | None = None) -> Tensor:
        """Exact Hessian-vector products ``H v``.

        Args:
            v: ``[P]`` or ``[m, P]``.
            batch_indices: optional subset of data batches (indices into ``self.batches``); the
                data term is then the mean loss over those batches only (a stochastic estimate).

        Returns:
            Tensor of the shape of ``v``.
        """

        def product_of_batch(batch: Batch):
            def product(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
                return jvp(grad(lambda p: self._batch_loss(p, batch)), (self.params,), (tangent,))[1]

            return product

        return self._accumulate(v, batch_indices, product_of_batch)

    def gnhvp(self, v: Tensor, *, batch_indices: Sequence[int] | None = None) -> Tensor:
        """Gauss-Newton products ``(J^T H_out J + H_R) v``.

        Args:
            v: ``[P]`` or ``[m, P]``.
            batch_indices: optional subset of data batches, as in :meth:`hvp`.

        Returns:
            Tensor of the shape of ``v``.
        """

        def product_of_batch(batch: Batch):
            def forward(p: dict[str, Tensor]) -> Tensor:
                return self._outputs_fn(p, batch)

            def out_loss(o: Tensor) -> Tensor:
                return self.task.loss_from_outputs(o, batch).sum() / self.n_examples

            outputs, pullback = vjp(forward, self.params)
            outputs = outputs.detach()

            def product(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
                jv = jvp(forward, (self.params,), (tangent,))[1]
                hjv = jvp(grad(out_loss), (outputs,), (jv,))[1]
                return pullback(hjv)[0]

            return product

        return self._accumulate(v, batch_indices, product_of_batch)

    def matvec(
        self, v: Tensor, gauss_newton: bool = False, *, batch_indices: Sequence[int] | None = None
    ) -> Tensor:
        """:meth:`gnhvp` if ``gauss_newton`` else :meth:`hvp`.

        Args:
            v: ``[P]`` or ``[m, P]``.
            gauss_newton: use the Gauss-Newton matrix instead of the Hessian.
            batch_indices: optional subset of data batches, as in :meth:`hvp`.

        Returns:
            Tensor of the shape of ``v``.
        """
        if gauss_newton:
            return self.gnhvp(v, batch_indices=batch_indices)
        return self.hvp(v, batch_indices=batch_indices)

    def hessian(self, gauss_newton: bool = False, *, chunk_size: int = 256) -> Tensor:
        """The dense (symmetrised) Hessian or Gauss-Newton matrix; only sensible for small ``P``.

        Args:
            gauss_newton: build the Gauss-Newton matrix instead of the Hessian.
            chunk_size: how many identity columns are multiplied at once.

        Returns:
            Tensor ``[P, P]``.
        """
        n = self.n_parameters
        rows = []
        # Many identity columns per vectorised product (the per-call overhead dominates small
        # models), bounded so that vectors x examples of one product stay near 2^17.
        previous = self.vector_chunk_size
        if previous is not None:
            largest = max(self.batch_sizes, default=1)
            self.vector_chunk_size = max(previous, min(chunk_size, 2**17 // max(1, largest)))
        try:
            for start in range(0, n, chunk_size):
                stop = min(n, start + chunk_size)
                eye = torch.zeros(stop - start, n, dtype=self.dtype, device=self.device)
                eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                rows.append(self.matvec(eye, gauss_newton))
                del eye
        finally:
            self.vector_chunk_size = previous
        h = torch.cat(rows, dim=0)
        del rows
        transposed = h.T.clone()
        return h.add_(transposed).mul_(0.5)
