"""Where each stage reads and writes, relative to the project folder, and stage results on disk.

The stages themselves are listed in :mod:`flows.definition.stage_table`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

METRICS = "metrics.json"  # a stage's numbers, beside its result.json (dvc.yaml's metrics)
_WRITING: dict[tuple[str, str], Path] = {}  # (project folder, stage) -> where the running stage writes
_WRITING_LOCK = threading.Lock()


@dataclass(frozen=True)
class Workspace:
    """Fixed paths inside the project folder (the same for Prefect runs and ``dvc repro``)."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def stage_dir(self, stage: str) -> Path:
        """Where ``stage``'s outputs are: ``artifacts/<stage>``, or its staging folder while it runs (:meth:`writing`)."""
        with _WRITING_LOCK:
            path = _WRITING.get((os.path.abspath(self.root), stage), self.artifacts / stage)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_dir(self, stage: str) -> Path:
        """``artifacts/.staging/<stage>``: where a running stage writes until it completes."""
        return self.artifacts / ".staging" / stage

    @contextmanager
    def writing(self, stage: str) -> Iterator[Path]:
        """Send ``stage``'s writes (:meth:`stage_dir`, and through it every output path of its experiment) to its
        staging folder for the block; yields that folder."""
        key, folder = (os.path.abspath(self.root), stage), self.staging_dir(stage)
        with _WRITING_LOCK:
            _WRITING[key] = folder
        try:
            yield folder
        finally:
            with _WRITING_LOCK:
                _WRITING.pop(key, None)

    def dataset(self, name: str) -> Path:
        return self.prepared / f"{name}.csv"


@dataclass
class StageResult:
    """What a stage hands on: paths and numbers, never tensors."""

    stage: str
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, workspace: Workspace) -> Path:
        """Write ``artifacts/<stage>/result.json`` and its numbers alone as ``metrics.json`` (what ``dvc.yaml``'s
        ``metrics`` lists, so ``dvc metrics show`` and ``dvc metrics diff`` read them), atomically."""
        from influence.storage import atomic_write

        folder = workspace.stage_dir(self.stage)
        atomic_write(folder / METRICS, json.dumps(self.metrics, indent=1, sort_keys=True))
        return atomic_write(folder / "result.json", json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, workspace: Workspace, stage: str) -> "StageResult":
        path = workspace.artifacts / stage / "result.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: stage '{stage}' has not run in this workspace; run it first "
                f"(`dvc repro {stage}` or the pipeline)"
            )
        return cls(**json.loads(path.read_text()))


@contextmanager
def timed(result: StageResult) -> Iterator[StageResult]:
    """Fill ``result.seconds`` with the wall time of the block."""
    start = time.perf_counter()
    yield result
    result.seconds = round(time.perf_counter() - start, 3)
    result.metrics["seconds"] = result.seconds
