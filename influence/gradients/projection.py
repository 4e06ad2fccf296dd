"""Seeded random projection of gradients, ``g [b, P] -> g R [b, k]``, without storing ``R``.

Following TRAK, gradients are compressed by a random matrix ``R`` ``[P, k]`` with i.i.d. Gaussian
(or Rademacher, +-1) entries scaled by ``1/sqrt(k)``, so inner products are preserved in
expectation (Johnson-Lindenstrauss). ``R`` is never held whole: it is cut into row blocks of
``chunk_size`` rows, and block ``c`` is regenerated on demand from a ``torch.Generator`` seeded
with a hash of ``(seed, c)``. The same seed, dimensions, kind and chunk size give the same
projection on every machine and device (blocks are drawn on the CPU in float32, then moved).
Blocks are kept in memory while they fit ``max_cached_bytes``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import torch
from torch import Tensor

from influence.exceptions import invalid
from influence.validation import check_positive_int

ProjectionKind = Literal["gaussian", "rademacher"]


def chunk_seed(seed: int, index: int) -> int:
    """The generator seed of block ``index`` of the projection with ``seed`` (63-bit)."""
    digest = hashlib.sha256(f"influence-projection:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RandomProjector:
    """Random projection ``[b, P] -> [b, k]`` regenerated block by block from a seed.

    Args:
        input_dim: ``P``.
        output_dim: ``k``.
        seed: the projection's seed.
        kind: ``"gaussian"`` (standard normal entries) or ``"rademacher"`` (+-1 entries).
        chunk_size: rows of ``R`` per generated block; part of the projection's identity.
        max_cached_bytes: keep generated blocks (on the device of use) while their total size is
            below this; ``0`` regenerates every block on every call.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        *,
        seed: int,
        kind: ProjectionKind = "gaussian",
        chunk_size: int = 4096,
        max_cached_bytes: int = 256 * 2**20,
    ) -> None:
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim), ("chunk_size", chunk_size)):
            check_positive_int(name, value)
        if kind not in ("gaussian", "rademacher"):
            raise invalid("kind", kind, "'gaussian' or 'rademacher'")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise invalid("seed", seed, "an integer")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.seed = seed
        self.kind = kind
        self.chunk_size = chunk_size
        self.max_cached_bytes = int(max_cached_bytes)
        self._cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}
        self._cached_bytes = 0

    @property
    def arguments(self) -> dict[str, Any]:
        """What defines the projection (saved beside projected artifacts, checked on reuse)."""
        return {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "seed": self.seed,
            "kind": self.kind,
            "chunk_size": self.chunk_size,
        }

    @property
    def n_chunks(self) -> int:
        """Number of row blocks of ``R``."""
        return math.ceil(self.input_dim / self.chunk_size)

    def block(self, index: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows ``index * chunk_size ...`` of ``R`` (already scaled by ``1/sqrt(k)``).

        Args:
            index: block index in ``[0, n_chunks)``.
            device: device of the returned block.
            dtype: dtype of the returned block.

        Returns:
            Tensor ``[rows, k]`` with ``rows = min(chunk_size, P - index * chunk_size)``.
        """
        if not 0 <= index < self.n_chunks:
            raise invalid("index", index, f"a block index in [0, {self.n_chunks})")
        device = torch.device(device)
        key = (index, device, dtype)
        if key in self._cache:
            return self._cache[key]
        rows = min(self.chunk_size, self.input_dim - index * self.chunk_size)
        generator = torch.Generator(device="cpu").manual_seed(chunk_seed(self.seed, index))
        if self.kind == "gaussian":
            r = torch.randn(rows, self.output_dim, generator=generator, dtype=torch.float32)
        else:
            r = torch.randint(0, 2, (rows, self.output_dim), generator=generator, dtype=torch.int8)
            r = r.to(torch.float32) * 2.0 - 1.0
        r = (r / math.sqrt(self.output_dim)).to(device=device, dtype=dtype)
        size = r.numel() * r.element_size()
        if self._cached_bytes + size <= self.max_cached_bytes:
            self._cache[key] = r
            self._cached_bytes += size
        return r

    def project(self, g: Tensor) -> Tensor:
        """Project gradients.

        Args:
            g: ``[b, P]`` (or ``[P]``), floating.

        Returns:
            ``g R``: ``[b, k]`` (or ``[k]``), same dtype and device as ``g``.
        """
        if not isinstance(g, Tensor) or g.dim() not in (1, 2) or g.shape[-1] != self.input_dim:
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise invalid("g", shape, f"a tensor [b, P] or [P] with P = {self.input_dim}")
        single = g.dim() == 1
        rows = g[None] if single else g
        out = rows.new_zeros(rows.shape[0], self.output_dim)
        for c in range(self.n_chunks):
            start = c * self.chunk_size
            stop = min(self.input_dim, start + self.chunk_size)
            out += rows[:, start:stop] @ self.block(c, device=rows.device, dtype=rows.dtype)
        return out[0] if single else out

    def matrix(self, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole ``R`` ``[P, k]`` (for tests and small ``P`` only)."""
        return torch.cat([self.block(c, dtype=dtype) for c in range(self.n_chunks)], dim=0)
