"""EKFAC: eigenvalue-corrected Kronecker-factored curvature (George et al., 2018; Grosse et al., 2023).

Every selected layer is treated as a linear map ``s_t = W a_t (+ b)`` applied at positions ``t``:
an ``nn.Linear`` layer with inputs ``a`` (augmented with a constant 1 when its bias is selected),
or an ``nn.Embedding`` layer, which is a linear layer on one-hot inputs (``W = weight^T``
``[dim, vocab]``, ``a_t = onehot(token_t)``; padding tokens have ``a_t = 0`` since their row gets no
gradient). With ``G_nr = sum_t g_nrt a_t^T`` ``[out, in (+1)]`` the layer-weight gradient that
backward vector ``r`` of example ``n`` produces, the layer's curvature block is

    C_layer = (1/n) sum_n sum_r vec(G_nr) vec(G_nr)^T,

and EKFAC approximates it in the Kronecker-factored eigenbasis of ``A = E[a a^T]`` and
``S = E[g g^T]`` (expectations over examples, backward vectors and positions):

    C_layer ~= (Q_S kron Q_A) diag(Lambda) (Q_S kron Q_A)^T,
    Lambda_ij = (1/n) sum_n sum_r ((Q_S^T G_nr Q_A)_ij)^2.

The eigenvalue correction makes the diagonal in that basis exact, and fixes the scale to that of
the objective's mean loss. For an embedding ``A`` is diagonal (token frequencies), so ``Q_A = I``
and only its diagonal is stored. Layers are independent (block diagonal), so ``solve`` applies
``Q_S ((Q_S^T X Q_A) / (Lambda + damping)) Q_A^T`` to each block.

Which curvature ``C`` is approximated:

- ``gauss_newton=False``: the empirical Fisher; one backward vector per example, the gradient of its
  training loss (``task.train_loss``) with respect to the layer outputs.
- ``gauss_newton=True``: the Gauss-Newton matrix ``(1/n) sum_n J_n^T H_n J_n`` of the objective
  (``H_n`` the Hessian of ``task.loss_from_outputs`` at example ``n``'s ``task.outputs``; for
  cross-entropy ``diag(p) - p p^T``, so this is the true Fisher). ``H_n = L_n L_n^T`` is factorised
  exactly (symmetric eigendecomposition, negative eigenvalues clipped to 0) and the columns of
  ``L_n`` are back-propagated as ``O`` backward vectors per example, ``O`` the number of outputs
  of one example. This is the exact expectation over labels drawn from the model, not a sample;
  it costs ``O`` backward passes per batch, so it suits small output dimensions.

EKFAC is exact where the block is a Kronecker product diagonal in that basis: e.g. a single linear
layer with ``gauss_newton=True`` when every example has the same output Hessian (squared loss,
``C = H_out kron A``) or when there is one example at one position (``C = H_1 kron a a^T``). It
does not see the objective's regulariser: fold an isotropic penalty ``(alpha/2)||W - W_ref||^2``
into ``damping``. Only layers that run once per forward pass are supported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from influence.exceptions import SolverDivergedError, invalid
from influence.gradients.per_example import functional_state, task_function
from influence.solvers.base import InverseHessianSolver

logger = logging.getLogger(__name__)


@dataclass
class _Block:
    """One layer's factors; ``weight``/``bias`` are parameter names or ``None``.

    ``kind`` is ``"linear"`` or ``"embedding"``. For an embedding, ``in_features`` is the
    vocabulary size, ``out_features`` the embedding dimension, ``a_diagonal`` ``[vocab]`` holds
    ``A``'s diagonal and ``a_factor``/``q_a`` stay ``None`` (``Q_A = I``).
    """

    module: str
    kind: str
    weight: str | None
    bias: str | None
    out_features: int
    in_features: int
    padding_idx: int | None = None
    a_factor: Tensor | None = None
    a_diagonal: Tensor | None = None
    s_factor: Tensor | None = None
    q_a: Tensor | None = None
    q_s: Tensor | None = None
    eigenvalues: Tensor | None = None

    @property
    def width(self) -> int:
        """Columns of the block matrix: inputs (if the weight is selected) plus 1 for a bias."""
        return (self.in_features if self.weight else 0) + (1 if self.bias else 0)


def _blocks(model: nn.Module, names: list[str]) -> list[_Block]:
    modules = dict(model.named_modules())
    by_module: dict[str, _Block] = {}
    for name in names:
        owner, _, attribute = name.rpartition(".")
        module = modules.get(owner)
        if isinstance(module, nn.Linear) and attribute in ("weight", "bias"):
            block = by_module.setdefault(
                owner, _Block(owner, "linear", None, None, module.out_features, module.in_features)
            )
        elif isinstance(module, nn.Embedding) and attribute == "weight":
            if module.max_norm is not None:
                raise invalid(
                    f"max_norm of embedding {owner!r} for solver='ekfac'", module.max_norm,
                    "None (a renormalised embedding is not a linear layer)",
                )
            block = by_module.setdefault(
                owner, _Block(owner, "embedding", None, None, module.embedding_dim,
                              module.num_embeddings, padding_idx=module.padding_idx)
            )
        else:
            raise invalid(
                "params for solver='ekfac'", name,
                "parameters of nn.Linear or nn.Embedding layers only (e.g. params='last'); "
                "use 'cg' or 'arnoldi' otherwise",
            )
        setattr(block, attribute, name)
    return list(by_module.values())


class EkfacSolver(InverseHessianSolver):
    """Eigenvalue-corrected K-FAC inverse of the empirical Fisher or Gauss-Newton matrix, per layer.

    Args:
        damping: ``lambda >= 0`` added to every corrected eigenvalue.
        gauss_newton: approximate the Gauss-Newton matrix (exact output-Hessian factorisation; needs
            ``task.outputs``/``task.loss_from_outputs``; for cross-entropy the true Fisher, as
            kronfluence's EK-FAC) instead of the empirical Fisher. The default: on MNIST
            (``bench/solver_lds.py``) it reaches LDS 0.789 against 0.748 for the empirical Fisher.

    Attributes:
        blocks: per layer: names, Kronecker factors ``A`` ``[k, k]`` (embeddings: ``a_diagonal``
            ``[vocab]``) and ``S`` ``[out, out]``, their eigenvectors ``q_a``/``q_s`` and the
            corrected eigenvalues ``[out, k]``.
    """

    name = "ekfac"
    keeps_state = True

    def __init__(self, damping: float = 0.0, gauss_newton: bool = True) -> None:
        super().__init__(damping=damping, gauss_newton=gauss_newton)
        self.blocks: list[_Block] = []
        self._offsets: dict[str, tuple[int, int]] = {}
        self._outputs_fn: Any = None

    # -- statistics -------------------------------------------------------------------------------

    def _forward(self, objective: Any, batch: Any, fn: Any) -> tuple[Tensor, dict, dict]:
        """Run ``fn(params, batch)`` with hooks: ``(result, inputs, outputs)`` of every block."""
        modules = dict(objective.model.named_modules())
        inputs: dict[str, list[Tensor]] = {b.module: [] for b in self.blocks}
        outputs: dict[str, list[Tensor]] = {b.module: [] for b in self.blocks}

        def hook(name: str):
            def record(module: nn.Module, args: tuple, output: Tensor) -> None:
                inputs[name].append(args[0])
                outputs[name].append(output)
            return record

        handles = [modules[b.module].register_forward_hook(hook(b.module)) for b in self.blocks]
        try:
            params = {n: p.detach().requires_grad_(True) for n, p in objective.params.items()}
            result = fn(params, batch)
        finally:
            for handle in handles:
                handle.remove()
        for b in self.blocks:
            if len(outputs[b.module]) != 1:
                raise invalid(
                    f"calls of layer {b.module!r} per forward pass", len(outputs[b.module]),
                    "exactly 1 for solver='ekfac'",
                )
        return result, {k: v[0] for k, v in inputs.items()}, {k: v[0] for k, v in outputs.items()}

    def _backward_vectors(self, objective: Any, batch: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Per block: inputs (``[B, T, k]`` augmented, or tokens ``[B, T]``) and ``g`` ``[B, R, T, out]``."""
        with torch.enable_grad():
            if not self.gauss_newton:
                loss, inputs, outputs = self._forward(objective, batch, objective.per_example_loss)
                seeds = [None]
                roots = loss.sum()
            else:
                out, inputs, outputs = self._forward(objective, batch, self._outputs_fn)
                roots, seeds = out, self._output_hessian_roots(objective, out, batch)
            targets = [outputs[b.module] for b in self.blocks]
            per_seed = []
            for seed in seeds:
                grads = torch.autograd.grad(roots, targets, grad_outputs=seed, retain_graph=True,
                                            allow_unused=True)
                per_seed.append([
                    torch.zeros_like(t) if g is None else g.detach() for g, t in zip(grads, targets)
                ])
        a_out, g_out = {}, {}
        for i, b in enumerate(self.blocks):
            x = inputs[b.module].detach()
            n = x.shape[0]
            g = torch.stack([grads[i] for grads in per_seed], dim=1)
            g_out[b.module] = g.reshape(n, len(per_seed), -1, g.shape[-1])
            if b.kind == "embedding":
                a_out[b.module] = x.reshape(n, -1)
                continue
            x = x.reshape(n, -1, x.shape[-1])
            parts = ([x] if b.weight else []) + ([torch.ones_like(x[..., :1])] if b.bias else [])
            a_out[b.module] = torch.cat(parts, dim=-1)
        return a_out, g_out

    def _output_hessian_roots(self, objective: Any, out: Tensor, batch: Any) -> list[Tensor]:
        """Columns of ``L_n`` with ``L_n L_n^T = H_n`` (per example), each shaped like ``out``."""
        n = out.shape[0]
        detached = out.detach().requires_grad_(True)
        loss = objective.task.loss_from_outputs(detached, batch).sum()
        (first,) = torch.autograd.grad(loss, detached, create_graph=True)
        flat = first.reshape(n, -1)
        width = flat.shape[1]
        columns = []
        for k in range(width if flat.requires_grad else 0):
            unit = torch.zeros_like(flat)
            unit[:, k] = 1.0
            (column,) = torch.autograd.grad(flat, detached, grad_outputs=unit, retain_graph=k + 1 < width,
                                            allow_unused=True)
            column = torch.zeros_like(detached) if column is None else column
            columns.append(column.detach().reshape(n, width))
        if not columns:  # the loss is linear in the outputs: H_n = 0
            return [torch.zeros_like(out)]
        hessian = torch.stack(columns, dim=-1)
        values, vectors = torch.linalg.eigh((hessian + hessian.transpose(1, 2)) / 2)
        roots = vectors * values.clamp_min(0.0).sqrt()[:, None, :]
        return [roots[:, :, r].reshape(out.shape) for r in range(width)]

    def _layer_gradients(self, b: _Block, a: Tensor, g: Tensor) -> Tensor:
        """``G_nr`` ``[B, R, out, width]`` from inputs and backward vectors ``g`` ``[B, R, T, out]``."""
        if b.kind == "linear":
            return torch.einsum("brto,bti->broi", g, a)
        tokens = a.to(torch.long)
        if b.padding_idx is not None:
            g = g * (tokens != b.padding_idx)[:, None, :, None].to(g.dtype)
        flat = g.new_zeros(g.shape[0], g.shape[1], b.in_features, g.shape[-1])
        index = tokens[:, None, :, None].expand(-1, g.shape[1], -1, g.shape[-1])
        flat.scatter_add_(2, index, g)
        return flat.transpose(2, 3)

    def _squared_rotated_sum(self, b: _Block, a: Tensor, g: Tensor) -> Tensor:
        """``sum_n sum_r ((Q_S^T G_nr Q_A)_ij)^2`` ``[out, width]``.

        The vectors are rotated before the layer gradients are formed (``Q_S^T G Q_A = sum_t
        (Q_S^T g_t)(Q_A^T a_t)^T``): ``B R T (out^2 + out width) + B T width^2`` operations instead of
        ``B R (out^2 width + out width^2)``; with one position per example (``T = 1``) the square of the
        rank-one ``G`` factorises and no ``[B, R, out, width]`` tensor is formed at all.
        """
        rotated_g = g @ b.q_s  # rows (Q_S^T g)^T: [B, R, T, out]
        if b.kind != "linear":
            return (self._layer_gradients(b, a, rotated_g) ** 2).sum(dim=(0, 1))  # Q_A = I
        rotated_a = a @ b.q_a  # [B, T, width]
        if rotated_a.shape[1] == 1:
            return torch.einsum("bro,bi->oi", rotated_g[:, :, 0] ** 2, rotated_a[:, 0] ** 2)
        return (torch.einsum("brto,bti->broi", rotated_g, rotated_a) ** 2).sum(dim=(0, 1))

    # -- fitting ----------------------------------------------------------------------------------

    def _fit(self, objective: Any) -> None:
        if objective.regularizer is not None:
            logger.warning(
                "EKFAC ignores the objective's regulariser; fold an isotropic penalty "
                "(alpha/2)||W - W_ref||^2 into damping (damping += alpha)"
            )
        self.blocks = _blocks(objective.model, list(objective.names))
        self._offsets = {name: tuple(span) for name, span in objective.layout.offsets().items()}
        if self.gauss_newton:
            _, fixed = functional_state(objective.model, objective.names, device=objective.device,
                                        dtype=objective.dtype)
            self._outputs_fn = task_function(objective.task, objective.model, "outputs", fixed)
        dtype, device = objective.dtype, objective.device
        for b in self.blocks:
            if b.kind == "linear":
                b.a_factor = torch.zeros(b.width, b.width, dtype=dtype, device=device)
            else:
                b.a_diagonal = torch.zeros(b.in_features, dtype=dtype, device=device)
            b.s_factor = torch.zeros(b.out_features, b.out_features, dtype=dtype, device=device)
        a_counts = [0] * len(self.blocks)
        s_counts = [0] * len(self.blocks)
        for batch in objective.batches:
            a_all, g_all = self._backward_vectors(objective, batch)
            for i, b in enumerate(self.blocks):
                a, g = a_all[b.module], g_all[b.module]
                if b.kind == "linear":
                    b.a_factor += torch.einsum("bti,btj->ij", a, a)
                else:
                    tokens = a.to(torch.long).reshape(-1)
                    if b.padding_idx is not None:
                        tokens = tokens[tokens != b.padding_idx]
                    b.a_diagonal += torch.bincount(tokens, minlength=b.in_features).to(dtype)
                b.s_factor += torch.einsum("brto,brtp->op", g, g)
                a_counts[i] += a.shape[0] * a.shape[1]
                s_counts[i] += g.shape[0] * g.shape[1] * g.shape[2]
        for b, a_count, s_count in zip(self.blocks, a_counts, s_counts):
            if b.kind == "linear":
                b.a_factor /= max(a_count, 1)
                b.q_a = torch.linalg.eigh(b.a_factor).eigenvectors
            else:
                b.a_diagonal /= max(a_count, 1)
            b.s_factor /= max(s_count, 1)
            b.q_s = torch.linalg.eigh(b.s_factor).eigenvectors
            b.eigenvalues = torch.zeros(b.out_features, b.width, dtype=dtype, device=device)
        for batch in objective.batches:
            a_all, g_all = self._backward_vectors(objective, batch)
            for b in self.blocks:
                b.eigenvalues += self._squared_rotated_sum(b, a_all[b.module], g_all[b.module])
        smallest, largest = float("inf"), 0.0
        for b in self.blocks:
            b.eigenvalues /= objective.n_examples
            smallest = min(smallest, float(b.eigenvalues.min()))
            largest = max(largest, float(b.eigenvalues.max()))
        if smallest + self.damping <= 1e-12 * max(largest, 1e-300):
            raise SolverDivergedError(
                f"the EKFAC curvature has a zero eigenvalue (smallest {smallest:.3e}) and damping="
                f"{self.damping}; use damping > 0"
            )

    # -- scoring in the eigenbasis -----------------------------------------------------------------

    @property
    def rotates_gradients(self) -> bool:
        """Whether :meth:`rotated_gradients` applies: fitted (with its objective), every block an ``nn.Linear``."""
        return self.objective is not None and bool(self.blocks) and all(b.kind == "linear" for b in self.blocks)

    def rotated_gradients(self, batch: Any, kind: str = "train_loss", dtype: torch.dtype | None = None) -> Tensor:
        """Per-example gradients of a batch in the EK-FAC eigenbasis, from each layer's inputs and output gradients.

        Row ``n`` holds, block after block, ``vec(Q_S^T G_n Q_A)`` with ``G_n = sum_t g_nt a_nt^T``
        ``[out, width]`` (``g_nt`` the gradient of example ``n``'s ``task.<kind>`` at the layer's output at
        position ``t``). Since the blocks are orthogonal rotations, ``(rotated(q) / (Lambda + damping)) .
        rotated(g)`` equals ``q^T (C + damping I)^{-1} g`` (:meth:`inverse_eigenvalues`), and the
        parameter-basis gradient is never formed: per example and layer the rotation costs
        ``T (out^2 + width^2)`` instead of ``out width (out + width)``. Only for ``rotates_gradients``.

        Args:
            batch: a batch on the objective's device, in its dtype.
            kind: ``"train_loss"`` or ``"measurement"``.
            dtype: dtype of the rows (computed in the objective's, rounded once; default: the objective's).

        Returns:
            Tensor ``[B, P]``.
        """
        if not self.rotates_gradients:
            raise invalid("rotated_gradients", "an EK-FAC solver with embedding blocks or without its objective",
                          "a fitted solver over nn.Linear parameters only")
        objective = self.objective
        with torch.enable_grad():
            values, inputs, outputs = self._forward(objective, batch, objective.example_function(kind))
            targets = [outputs[b.module] for b in self.blocks]
            grads = torch.autograd.grad(values.sum(), targets, allow_unused=True)
        n = values.shape[0]
        rows = torch.empty(n, sum(b.out_features * b.width for b in self.blocks), dtype=dtype or objective.dtype,
                           device=values.device)  # each block written in place, rounded once
        start = 0
        for b, g, target in zip(self.blocks, grads, targets):
            x = inputs[b.module].detach()
            g = (torch.zeros_like(target) if g is None else g.detach()).reshape(n, -1, b.out_features)
            x = x.reshape(n, -1, x.shape[-1])
            a = torch.cat(([x] if b.weight else []) + ([torch.ones_like(x[..., :1])] if b.bias else []), dim=-1)
            rotated_g, rotated_a = g @ b.q_s, a @ b.q_a
            view = rows[:, start:start + b.out_features * b.width].view(n, b.out_features, b.width)
            if rotated_g.shape[1] == 1:  # one position: an outer product, no sum over positions
                torch.mul(rotated_g[:, 0, :, None], rotated_a[:, 0, None, :], out=view)
            else:
                view.copy_(torch.einsum("bto,bti->boi", rotated_g, rotated_a))
            start += b.out_features * b.width
        return rows

    def inverse_eigenvalues(self) -> Tensor:
        """``1 / (Lambda + damping)`` ``[P]`` in the order of :meth:`rotated_gradients`' columns."""
        return torch.cat([(b.eigenvalues + self.damping).reciprocal().reshape(-1) for b in self.blocks])

    def representation(self, g: Tensor, side: str, projector: Any = None) -> Tensor:
        """Index rows in the eigenbasis: ``vec(Q_S^T G Q_A)`` block after block, divided by
        ``Lambda + damping`` on the query side, so that query rows times training rows equal
        ``q (C + damping I)^{-1} g`` with one rotation per row instead of a solve (two rotations)."""
        if side not in ("query", "train"):
            raise invalid("side", side, "'query' or 'train'")
        rows = self._check_rows("g", g)
        m = rows.shape[0]
        rotated = torch.cat([self._rotate(self._block_matrix(rows, b), b).reshape(m, -1) for b in self.blocks], dim=1)
        if side == "query":
            rotated = rotated * self.inverse_eigenvalues()
        return rotated if projector is None else projector.project(rotated)

    # -- solving ----------------------------------------------------------------------------------

    @staticmethod
    def _rotate(x: Tensor, b: _Block) -> Tensor:
        """``Q_S^T X Q_A`` for ``X`` ``[..., out, width]``."""
        y = b.q_s.T @ x
        return y if b.q_a is None else y @ b.q_a

    @staticmethod
    def _unrotate(y: Tensor, b: _Block) -> Tensor:
        """``Q_S Y Q_A^T`` for ``Y`` ``[..., out, width]``."""
        x = b.q_s @ y
        return x if b.q_a is None else x @ b.q_a.T

    def _block_matrix(self, flat: Tensor, b: _Block) -> Tensor:
        """Flat ``[m, P]`` -> the block's ``[m, out, width]`` (embeddings: ``weight^T``)."""
        offsets = self._offsets
        m = flat.shape[0]
        if b.kind == "embedding":
            start, stop = offsets[b.weight]
            return flat[:, start:stop].reshape(m, b.in_features, b.out_features).transpose(1, 2)
        parts = []
        if b.weight:
            start, stop = offsets[b.weight]
            parts.append(flat[:, start:stop].reshape(m, b.out_features, b.in_features))
        if b.bias:
            start, stop = offsets[b.bias]
            parts.append(flat[:, start:stop].reshape(m, b.out_features, 1))
        return torch.cat(parts, dim=-1)

    def _solve(self, rhs: Tensor) -> Tensor:
        out = torch.empty_like(rhs)
        offsets = self._offsets
        m = rhs.shape[0]
        for b in self.blocks:
            x = self._block_matrix(rhs, b)
            y = self._unrotate(self._rotate(x, b) / (b.eigenvalues + self.damping), b)
            if b.kind == "embedding":
                start, stop = offsets[b.weight]
                out[:, start:stop] = y.transpose(1, 2).reshape(m, -1)
                continue
            if b.weight:
                start, stop = offsets[b.weight]
                out[:, start:stop] = y[..., : b.in_features].reshape(m, -1)
            if b.bias:
                start, stop = offsets[b.bias]
                out[:, start:stop] = y[..., -1]
        return out

    # -- saved state --------------------------------------------------------------------------------

    _FIELDS = ("module", "kind", "weight", "bias", "out_features", "in_features", "padding_idx")

    def _state_tensors(self) -> dict[str, Tensor]:
        state = {}
        for i, b in enumerate(self.blocks):
            state[f"{i}.q_s"], state[f"{i}.eigenvalues"] = b.q_s, b.eigenvalues
            if b.q_a is not None:
                state[f"{i}.q_a"] = b.q_a
        return state

    def _state_extra(self) -> dict[str, Any]:
        return {
            "blocks": [{f: getattr(b, f) for f in self._FIELDS} for b in self.blocks],
            "offsets": {name: list(span) for name, span in self._offsets.items()},
        }

    def _load_tensors(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        try:
            self.blocks = [_Block(**{f: spec[f] for f in self._FIELDS}) for spec in info["blocks"]]
            self._offsets = {name: (int(a), int(b)) for name, (a, b) in info["offsets"].items()}
            for i, b in enumerate(self.blocks):
                b.q_s, b.eigenvalues, b.q_a = tensors[f"{i}.q_s"], tensors[f"{i}.eigenvalues"], tensors.get(f"{i}.q_a")
        except (KeyError, TypeError, ValueError) as error:
            raise invalid("EK-FAC solver state", f"missing or malformed {error}", "what state_dict() and state_info() returned") from error

