"""On-disk cache of per-example gradients: safetensors shards, a manifest, resume and checksums.

``GradientCache(directory).build(...)`` computes the per-example gradients (optionally randomly
projected) of a dataset in shards of ``shard_size`` consecutive examples and writes each shard to
``shard_00000.safetensors``, ``shard_00001.safetensors``, ... (tensor ``"gradients"``
``[n_i, D]``, ``D = P`` or ``k``). Every shard is written to a temporary file and moved into
place with ``os.replace``; ``manifest.json`` is rewritten (also atomically) after each shard with
the shard's sha256. A build that was killed restarts and computes only the shards missing from
the manifest; since each shard is computed from the same examples in the same batches, the
result is bit-identical to an uninterrupted build (on CUDA, given deterministic kernels, see
``torch.use_deterministic_algorithms``). A build killed in the middle of a shard leaves at most a
temporary file ``.shard_<index>.safetensors.tmp-<pid>`` (possibly truncated), which the restart
deletes; a shard file that the manifest does not list (a leftover of any kind) is recomputed and
replaced.

The manifest records what made the gradients: the task, the gradient kind, the parameter names,
shard and batch sizes, computation and storage dtypes, device type, the projection's arguments,
a fingerprint of the model (sha256 over the names, dtypes, shapes and bytes of every parameter
and buffer: gradients of the selected parameters depend on the others too) and of the dataset
(sha256 over the length and every example's tensors), ``P`` and ``N``. Building into a directory
made with other arguments raises :class:`~influence.exceptions.CacheMismatchError` naming the
differing fields; a shard whose bytes do not match its checksum raises
:class:`~influence.exceptions.CorruptedArtifactError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from influence.exceptions import CacheMismatchError, CorruptedArtifactError, invalid
from influence.gradients.layout import ParameterLayout
from influence.gradients.per_example import iter_gradients, resolve_names
from influence.task import Task

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSOR_KEY = "gradients"
# temporary files of _atomic_write: ".<final name>.tmp-<pid>"
_TEMPORARY_PATTERNS = (".shard_*.safetensors.tmp-*", f".{MANIFEST_NAME}.tmp-*")
_STORAGE_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype), in C order, read on the CPU."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer of ``model``."""
    digest = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=False).items():
        if not isinstance(t, Tensor):
            continue
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(tensor_bytes(t))
    return digest.hexdigest()


def _hash_leaves(digest: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor_bytes(value))
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(f"K{key}".encode())
            _hash_leaves(digest, value[key])
    elif isinstance(value, (tuple, list)):
        digest.update(f"S{len(value)}".encode())
        for item in value:
            _hash_leaves(digest, item)
    else:
        digest.update(f"V{value!r}".encode())


def dataset_fingerprint(dataset: Dataset) -> str:
    """sha256 over the length of ``dataset`` and every example's tensors (and other values)."""
    digest = hashlib.sha256()
    n = len(dataset)
    digest.update(f"N{n}".encode())
    for i in range(n):
        _hash_leaves(digest, dataset[i])
    return digest.hexdigest()


def task_description(task: Task) -> dict[str, Any]:
    """The task's class and its simple attributes (what defines its loss and measurement)."""
    attributes = {
        k: v for k, v in sorted(vars(task).items())
        if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))
    }
    return {"class": f"{type(task).__module__}.{type(task).__qualname__}", "attributes": attributes}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then move it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # interrupted (KeyboardInterrupt included): leave no partial file
        tmp.unlink(missing_ok=True)
        raise


def _differences(cached: Any, given: Any, prefix: str = "") -> list[str]:
    if isinstance(cached, dict) and isinstance(given, dict):
        out = []
        for key in sorted(set(cached) | set(given)):
            out += _differences(cached.get(key), given.get(key), f"{prefix}{key}.")
        return out
    if cached != given:
        return [f"{prefix.rstrip('.')} (cached {cached!r}, given {given!r})"]
    return []


