"""On-disk cache of per-example gradients: safetensors shards in a resumable, checksummed run folder.

``GradientCache(directory).build(...)`` computes the per-example gradients (optionally randomly
projected) of a dataset in shards of ``shard_size`` consecutive examples and writes each shard to
``shard_00000.safetensors``, ``shard_00001.safetensors``, ... (tensor ``"gradients"``
``[n_i, D]``, ``D = P`` or ``k``). The folder is a :class:`~influence.storage.RunFolder`: every
shard is written atomically and listed in ``manifest.json`` with its sha256 as soon as it is on
disk. A build that was killed restarts and computes only the shards missing from the manifest;
since each shard is computed from the same examples in the same batches, the result is
bit-identical to an uninterrupted build (on CUDA, given deterministic kernels, see
``torch.use_deterministic_algorithms``). A build killed in the middle of a shard leaves at most a
temporary file, which the restart deletes; a shard file that the manifest does not list is
recomputed and replaced.

The manifest records what made the gradients: the task, the gradient kind, the parameter names,
shard and batch sizes, computation and storage dtypes, device type, the projection's arguments,
a fingerprint of the model (every parameter and buffer: gradients of the selected parameters
depend on the others too) and of the dataset, ``P`` and ``N``. Building into a directory made
with other arguments raises :class:`~influence.exceptions.CacheMismatchError` naming the differing
fields; a shard whose bytes do not match its checksum raises
:class:`~influence.exceptions.CorruptedArtifactError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from influence.exceptions import CorruptedArtifactError, invalid
from influence.fingerprints import dataset_fingerprint, model_fingerprint
from influence.gradients.layout import ParameterLayout
from influence.gradients.per_example import iter_gradients, resolve_names
from influence.progress import progress
from influence.storage import RunFolder
from influence.task import Task, describe_task
from influence.validation import check_batch_size, check_positive_int

FORMAT_VERSION = 2
TENSOR_KEY = "gradients"
_STORAGE_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class GradientCache:
    """Per-example gradients of a dataset stored as checksummed safetensors shards.

    Args:
        directory: where the shards and ``manifest.json`` live (created by :meth:`build`).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.folder = RunFolder(directory, kind="gradient cache", format_version=FORMAT_VERSION)

    @property
    def directory(self) -> Path:
        return self.folder.directory

    @property
    def manifest_path(self) -> Path:
        return self.folder.manifest_path

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest (arguments, fingerprints, ``n_examples``, ``dim``, shard files with sha256)."""
        return self.folder.read_manifest()

    def exists(self) -> bool:
        """Whether a complete cache is present."""
        try:
            return bool(self.manifest.get("complete"))
        except CorruptedArtifactError:
            return False

    @staticmethod
    def shard_name(index: int) -> str:
        """File name of shard ``index``."""
        return f"shard_{index:05d}.safetensors"

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.directory / self.shard_name(index)

    def build(
        self,
        task: Task,
        model: nn.Module,
        data: Dataset | DataLoader,
        names: str | Sequence[str],
        *,
        kind: str = "train_loss",
        shard_size: int = 1024,
        batch_size: int = 64,
        dtype_storage: torch.dtype = torch.float32,
        projector: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        memory_budget_bytes: int = 256 * 2**20,
        overwrite: bool = False,
        on_shard: Callable[[int, int], None] | None = None,
    ) -> "GradientCache":
        """Compute and store the gradients, resuming an interrupted build.

        Args:
            task: the task.
            model: the model (read only).
            data: a map-style dataset, or a ``DataLoader`` whose dataset and collate function are
                used (its own batching and order are not: shards follow the dataset order).
            names: parameter names (or a selector string).
            kind: ``"train_loss"`` or ``"measurement"``.
            shard_size: examples per shard.
            batch_size: examples per gradient batch (inside a shard).
            dtype_storage: dtype of the stored gradients (float64/float32/float16/bfloat16).
            projector: optional :class:`~influence.gradients.projection.RandomProjector`; shards
                then hold ``[n_i, k]``.
            device: device of the computation.
            dtype: floating dtype of the computation (default: the model's).
            memory_budget_bytes: bound on one raw gradient block (see ``iter_gradients``).
            overwrite: discard an existing cache in ``directory`` instead of refusing a mismatch.
            on_shard: called as ``on_shard(done, total)`` after each shard is stored or found.

        Returns:
            ``self``.
        """
        options = {"kind": kind, "shard_size": shard_size, "batch_size": batch_size, "dtype_storage": dtype_storage,
                   "projector": projector, "device": device, "dtype": dtype}
        missing = set(self.open(task, model, data, names, overwrite=overwrite, **options))
        total = self.folder.manifest["n_shards"]
        for index in progress(range(total), desc="gradient shards", unit="shard"):
            if index in missing:
                self.put_shard(index, gradient_shard(task, model, data, names, index,
                                                     memory_budget_bytes=memory_budget_bytes, **options))
            else:
                self._read_shard(index)
            if on_shard is not None:
                on_shard(index + 1, total)
        return self.finish()

    def open(
        self,
        task: Task,
        model: nn.Module,
        data: Dataset | DataLoader,
        names: str | Sequence[str],
        *,
        kind: str = "train_loss",
        shard_size: int = 1024,
        batch_size: int = 64,
        dtype_storage: torch.dtype = torch.float32,
        projector: Any = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
    ) -> list[int]:
        """Start the cache (its manifest) or resume the one made with the same arguments, without computing:
        the shards that are missing, which :func:`gradient_shard` computes (anywhere: another process or
        machine) and :meth:`put_shard` stores. The arguments are those of :meth:`build`.

        Returns:
            The indices of the missing shards, in order.

        Raises:
            CacheMismatchError: the folder holds a cache made with other arguments (and not ``overwrite``).
        """
        names = resolve_names(model, names)
        check_positive_int("shard_size", shard_size)
        check_batch_size(batch_size)
        storage_name = _dtype_name(dtype_storage) if isinstance(dtype_storage, torch.dtype) else None
        if storage_name not in _STORAGE_DTYPES:
            raise invalid("dtype_storage", dtype_storage, "one of torch.float64, float32, float16, bfloat16")
        dataset = data.dataset if isinstance(data, DataLoader) else data
        p = ParameterLayout.of(model, names).numel
        n = len(dataset)
        compute_dtype = dtype or dict(model.named_parameters())[names[0]].dtype
        fields = {
            "arguments": {
                "task": describe_task(task),
                "kind": kind,
                "names": list(names),
                "shard_size": shard_size,
                "batch_size": batch_size,
                "dtype": _dtype_name(compute_dtype),
                "device_type": torch.device(device).type,
            },
            "dtype_storage": storage_name,
            "projection": dict(projector.arguments) if projector is not None else None,
            "model_fingerprint": model_fingerprint(model),
            "dataset_fingerprint": dataset_fingerprint(dataset),
            "n_parameters": p,
            "n_examples": n,
            "dim": projector.output_dim if projector is not None else p,
            "n_shards": -(-n // shard_size),
        }
        self.folder.open(fields, overwrite=overwrite)
        return [i for i in range(fields["n_shards"]) if not self.folder.has(self.shard_name(i))]

    def put_shard(self, index: int, shard: Tensor) -> None:
        """Store shard ``index`` of the opened cache (:meth:`open`): ``[n_i, D]`` in its storage dtype, with ``n_i``
        the shard's examples.

        Raises:
            InvalidArgumentError: the index, shape or dtype is not the shard's.
        """
        manifest = self.folder.manifest
        if not 0 <= index < manifest["n_shards"]:
            raise invalid("shard index", index, f"0 to {manifest['n_shards'] - 1}")
        rows = min(manifest["n_examples"], (index + 1) * manifest["arguments"]["shard_size"]) - index * manifest["arguments"]["shard_size"]
        if tuple(shard.shape) != (rows, manifest["dim"]) or _dtype_name(shard.dtype) != manifest["dtype_storage"]:
            raise invalid(f"shard {index}", f"{tuple(shard.shape)} {_dtype_name(shard.dtype)}",
                          f"[{rows}, {manifest['dim']}] {manifest['dtype_storage']}")
        self.folder.put(self.shard_name(index), save_safetensors({TENSOR_KEY: shard.contiguous()}), rows=rows)

    def finish(self) -> "GradientCache":
        """Mark the cache complete once every shard is stored.

        Raises:
            InvalidArgumentError: shards are missing.
        """
        manifest = self.folder.manifest
        missing = [i for i in range(manifest["n_shards"]) if not self.folder.has(self.shard_name(i))]
        if missing:
            raise invalid("gradient cache", f"{len(missing)} missing shards (first {missing[0]})", "every shard stored")
        if not manifest.get("complete"):
            self.folder.finish()
        return self

    def _read_shard(self, index: int) -> Tensor:
        name = self.shard_name(index)
        payload = self.folder.get(name)
        try:
            tensor = load_safetensors(payload)[TENSOR_KEY]
        except Exception as error:  # safetensors raises its own error types
            raise CorruptedArtifactError(f"gradient shard {self.shard_path(index)} is not a valid safetensors file: {error}") from error
        rows = self.folder.manifest["files"][name]["rows"]
        if tensor.shape[0] != rows:
            raise CorruptedArtifactError(f"gradient shard {self.shard_path(index)} has {tensor.shape[0]} rows, expected {rows}")
        return tensor

    def iter_shards(self) -> Iterator[Tensor]:
        """The stored gradients shard by shard, each checked against its checksum.

        Yields:
            Tensors ``[n_i, D]`` in the storage dtype, in dataset order.
        """
        self.folder.manifest = self.manifest
        for index in range(self.folder.manifest["n_shards"]):
            yield self._read_shard(index)

    def matrix(self) -> Tensor:
        """All stored gradients.

        Returns:
            Tensor ``[N, D]`` in the storage dtype (``D = P``, or ``k`` when projected).
        """
        manifest = self.manifest
        blocks = list(self.iter_shards())
        if not blocks:
            return torch.empty(0, manifest["dim"], dtype=_STORAGE_DTYPES[manifest["dtype_storage"]])
        return torch.cat(blocks, dim=0)


def gradient_shard(
    task: Task,
    model: nn.Module,
    data: Dataset | DataLoader,
    names: str | Sequence[str],
    index: int,
    *,
    kind: str = "train_loss",
    shard_size: int = 1024,
    batch_size: int = 64,
    dtype_storage: torch.dtype = torch.float32,
    projector: Any = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    memory_budget_bytes: int = 256 * 2**20,
) -> Tensor:
    """Shard ``index`` of a :class:`GradientCache` made with the same arguments: the gradients of examples
    ``index * shard_size`` to ``(index + 1) * shard_size - 1`` (in the same batches as :meth:`GradientCache.build`,
    so the same numbers wherever it runs, given the same device type and threads).

    Returns:
        Tensor ``[n_i, D]`` on the CPU in ``dtype_storage``.
    """
    names = resolve_names(model, names)
    dataset = data.dataset if isinstance(data, DataLoader) else data
    collate = data.collate_fn if isinstance(data, DataLoader) else None
    n = len(dataset)
    if not 0 <= index * shard_size < max(n, 1):
        raise invalid("shard index", index, f"0 to {max(0, -(-n // shard_size) - 1)} ({n} examples, {shard_size} per shard)")
    subset = Subset(dataset, range(index * shard_size, min(n, (index + 1) * shard_size)))
    options = {"batch_size": batch_size, "shuffle": False, **({"collate_fn": collate} if collate is not None else {})}
    blocks = list(iter_gradients(
        task, model, DataLoader(subset, **options), names, kind=kind, device=device,
        dtype=dtype, projector=projector, memory_budget_bytes=memory_budget_bytes,
    ))
    return torch.cat(blocks, dim=0).to(device="cpu", dtype=dtype_storage).contiguous()
