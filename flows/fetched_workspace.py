"""The workspace a task on another machine works in: the flow's own folder when this machine sees it, else a
local folder filled from the object store (:mod:`flows.object_store`) with the stages the task reads; and the
retraining records such a task sends back through the store.

A Dask worker of another host has no view of the flow's project folder. The flow hands its tasks the
fingerprints of the stages they read (``{stage: fingerprint}``); a task whose machine sees the flow's
folder with those very stages in it works there (the same machine, or a shared file system), another
one fetches them, once per set of fingerprints, into ``$INFLUENCE_WORK_DIR/<digest>/`` (default
``~/.cache/influence-platform/workspaces``), under a file lock shared by the worker processes of the machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from flows.object_store import store_of
from flows.stage_cache import recorded_fingerprint, restore
from flows.workspace import Workspace

WORK_DIR_ENV = "INFLUENCE_WORK_DIR"
RETRAINING_INPUTS = ("features", "pretrain", "finetune")  # what a retraining reads (its plan is made by the flow)
GPU_INPUTS = ("features", "pretrain", "finetune")  # what the GPU stages (the attribution flow) read


def work_dir() -> Path:
    """``$INFLUENCE_WORK_DIR``, else ``~/.cache/influence-platform/workspaces``."""
    return Path(os.environ.get(WORK_DIR_ENV) or Path.home() / ".cache" / "influence-platform" / "workspaces")


def input_fingerprints(ws: Workspace, stages: tuple[str, ...] = RETRAINING_INPUTS) -> dict[str, str]:
    """``{stage: fingerprint}`` of the completed ``stages`` of ``ws`` (what a task on another machine must fetch)."""
    return {stage: recorded_fingerprint(ws, stage) for stage in stages}


def _holds(ws: Workspace, inputs: dict[str, str]) -> bool:
    return all(fp and recorded_fingerprint(ws, stage) == fp for stage, fp in inputs.items())


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".fetch.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def workspace_for(settings: Any, root: Path, inputs: dict[str, str]) -> Workspace:
    """The workspace holding the stages ``inputs`` (``{stage: fingerprint}``): ``root``'s when it does, else a local
    one fetched from ``settings.cluster.store``.

    Raises:
        RuntimeError: ``root`` is not here (or holds other versions) and no store is set, or the store lacks a stage.
    """
    own = Workspace(Path(root))
    if _holds(own, inputs):
        return own
    store = store_of(settings)
    if store is None:
        raise RuntimeError(f"this machine does not see the project folder {root} (or it holds other versions of "
                           f"{sorted(inputs)}), and cluster.store is empty: set an object store so that a worker on "
                           f"another machine can fetch what it reads")
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    local = Workspace(work_dir() / digest)
    with _locked(local.root):
        fetch_into(settings, local, inputs)
    return local


def fetch_into(settings: Any, ws: Workspace, inputs: dict[str, str]) -> list[str]:
    """Bring into ``ws`` each stage of ``inputs`` (``{stage: fingerprint}``) it does not hold with that fingerprint,
    from ``settings.cluster.store``; the stages fetched (none when ``ws`` holds them all).

    Raises:
        RuntimeError: a stage is missing here and there is no store, or the store lacks it.
    """
    missing = [stage for stage, fp in inputs.items() if recorded_fingerprint(ws, stage) != fp]
    store = store_of(settings)
    if missing and store is None:
        raise RuntimeError(f"{ws.root} lacks the stages {missing} of the run that started this one (another machine "
                           f"computed them) and cluster.store is empty: set an object store to hand them over")
    for stage in missing:
        if restore(ws, stage, inputs[stage], store) is None:
            raise RuntimeError(f"the object store {store.url} holds no stage {stage!r} of fingerprint "
                               f"{inputs[stage][:12]}: has the run that computed it sent it?")
    return missing


def send_records(settings: Any, context: str, found: list[dict]) -> None:
    """Send retraining records to the object store (``retrainings/<context>/<key>.json``); nothing without a store."""
    store = store_of(settings)
    for record in found if store is not None else []:
        store.put_json(f"retrainings/{context}/{record['key']}.json", record)


def receive_records(settings: Any, runs: Path, retrainings: list) -> int:
    """Fetch into ``runs`` the records of ``retrainings`` that are not there (made on other machines); how many."""
    from influence.storage import write_json

    store, fetched = store_of(settings), 0
    for r in retrainings if store is not None else []:
        path = runs / f"{r.key}.json"
        if not path.is_file():
            record = store.get_json(f"retrainings/{runs.name}/{r.key}.json")
            if record is None:
                raise RuntimeError(f"retraining {r.key} of {runs.name} is neither in {runs} nor in {store.url}")
            write_json(path, record)
            fetched += 1
    return fetched


__all__ = ["RETRAINING_INPUTS", "WORK_DIR_ENV", "fetch_into", "input_fingerprints", "receive_records", "send_records", "work_dir",
           "workspace_for"]