class GradientCache:
    """Per-example gradients of a dataset stored as checksummed safetensors shards.

    Args:
        directory: where the shards and ``manifest.json`` live (created by :meth:`build`).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest (arguments, fingerprints, ``n_examples``, ``dim``, shards with sha256)."""
        if not self.manifest_path.is_file():
            raise CorruptedArtifactError(f"no gradient cache at {self.directory}: {MANIFEST_NAME} is missing")
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as error:
            raise CorruptedArtifactError(f"{self.manifest_path} is not readable JSON: {error}") from error

    def exists(self) -> bool:
        """Whether a complete cache is present."""
        try:
            return bool(self.manifest.get("complete"))
        except CorruptedArtifactError:
            return False

    def shard_path(self, index: int) -> Path:
        """Path of shard ``index``."""
        return self.directory / f"shard_{index:05d}.safetensors"

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
        names = resolve_names(model, names)
        if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
            raise invalid("shard_size", shard_size, "a positive integer")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise invalid("batch_size", batch_size, "a positive integer")
        storage_name = _dtype_name(dtype_storage) if isinstance(dtype_storage, torch.dtype) else None
        if storage_name not in _STORAGE_DTYPES:
            raise invalid("dtype_storage", dtype_storage, "one of torch.float64, float32, float16, bfloat16")
        dataset = data.dataset if isinstance(data, DataLoader) else data
        collate = data.collate_fn if isinstance(data, DataLoader) else None
        p = ParameterLayout.of(model, names).numel
        n = len(dataset)
        compute_dtype = dtype or dict(model.named_parameters())[names[0]].dtype
        fields = {
            "format": FORMAT_VERSION,
            "arguments": {
                "task": task_description(task),
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
        manifest = self._start(fields, overwrite)
        total = fields["n_shards"]
        for index in range(total):
            if str(index) in manifest["shards"]:
                self._read_shard(index, manifest)
            else:
                start, stop = index * shard_size, min(n, (index + 1) * shard_size)
                subset = Subset(dataset, range(start, stop))
                options = {"batch_size": batch_size, "shuffle": False}
                if collate is not None:
                    options["collate_fn"] = collate
                blocks = list(iter_gradients(
                    task, model, DataLoader(subset, **options), names, kind=kind, device=device,
                    dtype=dtype, projector=projector, memory_budget_bytes=memory_budget_bytes,
                ))
                shard = torch.cat(blocks, dim=0).to(device="cpu", dtype=dtype_storage).contiguous()
                payload = save_safetensors({TENSOR_KEY: shard})
                path = self.shard_path(index)
                _atomic_write(path, payload)
                manifest["shards"][str(index)] = {
                    "file": path.name, "rows": int(shard.shape[0]), "sha256": _sha256(payload),
                }
                self._write_manifest(manifest)
            if on_shard is not None:
                on_shard(index + 1, total)
        manifest["complete"] = True
        self._write_manifest(manifest)
        return self

    def _start(self, fields: dict[str, Any], overwrite: bool) -> dict[str, Any]:
        if self.manifest_path.is_file() and overwrite:
            shutil.rmtree(self.directory)
        if self.manifest_path.is_file():
            manifest = self.manifest
            cached = {key: manifest.get(key) for key in fields}
            differences = _differences(cached, fields)
            if differences:
                raise CacheMismatchError(
                    f"the gradient cache at {self.directory} was built with other arguments: "
                    + "; ".join(differences)
                    + ". Use another directory, or overwrite=True to rebuild it"
                )
            self._remove_temporaries()
            return manifest
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()
        manifest = {**fields, "shards": {}, "complete": False}
        self._write_manifest(manifest)
        return manifest

    def _remove_temporaries(self) -> None:
        """Delete the temporary files a killed build left behind (never part of a cache)."""
        for pattern in _TEMPORARY_PATTERNS:
            for path in self.directory.glob(pattern):
                path.unlink(missing_ok=True)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        _atomic_write(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def _read_shard(self, index: int, manifest: dict[str, Any]) -> Tensor:
        entry = manifest["shards"].get(str(index))
        path = self.shard_path(index)
        if entry is None:
            raise CorruptedArtifactError(
                f"{path} is missing from the manifest of {self.directory}; the build is incomplete, "
                "run build() again to finish it"
            )
        try:
            payload = path.read_bytes()
        except OSError as error:
            raise CorruptedArtifactError(f"gradient shard {path} cannot be read: {error}") from error
        if _sha256(payload) != entry["sha256"]:
            raise CorruptedArtifactError(
                f"gradient shard {path} fails its sha256 checksum (expected {entry['sha256']}); "
                "delete it and run build() again to recompute it"
            )
        try:
            tensor = load_safetensors(payload)[TENSOR_KEY]
        except Exception as error:  # safetensors raises its own error types
            raise CorruptedArtifactError(f"gradient shard {path} is not a valid safetensors file: {error}") from error
        if tensor.shape[0] != entry["rows"]:
            raise CorruptedArtifactError(f"gradient shard {path} has {tensor.shape[0]} rows, expected {entry['rows']}")
        return tensor

    def iter_shards(self) -> Iterator[Tensor]:
        """The stored gradients shard by shard, each checked against its checksum.

        Yields:
            Tensors ``[n_i, D]`` in the storage dtype, in dataset order.
        """
        manifest = self.manifest
        for index in range(manifest["n_shards"]):
            yield self._read_shard(index, manifest)

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
