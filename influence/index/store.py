"""Rows of a fixed width on disk, in checksummed safetensors shards, scored against queries by streaming.

A :class:`RepresentationStore` holds one ``D``-dimensional row per training example, in shards of
``shard_size`` consecutive rows (``shard_00000.safetensors``, ... tensor ``"rows"`` ``[n_i, D]``)
listed with their sha256 in ``manifest.json`` (a :class:`~influence.storage.RunFolder`: every shard
is written atomically, so a killed writer resumes at the first missing shard, and a folder made with
other fields is refused with each differing field named).

:meth:`RepresentationStore.top_k` scores ``m`` query rows against every stored row one shard at a
time and keeps only the running ``k`` largest and ``k`` smallest scores per query, so its memory is
one shard, one ``[m, shard_size]`` block of scores and ``[m, k]`` results, whatever the number of
stored rows. :meth:`RepresentationStore.scores` gives the full ``[m, n]`` matrix when it is wanted
(the evidence stages). Shards are read through memory maps; their checksums are checked by
:meth:`RepresentationStore.verify` (and by :meth:`~RepresentationStore.read_shard` with ``verify=True``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor

from influence.exceptions import CorruptedArtifactError, invalid
from influence.precision import is_half, product_t
from influence.storage import RunFolder, sha256_bytes
from influence.validation import check_positive_int

FORMAT_VERSION = 1
ROWS_KEY = "rows"
STORAGE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TopK:
    """Each query's ``k`` strongest proponents and opponents.

    Attributes:
        proponents: ``[m, k]`` training indices, by decreasing score.
        proponent_scores: ``[m, k]`` their scores.
        opponents: ``[m, k]`` training indices, by increasing score (most negative first).
        opponent_scores: ``[m, k]`` their scores.
    """

    proponents: Tensor
    proponent_scores: Tensor
    opponents: Tensor
    opponent_scores: Tensor

    def to_rows(self, query_ids: list[str] | None = None, train_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """One dict per (query, rank, side): ``{"query", "rank", "side", "train", "score"}``."""
        out = []
        for q in range(self.proponents.shape[0]):
            for side, index, score in (("proponent", self.proponents, self.proponent_scores),
                                       ("opponent", self.opponents, self.opponent_scores)):
                for rank, (z, value) in enumerate(zip(index[q].tolist(), score[q].tolist()), start=1):
                    out.append({"query": query_ids[q] if query_ids else q, "rank": rank, "side": side,
                                "train": train_ids[z] if train_ids else z, "score": value})
        return out


def _merge(best: tuple[Tensor, Tensor] | None, scores: Tensor, offset: int, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The ``k`` largest (smallest) of the running ``best`` ``(values [m, k'], indices)`` and ``scores`` ``[m, b]``."""
    take = min(k, scores.shape[1])
    values, index = torch.topk(scores, take, dim=1, largest=largest, sorted=False)
    index = index + offset
    if best is not None:
        values, index = torch.cat([best[0], values], dim=1), torch.cat([best[1], index], dim=1)
        if values.shape[1] > k:
            values, keep = torch.topk(values, k, dim=1, largest=largest, sorted=False)
            index = index.gather(1, keep)
    return values, index


