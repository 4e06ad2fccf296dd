"""The workspace a task on another machine works in: the flow's own folder when this machine sees it, else a
local folder filled from the object store (:mod:`flows.incremental.object_store`) with the stages the task reads; and the
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
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from flows.incremental.object_store import store_of
from flows.incremental.stage_cache import check_stage, recorded_fingerprint, restore
from flows.experiment.workspace import Workspace

WORK_DIR_ENV = "INFLUENCE_WORK_DIR"
RETRAINING_INPUTS = ("features", "pretrain", "finetune")  # what a retraining reads (its plan is made by the flow)
GPU_INPUTS = ("features", "pretrain", "finetune")  # what the GPU stages (the attribution flow) read


def work_dir() -> Path:
    """``$INFLUENCE_WORK_DIR``, else ``~/.cache/influence-platform/workspaces``."""
    return Path(os.environ.get(WORK_DIR_ENV) or Path.home() / ".cache" / "influence-platform" / "workspaces")


def input_fingerprints(ws: Workspace, stages: tuple[str, ...] = RETRAINING_INPUTS) -> dict[str, str]:
    """``{stage: fingerprint}`` of the completed ``stages`` of ``ws`` (what a task on another machine must fetch)."""
    return {stage: recorded_fingerprint(ws, stage) for stage in stages}


HANDOVER = "handovers/{parent}.json"  # the fingerprints a pipeline run hands its GPU stages (in the object store)
FLOW_RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def check_inputs(inputs: Any) -> dict[str, str]:
    """``inputs`` (``{stage: fingerprint}``, from a task's or flow's parameters or the object store) when every stage
    is one of the stage table and every fingerprint 64 hex digits (or empty: not completed); raise otherwise.

    Raises:
        StoreIntegrityError: naming the bad entry.
    """
    from flows.incremental.object_store import StoreIntegrityError

    if not isinstance(inputs, dict):
        raise StoreIntegrityError(f"inputs={inputs!r}: expected {{stage: fingerprint}}")
    for stage, fp in inputs.items():
        check_stage(stage, fp) if fp else check_stage(stage, "0" * 64)
    return dict(inputs)


def hand_over(settings: Any, parent_flow_run_id: str, inputs: dict[str, str]) -> None:
    """Send the fingerprints the GPU stages of the pipeline run ``parent_flow_run_id`` read to the object store
    (signed), where its child on another machine finds them (:func:`handed_over`)."""
    store = store_of(settings)
    if store is not None:
        store.put_json(HANDOVER.format(parent=_flow_run_id(parent_flow_run_id)), check_inputs(inputs))


def handed_over(settings: Any, parent_flow_run_id: str) -> dict[str, str]:
    """The fingerprints the pipeline run ``parent_flow_run_id`` handed its GPU stages (:func:`hand_over`), checked;
    ``{}`` without an object store (the child then runs in its parent's folder) or when it handed none."""
    store = store_of(settings)
    if store is None:
        return {}
    found = store.get_json(HANDOVER.format(parent=_flow_run_id(parent_flow_run_id)))
    return check_inputs(found) if found is not None else {}


def _flow_run_id(value: str) -> str:
    from flows.incremental.object_store import StoreIntegrityError

    if not FLOW_RUN_ID.fullmatch(str(value)):
        raise StoreIntegrityError(f"flow run id {value!r} is not a UUID")
    return str(value)


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
    inputs = check_inputs(inputs)
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
    inputs = check_inputs(inputs)  # names from a parameter or the store: checked before any file operation
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


def _record_key(context: str, key: str) -> str:
    from flows.incremental.object_store import RECORD_NAME, StoreIntegrityError

    if not RECORD_NAME.fullmatch(str(context)) or not RECORD_NAME.fullmatch(str(key)):
        raise StoreIntegrityError(f"retraining record {context!r}/{key!r}: names are 16 hex digits")
    return f"retrainings/{context}/{key}.json"


def send_records(settings: Any, context: str, found: list[dict]) -> None:
    """Send retraining records to the object store (``retrainings/<context>/<key>.json``, signed); nothing without a store."""
    store = store_of(settings)
    for record in found if store is not None else []:
        store.put_json(_record_key(context, record["key"]), record)


def receive_records(settings: Any, runs: Path, retrainings: list) -> int:
    """Fetch into ``runs`` the records of ``retrainings`` that are not there (made on other machines); how many.

    Raises:
        RuntimeError: a record is neither here nor in the store.
        StoreIntegrityError: a record's signature is not the platform's, or it is another retraining's.
    """
    from flows.incremental.object_store import StoreIntegrityError
    from flows.experiment.retraining import save_record

    store, fetched = store_of(settings), 0
    for r in retrainings if store is not None else []:
        path = runs / f"{r.key}.json"
        if not path.is_file():
            record = store.get_json(_record_key(runs.name, r.key))
            if record is None:
                raise RuntimeError(f"retraining {r.key} of {runs.name} is neither in {runs} nor in {store.url}")
            if not isinstance(record, dict) or record.get("key") != r.key:
                raise StoreIntegrityError(f"{store.url}: the record {runs.name}/{r.key} is another retraining's")
            save_record(runs, record)
            fetched += 1
    return fetched


__all__ = ["GPU_INPUTS", "RETRAINING_INPUTS", "WORK_DIR_ENV", "check_inputs", "fetch_into", "hand_over", "handed_over",
           "input_fingerprints", "receive_records", "send_records", "work_dir", "workspace_for"]
