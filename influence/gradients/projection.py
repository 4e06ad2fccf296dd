"""Seeded random projection of gradients, ``g [b, P] -> g R [b, k]``, without storing ``R``.

Following TRAK, gradients are compressed by a random matrix ``R`` ``[P, k]`` that preserves inner
products in expectation (Johnson-Lindenstrauss: ``E[R R^T] = I``). Three kinds:

- ``"gaussian"``: i.i.d. standard normal entries scaled by ``1/sqrt(k)``;
- ``"rademacher"``: i.i.d. +-1 entries scaled by ``1/sqrt(k)``;
- ``"sjlt"``: the sparse Johnson-Lindenstrauss transform of Kane and Nelson (2014), block
  construction: each input coordinate has ``nonzeros = s`` entries +-1/sqrt(s), one in each of ``s``
  equal slices of the ``k`` outputs. A product costs ``O(b P s)`` instead of ``O(b P k)``, and a
  block is a few random integers instead of ``rows x k`` Gaussian draws. For dense gradients the
  variance of a projected inner product is at most the Gaussian one.

``R`` is never held whole: it is cut into row blocks of ``chunk_size`` rows, and block ``c`` is
regenerated on demand from a ``torch.Generator`` seeded with a hash of ``(seed, c)``. The same
seed, dimensions, kind, chunk size (and ``nonzeros``) give the same projection on every machine and
device (blocks are drawn on the CPU, then moved). Blocks are kept in memory while they fit
``max_cached_bytes``.

``kind="auto"`` (the default) takes the Gaussian projection while its whole ``R`` fits
:data:`DENSE_PROJECTION_BYTES` (it is then generated once and kept), the sparse one above: a dense
``R`` that does not fit is regenerated for every batch of gradients, which for a transformer layer
(``P`` in the millions, ``k = 4096``) costs minutes per batch.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from influence.exceptions import invalid
from influence.validation import check_positive_int

ProjectionKind = Literal["auto", "gaussian", "rademacher", "sjlt"]
KINDS = ("auto", "gaussian", "rademacher", "sjlt")
DENSE_PROJECTION_BYTES = 256 * 2**20  # kind="auto": Gaussian while the float32 R [P, k] fits this, SJLT above
DENSE_CHUNK_ROWS = 4096  # rows of R per block of the dense kinds
SPARSE_CHUNK_ROWS = 65_536  # ... and of the sparse one
SJLT_NONZEROS = 4  # entries per input coordinate of the sparse projection


def chunk_seed(seed: int, index: int) -> int:
    """The generator seed of block ``index`` of the projection with ``seed`` (63-bit)."""
    digest = hashlib.sha256(f"influence-projection:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolve_kind(kind: str, input_dim: int, output_dim: int) -> str:
    """The projection kind that ``kind`` means for ``R [input_dim, output_dim]`` (``"auto"`` resolved)."""
    if kind not in KINDS:
        raise invalid("kind", kind, "one of " + ", ".join(repr(k) for k in KINDS))
    if kind != "auto":
        return kind
    return "gaussian" if input_dim * output_dim * 4 <= DENSE_PROJECTION_BYTES else "sjlt"


class RandomProjector:
    """Random projection ``[b, P] -> [b, k]`` regenerated block by block from a seed.

    Args:
        input_dim: ``P``.
        output_dim: ``k``.
        seed: the projection's seed.
        kind: ``"auto"``, ``"gaussian"``, ``"rademacher"`` or ``"sjlt"`` (see the module docstring).
        chunk_size: rows of ``R`` per generated block (default 4,096 for the dense kinds, 65,536 for
            ``"sjlt"``); part of the projection's identity.
        nonzeros: entries per input coordinate of ``"sjlt"`` (default 4; at most ``k``); ignored by the others.
        max_cached_bytes: keep generated blocks (on the device of use) while their total size is
            below this; ``0`` regenerates every block on every call.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        *,
        seed: int,
        kind: ProjectionKind = "auto",
        chunk_size: int | None = None,
        nonzeros: int = SJLT_NONZEROS,
        max_cached_bytes: int = 256 * 2**20,
    ) -> None:
        for name, value in (("input_dim", input_dim), ("output_dim", output_dim), ("nonzeros", nonzeros)):
            check_positive_int(name, value)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise invalid("seed", seed, "an integer")
        kind = resolve_kind(kind, input_dim, output_dim)
        if chunk_size is None:
            chunk_size = SPARSE_CHUNK_ROWS if kind == "sjlt" else DENSE_CHUNK_ROWS
        check_positive_int("chunk_size", chunk_size)
        if kind == "sjlt" and nonzeros > output_dim:
            raise invalid("nonzeros", nonzeros, f"at most output_dim = {output_dim}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.seed = seed
        self.kind = kind
        self.chunk_size = chunk_size
        self.nonzeros = nonzeros if kind == "sjlt" else None
        self.max_cached_bytes = int(max_cached_bytes)
        self._cache: dict[tuple[Any, ...], Tensor] = {}
        self._cached_bytes = 0

    @property
    def arguments(self) -> dict[str, Any]:
        """What defines the projection (saved beside projected artifacts, checked on reuse)."""
        found = {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "seed": self.seed,
            "kind": self.kind,
            "chunk_size": self.chunk_size,
        }
        if self.kind == "sjlt":
            found["nonzeros"] = self.nonzeros
        return found

    @property
    def n_chunks(self) -> int:
        """Number of row blocks of ``R``."""
        return math.ceil(self.input_dim / self.chunk_size)

    def _rows(self, index: int) -> int:
        if not 0 <= index < self.n_chunks:
            raise invalid("index", index, f"a block index in [0, {self.n_chunks})")
        return min(self.chunk_size, self.input_dim - index * self.chunk_size)

    def _keep(self, key: tuple[Any, ...], value: Tensor, size: int) -> Tensor:
        if self._cached_bytes + size <= self.max_cached_bytes:
            self._cache[key] = value
            self._cached_bytes += size
        return value

    def _sparse_entries(self, index: int) -> tuple[Tensor, Tensor]:
        """Block ``index`` of ``"sjlt"``: output columns ``[rows, s]`` (int64) and values ``[rows, s]`` (float32)."""
        rows, s, k = self._rows(index), self.nonzeros, self.output_dim
        generator = torch.Generator(device="cpu").manual_seed(chunk_seed(self.seed, index))
        starts = [j * k // s for j in range(s + 1)]  # slice j of the outputs: [starts[j], starts[j+1])
        columns = torch.stack([torch.randint(starts[j], starts[j + 1], (rows,), generator=generator)
                               for j in range(s)], dim=1)
        signs = torch.randint(0, 2, (rows, s), generator=generator, dtype=torch.int8).to(torch.float32) * 2.0 - 1.0
        return columns, signs / math.sqrt(s)

    def _sparse_block(self, index: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Block ``index`` of ``"sjlt"`` transposed, ``R_c^T`` ``[k, rows]``, as a CSR tensor."""
        key = ("csr", index, device, dtype)
        if key in self._cache:
            return self._cache[key]
        rows, s = self._rows(index), self.nonzeros
        columns, values = self._sparse_entries(index)
        keys = columns.reshape(-1)  # entry e = r * s + j: input row r, output column keys[e]
        order = torch.argsort(keys, stable=True)  # by output column, then input row
        counts = torch.bincount(keys, minlength=self.output_dim)
        crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        inputs = torch.div(order, s, rounding_mode="floor")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            block = torch.sparse_csr_tensor(crow, inputs, values.reshape(-1)[order].to(dtype),
                                            (self.output_dim, rows), check_invariants=False).to(device)
        return self._keep(key, block, rows * s * (8 + dtype.itemsize) + 8 * (self.output_dim + 1))

    def block(self, index: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows ``index * chunk_size ...`` of ``R`` (already scaled), dense.

        Args:
            index: block index in ``[0, n_chunks)``.
            device: device of the returned block.
            dtype: dtype of the returned block.

        Returns:
            Tensor ``[rows, k]`` with ``rows = min(chunk_size, P - index * chunk_size)``.
        """
        rows = self._rows(index)
        device = torch.device(device)
        if self.kind == "sjlt":
            columns, values = self._sparse_entries(index)
            dense = torch.zeros(rows, self.output_dim, dtype=torch.float32)
            dense.scatter_(1, columns, values)
            return dense.to(device=device, dtype=dtype)
        key = ("dense", index, device, dtype)
        if key in self._cache:
            return self._cache[key]
        generator = torch.Generator(device="cpu").manual_seed(chunk_seed(self.seed, index))
        if self.kind == "gaussian":
            r = torch.randn(rows, self.output_dim, generator=generator, dtype=torch.float32)
        else:
            r = torch.randint(0, 2, (rows, self.output_dim), generator=generator, dtype=torch.int8)
            r = r.to(torch.float32) * 2.0 - 1.0
        r = (r / math.sqrt(self.output_dim)).to(device=device, dtype=dtype)
        return self._keep(key, r, r.numel() * r.element_size())

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
        if self.kind == "sjlt":
            out = self._project_sparse(rows)
        else:
            out = rows.new_zeros(rows.shape[0], self.output_dim)
            for c in range(self.n_chunks):
                start = c * self.chunk_size
                stop = min(self.input_dim, start + self.chunk_size)
                out += rows[:, start:stop] @ self.block(c, device=rows.device, dtype=rows.dtype)
        return out[0] if single else out

    def _project_sparse(self, rows: Tensor) -> Tensor:
        # sparse products run in float32 or float64 (half-precision sparse kernels are missing on CPU)
        work = rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32
        out_t = torch.zeros(self.output_dim, rows.shape[0], dtype=work, device=rows.device)  # [k, b]
        for c in range(self.n_chunks):
            start = c * self.chunk_size
            stop = min(self.input_dim, start + self.chunk_size)
            part = rows[:, start:stop].to(work).T.contiguous()  # [rows, b]
            out_t += self._sparse_block(c, rows.device, work) @ part
        return out_t.T.to(rows.dtype)

    def matrix(self, *, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole ``R`` ``[P, k]`` (for tests and small ``P`` only)."""
        return torch.cat([self.block(c, dtype=dtype) for c in range(self.n_chunks)], dim=0)
