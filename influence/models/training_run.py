"""The checkpoint folder of one training run: checkpoints, resume state and manifest.

It is a :class:`~influence.storage.RunFolder` (the same resumable, checksummed folder as the
gradient cache): the manifest records the run's arguments, every checkpoint with the learning rate
of the steps before it, and each file's sha256. ``resume.safetensors`` holds what continuing needs
(model, optimizer state, position in the data); it is rewritten beside every checkpoint and at
every epoch end, and removed when the run completes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence.exceptions import CorruptedArtifactError
from influence.models.checkpoints import (
    CheckpointInfo,
    checkpoint_entry,
    checkpoint_folder,
    load_model_state,
    load_training_state,
    state_bytes,
    training_state_bytes,
)

RESUME_NAME = "resume.safetensors"


def checkpoint_name(step: int) -> str:
    """``step-<8-digit step>.safetensors``."""
    return f"step-{step:08d}.safetensors"


class TrainingRun:
    """Checkpoints, manifest and resume state of one run in ``directory``.

    Args:
        directory: the checkpoint folder.
        arguments: JSON-serialisable arguments of the run (compared on reopening).
        overwrite: replace a run made with other arguments instead of refusing it.

    Attributes:
        checkpoints: the checkpoints saved so far, in step order.
    """

    def __init__(self, directory: str | Path, arguments: Mapping[str, Any], overwrite: bool) -> None:
        self.folder = checkpoint_folder(directory)
        self.folder.open({"arguments": dict(arguments)}, overwrite=overwrite)
        self.folder.manifest.setdefault("checkpoints", [])
        self.checkpoints: list[CheckpointInfo] = []

    @property
    def directory(self) -> Path:
        return self.folder.directory

    @property
    def resume_path(self) -> Path:
        return self.directory / RESUME_NAME

    def _infos(self, entries: list[Mapping[str, Any]], where: str) -> list[CheckpointInfo]:
        try:
            return [CheckpointInfo(self.directory / e["path"], int(e["step"]), float(e["learning_rate"])) for e in entries]
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptedArtifactError(f"{where} is malformed: {err}") from err

    def completed(self, model: nn.Module) -> tuple[list[float], list[float], int, float] | None:
        """Load the final checkpoint of a finished run into ``model``; its ``(losses, data_losses, steps, seconds)``.

        Returns ``None`` (and loads nothing) when the run has not finished.
        """
        manifest = self.folder.manifest
        if not manifest.get("complete"):
            return None
        self.checkpoints = self._infos(manifest["checkpoints"], f"the manifest of {self.directory}")
        try:
            found = ([float(x) for x in manifest["losses"]], [float(x) for x in manifest.get("data_losses", [])],
                     int(manifest["steps"]), float(manifest["seconds"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptedArtifactError(f"the manifest in {self.directory} of a finished run is malformed: {err}") from err
        self.folder.get(self.checkpoints[-1].path.name)  # checked against its sha256
        load_model_state(model, self.checkpoints[-1].path)
        return found

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Restore model and optimizer from the resume state; its position, or ``None`` for a fresh run."""
        if not self.folder.has(RESUME_NAME):
            return None
        self.folder.get(RESUME_NAME)  # checked against its sha256
        position = load_training_state(self.resume_path, model, optimizer)
        self.checkpoints = self._infos(position.get("checkpoints", []), f"the resume state {self.resume_path}")
        return position

    def save_checkpoint(self, model: nn.Module, step: int, learning_rate: float) -> CheckpointInfo:
        """Write the model's state as the checkpoint of ``step``."""
        name = checkpoint_name(step)
        self.folder.put(name, state_bytes(model, {"step": str(step), "learning_rate": repr(learning_rate)}),
                        step=step, learning_rate=learning_rate)
        info = CheckpointInfo(self.directory / name, step, learning_rate)
        if not self.checkpoints or self.checkpoints[-1].step != step:
            self.checkpoints.append(info)
        return info

    def save_progress(self, model: nn.Module, optimizer: torch.optim.Optimizer, position: dict[str, Any]) -> None:
        """Write the resume state (model, optimizer, ``position`` and the checkpoints so far)."""
        entries = [checkpoint_entry(c, self.directory) for c in self.checkpoints]
        self.folder.manifest["checkpoints"] = entries
        self.folder.put(RESUME_NAME, training_state_bytes(model, optimizer, dict(position, checkpoints=entries)))

    def finish(self, losses: list[float], data_losses: list[float], steps: int, seconds: float) -> None:
        """Record the finished run and remove its resume state."""
        self.folder.manifest["files"].pop(RESUME_NAME, None)
        self.folder.finish(checkpoints=[checkpoint_entry(c, self.directory) for c in self.checkpoints],
                           losses=losses, data_losses=data_losses, steps=steps, seconds=seconds)
        self.resume_path.unlink(missing_ok=True)


__all__ = ["RESUME_NAME", "TrainingRun", "checkpoint_name"]
