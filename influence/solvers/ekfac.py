"""EKFAC: eigenvalue-corrected Kronecker-factored curvature (George et al., 2018; Grosse et al., 2023).

For every selected ``nn.Linear`` layer with inputs ``a`` (augmented with a constant 1 when its
bias is selected) and gradients ``g`` of the per-example losses with respect to its outputs, the
layer's block of the (empirical) Fisher is approximated in the Kronecker-factored eigenbasis of
``A = E[a a^T]`` and ``S = E[g g^T]`` (expectations over examples and sequence positions):

    F_layer ~= (Q_S kron Q_A) diag(Lambda) (Q_S kron Q_A)^T,
    Lambda_ij = (1/n) sum_n ((Q_S^T G_n Q_A)_ij)^2,

where ``G_n = sum_t g_t a_t^T`` ``[out, in (+1)]`` is example ``n``'s gradient of the layer's
weights (and bias). The eigenvalue correction makes the diagonal in that basis exact, and the
scale matches the Hessian of the objective's mean loss. Layers are independent (block
diagonal), so ``solve`` applies ``Q_S ((Q_S^T X Q_A) / (Lambda + damping)) Q_A^T`` to each block.

EKFAC always approximates the empirical Fisher, a positive semi-definite stand-in for the
Gauss-Newton matrix; ``gauss_newton`` is accepted for interface compatibility. It does not see the
objective's regulariser: fold an isotropic penalty ``(alpha/2)||W - W_ref||^2`` into ``damping``.
Only parameters of ``nn.Linear`` layers that run once per forward pass are supported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from influence.exceptions import SolverDivergedError, invalid
from influence.solvers.base import InverseHessianSolver

logger = logging.getLogger(__name__)


@dataclass
class _Block:
    """One linear layer's factors; ``weight``/``bias`` are parameter names or ``None``."""

    module: str
    weight: str | None
    bias: str | None
    out_features: int
    in_features: int
    a_factor: Tensor | None = None
    s_factor: Tensor | None = None
    q_a: Tensor | None = None
    q_s: Tensor | None = None
    eigenvalues: Tensor | None = None

    @property
    def width(self) -> int:
        return (self.in_features if self.weight else 0) + (1 if self.bias else 0)


def _blocks(model: nn.Module, names: list[str]) -> list[_Block]:
    modules = dict(model.named_modules())
    by_module: dict[str, _Block] = {}
    for name in names:
        owner, _, attribute = name.rpartition(".")
        module = modules.get(owner)
        if not isinstance(module, nn.Linear) or attribute not in ("weight", "bias"):
            raise invalid(
                "params for solver='ekfac'", name,
                "parameters of nn.Linear layers only (e.g. params='last'); use 'cg' or 'arnoldi' otherwise",
            )
        block = by_module.setdefault(
            owner, _Block(owner, None, None, module.out_features, module.in_features)
        )
        setattr(block, attribute, name)
    return list(by_module.values())


class EkfacSolver(InverseHessianSolver):
    """Eigenvalue-corrected K-FAC inverse of the empirical Fisher, layer by layer.

    Args:
        damping: ``lambda >= 0`` added to every corrected eigenvalue.
        gauss_newton: accepted for interface compatibility (EKFAC is always a Fisher approximation).

    Attributes:
        blocks: per layer: names, Kronecker factors ``A`` ``[k, k]`` and ``S`` ``[out, out]``, their
            eigenvectors ``q_a``/``q_s`` and the corrected eigenvalues ``[out, k]``.
    """

    name = "ekfac"

    def __init__(self, damping: float = 0.0, gauss_newton: bool = False) -> None:
        super().__init__(damping=damping, gauss_newton=gauss_newton)
        self.blocks: list[_Block] = []

    def _captured(self, objective: Any, batch: Any) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer: inputs ``[B, T, k]`` (augmented) and output gradients ``[B, T, out]``."""
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
            with torch.enable_grad():
                loss = objective.per_example_loss(params, batch).sum()
                for b in self.blocks:
                    if len(outputs[b.module]) != 1:
                        raise invalid(
                            f"calls of layer {b.module!r} per forward pass", len(outputs[b.module]),
                            "exactly 1 for solver='ekfac'",
                        )
                grads = torch.autograd.grad(loss, [outputs[b.module][0] for b in self.blocks], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        out = {}
        for b, g in zip(self.blocks, grads):
            a = inputs[b.module][0].detach()
            z = outputs[b.module][0]
            g = torch.zeros_like(z) if g is None else g
            n = a.shape[0]
            a = a.reshape(n, -1, a.shape[-1])
            g = g.detach().reshape(n, -1, g.shape[-1])
            parts = ([a] if b.weight else []) + ([torch.ones_like(a[..., :1])] if b.bias else [])
            out[b.module] = (torch.cat(parts, dim=-1), g)
        return out

    def _fit(self, objective: Any) -> None:
        if objective.regularizer is not None:
            logger.warning(
                "EKFAC ignores the objective's regulariser; fold an isotropic penalty "
                "(alpha/2)||W - W_ref||^2 into damping (damping += alpha)"
            )
        self.blocks = _blocks(objective.model, list(objective.names))
        dtype, device = objective.dtype, objective.device
        for b in self.blocks:
            b.a_factor = torch.zeros(b.width, b.width, dtype=dtype, device=device)
            b.s_factor = torch.zeros(b.out_features, b.out_features, dtype=dtype, device=device)
        positions = [0] * len(self.blocks)
        for batch in objective.batches:
            for i, (b, (a, g)) in enumerate(zip(self.blocks, self._captured(objective, batch).values())):
                b.a_factor += torch.einsum("bti,btj->ij", a, a)
                b.s_factor += torch.einsum("bti,btj->ij", g, g)
                positions[i] += a.shape[0] * a.shape[1]
        for b, count in zip(self.blocks, positions):
            b.a_factor /= max(count, 1)
            b.s_factor /= max(count, 1)
            b.q_a = torch.linalg.eigh(b.a_factor).eigenvectors
            b.q_s = torch.linalg.eigh(b.s_factor).eigenvectors
            b.eigenvalues = torch.zeros(b.out_features, b.width, dtype=dtype, device=device)
        for batch in objective.batches:
            for b, (a, g) in zip(self.blocks, self._captured(objective, batch).values()):
                per_example = torch.einsum("bto,bti->boi", g, a)
                rotated = b.q_s.T @ per_example @ b.q_a
                b.eigenvalues += (rotated**2).sum(dim=0)
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

    def _block_matrix(self, flat: Tensor, b: _Block) -> Tensor:
        offsets = self.objective.layout.offsets()
        m = flat.shape[0]
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
        offsets = self.objective.layout.offsets()
        for b in self.blocks:
            x = self._block_matrix(rhs, b)
            y = (b.q_s.T @ x @ b.q_a) / (b.eigenvalues + self.damping)
            y = b.q_s @ y @ b.q_a.T
            if b.weight:
                start, stop = offsets[b.weight]
                out[:, start:stop] = y[..., : b.in_features].reshape(rhs.shape[0], -1)
            if b.bias:
                start, stop = offsets[b.bias]
                out[:, start:stop] = y[..., -1]
        return out