class RepresentationStore:
    """Shards of ``D``-dimensional rows on disk, with a manifest.

    Args:
        directory: the store's folder.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.folder = RunFolder(directory, kind="attribution index", format_version=FORMAT_VERSION)

    @property
    def directory(self) -> Path:
        return self.folder.directory

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest read from disk (fields, ``files`` with sha256 and rows, ``complete``)."""
        if not self.folder.manifest:
            self.folder.manifest = self.folder.read_manifest()
        return self.folder.manifest

    @staticmethod
    def shard_name(index: int) -> str:
        """File name of shard ``index``."""
        return f"shard_{index:05d}.safetensors"

    # -- writing ---------------------------------------------------------------------------------

    def open(self, fields: Mapping[str, Any], *, overwrite: bool = False) -> dict[str, Any]:
        """Start a store defined by ``fields`` or resume the one made with the same fields.

        ``fields`` must hold ``n_rows`` and ``shard_size``; see :meth:`influence.storage.RunFolder.open`.
        """
        for key in ("n_rows", "shard_size", "storage_dtype"):
            if key not in fields:
                raise invalid("store fields", sorted(fields), f"fields including {key!r}")
        if fields["storage_dtype"] not in STORAGE_DTYPES:
            raise invalid("storage_dtype", fields["storage_dtype"], "one of " + ", ".join(STORAGE_DTYPES))
        check_positive_int("shard_size", fields["shard_size"])
        return self.folder.open(dict(fields, n_shards=-(-int(fields["n_rows"]) // int(fields["shard_size"]))),
                                overwrite=overwrite)

    def missing_shards(self) -> list[int]:
        """Indices of the shards not written yet."""
        return [i for i in range(self.manifest["n_shards"]) if not self.folder.has(self.shard_name(i))]

    def shard_rows(self, index: int) -> range:
        """The row indices shard ``index`` holds."""
        size, n = int(self.manifest["shard_size"]), int(self.manifest["n_rows"])
        return range(index * size, min(n, (index + 1) * size))

    def put_shard(self, index: int, rows: Tensor) -> None:
        """Store shard ``index`` (``[n_i, D]``, cast to the storage dtype), atomically, with its checksum."""
        expected = len(self.shard_rows(index))
        if rows.dim() != 2 or rows.shape[0] != expected:
            raise invalid(f"rows of shard {index}", tuple(rows.shape), f"[{expected}, D]")
        dim = self.manifest.get("dim")
        if dim is not None and rows.shape[1] != dim:
            raise invalid(f"rows of shard {index}", tuple(rows.shape), f"width D = {dim} (that of the other shards)")
        stored = rows.detach().to(device="cpu", dtype=STORAGE_DTYPES[self.manifest["storage_dtype"]]).contiguous()
        self.manifest["dim"] = int(stored.shape[1])
        self.folder.put(self.shard_name(index), save_safetensors({ROWS_KEY: stored}), rows=int(stored.shape[0]))

    def put_extra(self, name: str, tensors: Mapping[str, Tensor]) -> None:
        """Store named tensors beside the shards (e.g. a solver's state), checksummed."""
        payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        self.folder.put(name, save_safetensors(payload))

    def get_extra(self, name: str) -> dict[str, Tensor]:
        """The tensors of :meth:`put_extra`, checked against their checksum."""
        from safetensors.torch import load as load_safetensors

        return load_safetensors(self.folder.get(name))

    def has(self, name: str) -> bool:
        """Whether the manifest lists the file ``name``."""
        return self.folder.has(name)

    def write(self, blocks: Iterable[Tensor]) -> None:
        """Fill the missing shards from ``blocks`` ``[b_i, D]`` that follow the row order (all rows), then finish."""
        pending: list[Tensor] = []
        count, index = 0, 0
        for block in blocks:
            pending.append(block)
            count += block.shape[0]
            while index < self.manifest["n_shards"] and count >= len(self.shard_rows(index)):
                rows = torch.cat(pending)
                size = len(self.shard_rows(index))
                if not self.folder.has(self.shard_name(index)):
                    self.put_shard(index, rows[:size])
                pending, count, index = [rows[size:]], count - size, index + 1
        self.finish()

    def finish(self, **entries: Any) -> None:
        """Mark the store complete once every shard is written."""
        missing = self.missing_shards()
        if missing:
            raise CorruptedArtifactError(f"the attribution index at {self.directory} lacks shards {missing[:5]}")
        self.folder.finish(**entries)

    # -- reading ---------------------------------------------------------------------------------

    def load(self) -> "RepresentationStore":
        """Read the manifest and require a complete store."""
        self.folder.manifest = self.folder.read_manifest()
        if not self.folder.manifest.get("complete"):
            raise CorruptedArtifactError(
                f"the attribution index at {self.directory} is incomplete (its build was interrupted); "
                "fit it again with the same arguments to finish it"
            )
        return self

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def verify(self) -> None:
        """Check every shard against its sha256 (raises :class:`CorruptedArtifactError` naming the file)."""
        for index in range(self.manifest["n_shards"]):
            self.folder.get(self.shard_name(index))

    def read_shard(self, index: int, *, verify: bool = False) -> Tensor:
        """Shard ``index`` ``[n_i, D]`` in the storage dtype (memory-mapped read; ``verify`` hashes it)."""
        name = self.shard_name(index)
        entry = self.manifest.get("files", {}).get(name)
        path = self.directory / name
        if entry is None:
            raise CorruptedArtifactError(f"{path} is not listed in the manifest of the attribution index")
        try:
            if verify:
                payload = path.read_bytes()
                if sha256_bytes(payload) != entry["sha256"]:
                    raise CorruptedArtifactError(f"{path} fails its sha256 checksum; fit the index again")
            with safe_open(str(path), framework="pt") as handle:
                rows = handle.get_tensor(ROWS_KEY)
        except CorruptedArtifactError:
            raise
        except Exception as error:  # safetensors and the OS raise their own types
            raise CorruptedArtifactError(f"{path} cannot be read as a shard of rows: {error}") from error
        if rows.dim() != 2 or rows.shape[0] != entry["rows"]:
            raise CorruptedArtifactError(f"{path} holds {tuple(rows.shape)}, expected {entry['rows']} rows")
        return rows

    def _prefetch(self, index: int) -> None:
        """Ask the OS to start reading shard ``index`` (scored next) while the current one is scored."""
        if index >= self.manifest["n_shards"] or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.directory / self.shard_name(index), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def iter_shards(self, *, verify: bool = False) -> Iterator[tuple[int, Tensor]]:
        """``(first row index, rows [n_i, D])`` shard by shard (the next shard's read starts meanwhile)."""
        for index in range(self.manifest["n_shards"]):
            rows = self.read_shard(index, verify=verify)
            self._prefetch(index + 1)
            yield self.shard_rows(index).start, rows

    def _queries(self, queries: Tensor, dtype: torch.dtype | None) -> Tensor:
        if not isinstance(queries, Tensor) or queries.dim() != 2 or queries.shape[1] != self.dim:
            shape = tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__
            raise invalid("queries", shape, f"a tensor [m, D] with D = {self.dim}")
        if dtype is None:  # the rows' precision (half precision computed in float32): no widened copy of every shard
            stored = STORAGE_DTYPES[self.manifest["storage_dtype"]]
            dtype = torch.float32 if stored in (torch.float16, torch.bfloat16) else stored
        return queries.to(dtype)

    def top_k(self, queries: Tensor, k: int, *, scale: float = 1.0, dtype: torch.dtype | None = None) -> TopK:
        """The ``k`` largest and ``k`` smallest scores ``scale * queries @ rows.T`` per query, streamed.

        Args:
            queries: ``[m, D]`` query rows.
            k: how many of each side (at most the number of rows).
            scale: factor of every score (e.g. ``sign / n`` of the influence function).
            dtype: dtype of the products (default: the storage dtype, float32 for half precision); a
                half dtype multiplies in it with float32 accumulation and float32 scores.

        Returns:
            :class:`TopK` with ``[m, min(k, n)]`` tensors, sorted.
        """
        check_positive_int("k", k)
        queries = self._queries(queries, dtype) * scale
        k = min(k, self.n_rows)
        high = low = None
        for start, rows in self.iter_shards():
            scores = product_t(queries, rows.to(device=queries.device, dtype=queries.dtype))
            high = _merge(high, scores, start, k, largest=True)
            low = _merge(low, scores, start, k, largest=False)
            del scores, rows
        if high is None:
            empty = torch.zeros(queries.shape[0], 0)
            return TopK(empty.long(), empty, empty.long(), empty)
        hv, order = high[0].sort(dim=1, descending=True)
        lv, order_low = low[0].sort(dim=1)
        return TopK(high[1].gather(1, order), hv, low[1].gather(1, order_low), lv)

    def scores(self, queries: Tensor, *, scale: float = 1.0, dtype: torch.dtype | None = None) -> Tensor:
        """The full ``[m, n]`` matrix ``scale * queries @ rows.T`` (``dtype`` as in :meth:`top_k`)."""
        queries = self._queries(queries, dtype) * scale
        wide = torch.float32 if is_half(queries.dtype) else queries.dtype
        out = queries.new_empty(queries.shape[0], self.n_rows, dtype=wide)  # filled shard by shard: no second copy
        for start, rows in self.iter_shards():
            out[:, start:start + rows.shape[0]] = product_t(queries, rows.to(device=queries.device, dtype=queries.dtype))
        return out


__all__ = ["STORAGE_DTYPES", "RepresentationStore", "TopK"]
