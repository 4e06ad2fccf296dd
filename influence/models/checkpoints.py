"""Model checkpoints on disk: safetensors state dicts and the manifest of a training run.

Tensors are only ever written with safetensors (never pickle), through
:func:`influence.storage.atomic_write`, so a killed process leaves either the old file or the new
one.

A checkpoint folder is a :class:`~influence.storage.RunFolder`: its ``manifest.json`` lists the
checkpoints of one run with their step and learning rate (``"checkpoints"``), every file's sha256
(``"files"``), and the arguments that made the run so that a later call can refuse to mix runs
(see :mod:`influence.models.training_run`). A *training state* file holds what resuming needs: the
model, the optimizer's state tensors and a JSON position.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from influence.exceptions import CorruptedArtifactError, invalid
from influence.storage import RunFolder, atomic_write, file_digest

MANIFEST_FORMAT = 2


@dataclass(frozen=True)
class CheckpointInfo:
    """One saved checkpoint of a training run.

    Attributes:
        path: the safetensors file holding the model's state dict.
        step: number of optimizer steps taken when it was saved.
        learning_rate: the learning rate of the steps that *preceded* this checkpoint, i.e. of the
            interval ``(previous checkpoint's step, step]``. TracIn weighs the gradients at this
            checkpoint by it.
    """

    path: Path
    step: int
    learning_rate: float


def state_bytes(
    model_or_state_dict: nn.Module | Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """A model's state dict (or any ``name -> tensor`` mapping) as the bytes of a safetensors file.

    Tensors are detached, copied to the CPU and made contiguous; shared storage is fine.

    Raises:
        InvalidArgumentError: a value is not a tensor or a metadata entry is not a string.
    """
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    tensors: dict[str, Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise invalid(f"state[{name!r}]", type(value).__name__, "a torch.Tensor")
        tensors[name] = value.detach().cpu().contiguous().clone()
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise invalid(f"metadata[{key!r}]", value, "string keys and string values")
    return _canonical_header(safetensors.torch.save(tensors, metadata=meta or None))


def _canonical_header(raw: bytes) -> bytes:
    """``raw`` (a safetensors file) with its header's metadata in sorted key order.

    safetensors writes the metadata from a hash map whose order changes from call to call, so the same
    tensors and metadata gave files with other bytes (and other sha256) about half the time. The header is
    rewritten in the same compact JSON, same length, keys sorted: equal content, equal bytes.
    """
    import json

    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    if len(header.get("__metadata__") or {}) < 2:
        return raw
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # (never: the same keys and values; keep what safetensors wrote)
        return raw
    return raw[:8] + text + b" " * (size - len(text)) + raw[8 + size:]


def save_state(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save a model's state dict (or any ``name -> tensor`` mapping) as safetensors.

    Tensors are detached, copied to the CPU and made contiguous; shared storage is fine.

    Args:
        model_or_state_dict: an ``nn.Module`` (its ``state_dict()``) or a mapping of tensors.
        path: the file to write; parent directories are created.
        metadata: string key/values stored in the file's header.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        InvalidArgumentError: a value is not a tensor or a metadata entry is not a string.
    """
    return atomic_write(path, state_bytes(model_or_state_dict, metadata))


def load_state(path: str | Path) -> dict[str, Tensor]:
    """Load a safetensors file written by :func:`save_state`.

    Args:
        path: the file.

    Returns:
        ``name -> tensor`` on the CPU, with the saved shapes and dtypes.

    Raises:
        CorruptedArtifactError: the file is missing or not a readable safetensors file.
    """
    path = Path(path)
    try:
        return safetensors.torch.load_file(path)
    except (OSError, safetensors.SafetensorError, ValueError, RuntimeError) as err:
        raise CorruptedArtifactError(f"cannot read the safetensors file {path}: {err}") from err


def load_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header.

    Args:
        path: the file.

    Returns:
        The metadata given to :func:`save_state` (empty when there was none).

    Raises:
        CorruptedArtifactError: the file is missing or not a readable safetensors file.
    """
    path = Path(path)
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, safetensors.SafetensorError, ValueError, RuntimeError) as err:
        raise CorruptedArtifactError(f"cannot read the safetensors file {path}: {err}") from err


def checkpoint_folder(directory: str | Path) -> RunFolder:
    """The :class:`~influence.storage.RunFolder` of a checkpoint directory."""
    return RunFolder(directory, kind="training run", format_version=MANIFEST_FORMAT)


def checkpoint_entry(info: CheckpointInfo, directory: str | Path) -> dict[str, Any]:
    """The manifest entry of a checkpoint: its path (relative to ``directory`` when inside it), step and learning rate."""
    path, directory = Path(info.path), Path(directory)
    name = path.name if path.parent.resolve() == directory.resolve() else str(path)
    return {"path": name, "step": int(info.step), "learning_rate": float(info.learning_rate)}


def write_manifest(
    directory: str | Path,
    infos: Sequence[CheckpointInfo],
    *,
    arguments: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json`` listing the checkpoints of a run made elsewhere (e.g. for TracIn).

    Args:
        directory: the checkpoint directory (created if needed).
        infos: the checkpoints, in step order; the sha256 of each one present on disk is recorded.
        arguments: JSON-serialisable arguments that made the run.
        extra: other JSON-serialisable entries (e.g. ``complete``, ``losses``, ``seconds``).

    Returns:
        The manifest's path.
    """
    folder = checkpoint_folder(directory)
    folder.directory.mkdir(parents=True, exist_ok=True)
    entries = [checkpoint_entry(info, directory) for info in infos]
    files = {}
    for entry in entries:
        path = folder.directory / entry["path"]
        if path.is_file():
            files[entry["path"]] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    folder.manifest = {"format": MANIFEST_FORMAT, "arguments": dict(arguments or {}), "files": files,
                       "complete": True, **dict(extra or {}), "checkpoints": entries}
    folder.save()
    return folder.manifest_path


def read_manifest_document(directory: str | Path) -> dict[str, Any]:
    """The whole parsed ``manifest.json`` of ``directory`` (arguments, checkpoints, files, extras).

    Raises:
        CorruptedArtifactError: the manifest is missing or is not valid JSON of this format.
    """
    return checkpoint_folder(directory).read_manifest()


def read_manifest(directory: str | Path, verify: bool = True) -> list[CheckpointInfo]:
    """The checkpoints listed in ``directory/manifest.json``, in step order.

    Args:
        directory: the checkpoint directory.
        verify: check each listed checkpoint against the sha256 the manifest records.

    Returns:
        :class:`CheckpointInfo` entries with paths resolved against ``directory``.

    Raises:
        CorruptedArtifactError: the manifest is missing or malformed, or a checkpoint fails its checksum.
    """
    folder = checkpoint_folder(directory)
    folder.manifest = folder.read_manifest()
    try:
        infos = [
            CheckpointInfo(
                path=folder.directory / entry["path"],
                step=int(entry["step"]),
                learning_rate=float(entry["learning_rate"]),
            )
            for entry in folder.manifest["checkpoints"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptedArtifactError(
            f"the checkpoint manifest {folder.manifest_path} has a malformed entry: {err}"
        ) from err
    if verify:
        for entry in folder.manifest["checkpoints"]:
            if folder.has(entry["path"]):
                folder.get(entry["path"])
    return infos


def load_model_state(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict saved by :func:`save_state` into ``model`` (strictly), in place.

    Raises:
        CorruptedArtifactError: the file is unreadable or does not match the model's parameters.
    """
    path = Path(path)
    try:
        model.load_state_dict(load_state(path), strict=True)
    except RuntimeError as err:
        raise CorruptedArtifactError(f"{path} does not hold this model's state: {err}") from err
    return model


def save_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Mapping[str, Any],
) -> Path:
    """Save everything a training loop needs to resume: model, optimizer state, position.

    Args:
        path: the safetensors file to write.
        model: its state dict is stored under ``model.<name>``.
        optimizer: its per-parameter state tensors (e.g. Adam's ``step``, ``exp_avg``,
            ``exp_avg_sq``) are stored under ``optimizer.<index>.<key>``; hyper-parameters are not
            (the resuming loop rebuilds the optimizer with the same arguments).
        position: JSON-serialisable loop position, stored in the header.

    Returns:
        ``path`` as a ``Path``.
    """
    return atomic_write(path, training_state_bytes(model, optimizer, position))


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, position: Mapping[str, Any]) -> bytes:
    """The bytes of the file :func:`save_training_state` writes."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            elif value is not None:
                tensors[f"optimizer.{index}.{key}"] = torch.tensor(value, dtype=torch.float64)
    return state_bytes(tensors, {"position": json.dumps(dict(position))})


def load_training_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore ``model`` and ``optimizer`` from :func:`save_training_state`; return the position.

    Raises:
        CorruptedArtifactError: the file is unreadable or does not fit the model or optimizer.
    """
    path = Path(path)
    tensors = load_state(path)
    try:
        position = json.loads(load_metadata(path)["position"])
        model.load_state_dict(
            {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True
        )
        state_dict = optimizer.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        state_dict["state"] = state
        optimizer.load_state_dict(state_dict)
    except (KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as err:
        raise CorruptedArtifactError(f"the training state {path} does not fit this run: {err}") from err
    if not isinstance(position, dict):
        raise CorruptedArtifactError(f"the training state {path} has a malformed position")
    return position
