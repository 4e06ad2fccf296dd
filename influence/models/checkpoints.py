"""Model checkpoints on disk: safetensors state dicts and a JSON manifest of a training run.

Tensors are only ever written with safetensors (never pickle). Every file is written to a
temporary name and then renamed, so a killed process leaves either the old file or the new one.

The manifest (``manifest.json`` in a checkpoint directory) lists the checkpoints of one run with
their step and learning rate, and records the arguments that made the run so that a later call
can refuse to mix runs (see :func:`influence.models.training.train`). A *training state* file
holds what resuming needs: the model, the optimizer's state tensors and a JSON position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from influence.exceptions import CorruptedArtifactError, invalid

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    path = Path(path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=meta or None))
    return path


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


def write_manifest(
    directory: str | Path,
    infos: Sequence[CheckpointInfo],
    *,
    arguments: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``manifest.json`` listing the checkpoints of a run (paths relative to ``directory``).

    Args:
        directory: the checkpoint directory (created if needed).
        infos: the checkpoints, in step order.
        arguments: JSON-serialisable arguments that made the run.
        extra: other JSON-serialisable entries (e.g. ``complete``, ``losses``, ``seconds``).

    Returns:
        The manifest's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for info in infos:
        path = Path(info.path)
        name = path.name if path.parent.resolve() == directory.resolve() else str(path)
        entries.append(
            {"path": name, "step": int(info.step), "learning_rate": float(info.learning_rate)}
        )
    document = {
        "format": MANIFEST_FORMAT,
        "arguments": dict(arguments or {}),
        **dict(extra or {}),
        "checkpoints": entries,
    }
    path = directory / MANIFEST_NAME
    _atomic_write_bytes(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_manifest_document(directory: str | Path) -> dict[str, Any]:
    """The whole parsed ``manifest.json`` of ``directory`` (arguments, checkpoints, extras).

    Raises:
        CorruptedArtifactError: the manifest is missing or is not valid JSON of this format.
    """
    path = Path(directory) / MANIFEST_NAME
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptedArtifactError(f"cannot read the checkpoint manifest {path}: {err}") from err
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise CorruptedArtifactError(
            f"the checkpoint manifest {path} is not of format {MANIFEST_FORMAT}"
        )
    return document


def read_manifest(directory: str | Path) -> list[CheckpointInfo]:
    """The checkpoints listed in ``directory/manifest.json``, in step order.

    Args:
        directory: the checkpoint directory.

    Returns:
        :class:`CheckpointInfo` entries with absolute-or-as-written paths resolved against
        ``directory``.

    Raises:
        CorruptedArtifactError: the manifest is missing or malformed.
    """
    directory = Path(directory)
    document = read_manifest_document(directory)
    try:
        return [
            CheckpointInfo(
                path=directory / entry["path"],
                step=int(entry["step"]),
                learning_rate=float(entry["learning_rate"]),
            )
            for entry in document["checkpoints"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptedArtifactError(
            f"the checkpoint manifest {directory / MANIFEST_NAME} has a malformed entry: {err}"
        ) from err


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
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            elif value is not None:
                tensors[f"optimizer.{index}.{key}"] = torch.tensor(value, dtype=torch.float64)
    return save_state(tensors, path, {"position": json.dumps(dict(position))})


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
