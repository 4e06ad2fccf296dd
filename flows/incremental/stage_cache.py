"""Skip a stage whose inputs did not change; bring back the outputs of earlier inputs when they return.

A stage's *fingerprint* is the sha256 of what it reads, all of it from its row of the stage table:

- its settings: the values of the ``params`` it declares (a stage cannot read others, see
  :mod:`flows.definition.declared`);
- its code: the code it runs, function by function inside :mod:`flows` and module by module in
  :mod:`influence` (:mod:`flows.definition.code_deps`), so editing the report re-runs only the report;
- its data: the md5 of each prepared dataset it declares, and of the user's files it reads (the
  data stage: your finetuning table and pretraining corpus);
- the fingerprints of the stages whose outputs it reads (its ``inputs``), so a change anywhere
  upstream reaches every stage below it;
- its environment: the versions of torch and numpy, a digest of the installed packages' versions, and for a stage that
  declares ``attribution.device`` the device type it computes on (``cpu`` or ``cuda``), so an upgrade or a move
  between a CPU and a GPU machine never reuses outputs made by another stack.

A stage runs in a staging folder, ``artifacts/.staging/<stage>``, which is moved into place when it
completes: until then ``artifacts/<stage>`` holds the outputs of its last completed run, untouched.
A completed stage stores its fingerprint in ``artifacts/<stage>/result.json``, with the manifest of
its folder: every file's size, modification time and sha256. The next run skips the stage when the
stored fingerprint equals the new one and every file of the manifest is still there with its bytes
(a file whose size or time changed is hashed again; one that differs makes the stage run again). A stage that
starts writes its fingerprint to ``artifacts/.staging/<stage>/.running``, so a killed run never leaves
a result that claims its outputs; when it starts again with the same fingerprint it resumes from what
the killed run left in the staging folder (checkpoints, gradient shards), and with another fingerprint
it starts from an empty one, so nothing computed from other inputs (or by other code) is reused.

Past versions: each completed stage's folder is also kept under ``artifacts/.stages/<stage>/<fp>/``
(hard links: no copy until a file is replaced, which every writer of the pipeline does atomically),
the :data:`KEPT_VERSIONS` most recently used per stage. When a stage's fingerprint matches a kept
version, that version is linked back into ``artifacts/<stage>`` instead of recomputing it: going
from settings A to B and back to A recomputes nothing the second time. The ``data`` stage (whose
versions DVC keeps) and the ``report`` stage (never skipped: each run gets its own MLflow run) are
not kept.

With an object store (``cluster.store``, :mod:`flows.incremental.object_store`), every kept stage is also sent there
under its fingerprint, and a stage that is neither current nor kept here is fetched from there when the
store has it (into the kept versions, then linked into place): a pipeline on another machine, or in a
fresh clone, restores what any machine computed with the same inputs instead of recomputing it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from flows.definition.code_deps import files_digest, function_closure
from flows.incremental.object_store import ObjectStore, store_of
from flows.definition.settings import PipelineSettings
from flows.definition import stage_table
from flows.experiment.workspace import METRICS, StageResult, Workspace
from influence.storage import file_digest, fsync_folder

NEVER_SKIPPED = ("report",)
NOT_KEPT = ("data", "report")
KEPT_VERSIONS = 3
RUNNING = ".running"
log = logging.getLogger(__name__)


def _param(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_code(stage: str) -> dict[str, str]:
    """``{function or file: sha256}`` of the code ``stage`` runs (see :mod:`flows.definition.code_deps`)."""
    from flows.stages.entry import entry_functions

    functions, modules = function_closure(entry_functions(stage))
    return {**functions, **files_digest(modules)}


DEVICE_TYPES = ("cpu", "cuda")


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    """The software a stage's outputs depend on besides the code: torch's and numpy's versions and a digest of every
    installed distribution's name and version (what ``requirements.lock`` pins, as this environment has it; the GPU
    build of torch that ``scripts/bootstrap`` installs beside a GPU differs from the CPU one)."""
    import importlib.metadata

    import numpy
    import torch

    installed = sorted({f"{(d.metadata['Name'] or '').lower()}=={d.version}" for d in importlib.metadata.distributions()})
    return {"torch": torch.__version__, "numpy": numpy.__version__,
            "packages": hashlib.sha256("\n".join(installed).encode()).hexdigest()}


def device_type(settings: PipelineSettings) -> str:
    """The device type the stages that declare ``attribution.device`` compute on here (as
    :attr:`flows.experiment.experiment.Experiment.device` resolves it)."""
    import torch

    if settings.attribution.device == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def fingerprint(stage: str, settings: PipelineSettings, ws: Workspace, device: str | None = None) -> str:
    """The fingerprint of ``stage``'s inputs (see the module docstring).

    Args:
        device: the device type the stage computes on (only read by stages that declare ``attribution.device``);
            default this machine's (:func:`device_type`).

    Returns:
        a 64-character hex digest; ``""`` when an input stage has no recorded fingerprint (the stage then runs).
    """
    found = fingerprint_inputs(stage, settings, ws, device)
    return "" if found is None else hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()


def fingerprint_inputs(stage: str, settings: PipelineSettings, ws: Workspace, device: str | None = None) -> dict | None:
    """What :func:`fingerprint` digests (see the module docstring); None when an input stage has no recorded fingerprint."""
    from flows.versioning.data_version import md5_file

    row = stage_table.row(stage)
    values = settings.model_dump(mode="json")
    inputs: dict = {
        "stage": stage,
        "params": {name: _param(values, name) for name in row.params},
        "code": stage_code(stage),
        "data": {name: md5_file(ws.dataset(name)) if ws.dataset(name).is_file() else "" for name in row.data},
        "files": {f: md5_file(ws.root / f) if (ws.root / f).is_file() else "missing" for f in (row.files(settings) if row.files else [])},
        "upstream": {},
        "environment": environment(),
    }
    if "attribution.device" in row.params:
        inputs["environment"] = {**inputs["environment"], "device": device or device_type(settings)}
    for dep in row.inputs:
        upstream = recorded_fingerprint(ws, dep)
        if not upstream:
            return None
        inputs["upstream"][dep] = upstream
    return inputs


def _changed(before: dict | None, after: dict | None) -> list[str]:
    """The entries of two :func:`fingerprint_inputs` that differ (``code/flows.x:f``, ``upstream/features``...)."""
    if before is None or after is None:
        return ["the upstream stages"]
    found = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += [f"{key}/{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            found.append(key)
    return found


def recorded_fingerprint(ws: Workspace, stage: str) -> str:
    """The fingerprint stored with ``stage``'s last completed result, or ``""``."""
    path = ws.artifacts / stage / "result.json"
    if not path.is_file():
        return ""
    try:
        return str(json.loads(path.read_text()).get("info", {}).get("fingerprint", ""))
    except json.JSONDecodeError:
        return ""


MANIFEST = "files"  # key of result.info: {path relative to the stage folder: [size, mtime_ns, sha256]}
_NOT_IN_MANIFEST = ("result.json", METRICS, RUNNING)  # both written from the result, after its manifest


def manifest(folder: Path) -> dict[str, list]:
    """``{relative path: [size, mtime_ns, sha256]}`` of every file under ``folder`` but its ``result.json`` and marker."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in _NOT_IN_MANIFEST:
            info = path.stat()
            found[name] = [info.st_size, info.st_mtime_ns, file_digest(path)]
    return found


def manifest_problems(folder: Path, recorded: dict[str, list]) -> list[str]:
    """What differs between ``folder`` and its recorded manifest: missing files and files with other bytes
    (a file whose size and modification time match the record is taken as unchanged; another is hashed)."""
    problems = []
    for name, (size, mtime_ns, sha256) in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        info = path.stat()
        if info.st_size != size:
            problems.append(f"{name} has {info.st_size} bytes, not {size}")
        elif info.st_mtime_ns != mtime_ns and file_digest(path) != sha256:
            problems.append(f"{name} has other bytes than the stage wrote")
    return problems


def _outputs_exist(ws: Workspace, result: StageResult) -> bool:
    missing = [p for p in result.outputs.values() if not (ws.root / p).exists()]
    if missing:
        log.info("stage %s: outputs %s are missing; running it again", result.stage, missing)
        return False
    recorded = result.info.get(MANIFEST)
    if recorded is None:
        log.info("stage %s: its result has no manifest of its files (an older run); running it again", result.stage)
        return False
    problems = manifest_problems(ws.artifacts / result.stage, recorded)
    if problems:
        log.warning("stage %s: its outputs changed since it completed (%s); running it again", result.stage,
                    "; ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))
    return not problems


def completed(ws: Workspace, stage: str, fp: str, valid: Callable[[], bool] | None = None) -> StageResult | None:
    """The stored result of ``stage`` when it completed with fingerprint ``fp`` and its outputs exist.

    Args:
        valid: a further check of the outputs (e.g. the data files against their recorded hashes).
    """
    if not fp or stage in NEVER_SKIPPED or recorded_fingerprint(ws, stage) != fp:
        return None
    if valid is not None and not valid():
        log.info("stage %s: its outputs changed since it ran; running it again", stage)
        return None
    result = StageResult.load(ws, stage)
    return result if _outputs_exist(ws, result) else None


def versions_dir(ws: Workspace, stage: str) -> Path:
    """``artifacts/.stages/<stage>``: the kept versions of a stage's outputs."""
    return ws.artifacts / ".stages" / stage


def _link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of the folder ``source`` made of hard links (copies where links fail)."""
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


def check_stage(stage: str, fp: str) -> None:
    """Refuse a stage name that is not a row of the stage table, or a fingerprint that is not 64 hex digits (names
    that come from a flow parameter or the object store become folder names here).

    Raises:
        StoreIntegrityError: naming the bad value.
    """
    from flows.incremental.object_store import StoreIntegrityError, check_stage_key
    from flows.definition.stage_table import BY_NAME

    if stage not in BY_NAME:
        raise StoreIntegrityError(f"stage {stage!r} is not a stage of the pipeline: one of {sorted(BY_NAME)}")
    check_stage_key(stage, fp)


def keep(ws: Workspace, stage: str, fp: str) -> None:
    """Keep the outputs of ``stage`` (completed with fingerprint ``fp``) as a past version; drop the oldest."""
    if stage in NOT_KEPT or not fp:
        return
    check_stage(stage, fp)
    versions = versions_dir(ws, stage)
    target = versions / fp[:32]
    for left in versions.glob(".*.partial-*") if versions.is_dir() else []:  # left by a run killed while keeping
        shutil.rmtree(left, ignore_errors=True)
    partial = versions / f".{fp[:32]}.partial-{os.getpid()}"
    _link_tree(ws.artifacts / stage, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    fsync_folder(versions)
    old = sorted((p for p in versions.iterdir() if p.is_dir() and not p.name.startswith(".")),
                 key=lambda p: p.stat().st_mtime, reverse=True)
    for path in old[KEPT_VERSIONS:]:
        shutil.rmtree(path, ignore_errors=True)


def fetch(ws: Workspace, stage: str, fp: str, store: ObjectStore | None) -> bool:
    """Bring the version of ``stage`` with fingerprint ``fp`` from ``store`` into the kept versions; whether it is there now."""
    if stage in NOT_KEPT or not fp:
        return False
    check_stage(stage, fp)
    source = versions_dir(ws, stage) / fp[:32]
    if (source / "result.json").is_file():
        return True
    if store is None:
        return False
    partial = versions_dir(ws, stage) / f".{fp[:32]}.fetching-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if not store.pull_stage(stage, fp, partial):
            return False
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(source, ignore_errors=True)
    partial.rename(source)
    fsync_folder(source.parent)
    log.info("stage %s: fetched the outputs of fingerprint %s from %s", stage, fp[:12], store.url)
    return True


def restore(ws: Workspace, stage: str, fp: str, store: ObjectStore | None = None) -> StageResult | None:
    """Link the kept version of ``stage`` with fingerprint ``fp`` (fetched from ``store`` when only it has it) back
    into ``artifacts/<stage>``; its result."""
    if not fp or stage in NOT_KEPT:
        return None
    check_stage(stage, fp)
    source = versions_dir(ws, stage) / fp[:32]
    if not fetch(ws, stage, fp, store):
        return None
    current = ws.artifacts / stage
    shutil.rmtree(current, ignore_errors=True)
    _link_tree(source, current)
    fsync_folder(current)
    fsync_folder(ws.artifacts)
    now = time.time()
    os.utime(source, (now, now))  # most recently used
    result = StageResult.load(ws, stage)
    if result.info.get("fingerprint") != fp or not _outputs_exist(ws, result):
        return None
    log.info("stage %s: restored the outputs of fingerprint %s", stage, fp[:12])
    return result


def collect(stage: str, settings: PipelineSettings, ws: Workspace) -> StageResult:
    """The result of ``stage``, which another flow run completed (the GPU stages): in place when it ran in this
    workspace, else fetched from the object store (it ran on another machine).

    Raises:
        RuntimeError: neither this workspace nor the store holds it with the fingerprint of its inputs here.
    """
    store, found = store_of(settings), None
    fp = fingerprint(stage, settings, ws)
    # the stage ran where the GPU stages run: its fingerprint names that machine's device type, maybe not this one's
    devices = [device_type(settings)] + [d for d in DEVICE_TYPES if d != device_type(settings)]
    for device in devices if "attribution.device" in stage_table.row(stage).params else [None]:
        fp = fingerprint(stage, settings, ws, device=device)
        found = completed(ws, stage, fp) or restore(ws, stage, fp, store)
        if found is not None:
            break
    if found is None:
        where = f"nor in the object store {store.url}" if store is not None else "and cluster.store is empty"
        raise RuntimeError(f"stage {stage} (fingerprint {fp[:12]}) completed in another flow run, but is neither in "
                           f"{ws.root} {where}: did that run see the same inputs?")
    return found


def would_run(stage: str, settings: PipelineSettings, ws: Workspace) -> bool:
    """Whether :func:`run_or_skip` would run ``stage``: its outputs are neither current nor kept."""
    fp = fingerprint(stage, settings, ws)
    kept = versions_dir(ws, stage) / fp[:32] / "result.json"
    if completed(ws, stage, fp) is not None or (fp and kept.is_file()):
        return False
    store = store_of(settings)
    return not (store is not None and stage not in NOT_KEPT and store.has_stage(stage, fp))


def run_or_skip(
    stage: str,
    run: Callable[[], StageResult],
    settings: PipelineSettings,
    ws: Workspace,
    force: bool = False,
    valid: Callable[[], bool] | None = None,
    guard: Callable[[], None] | None = None,
) -> tuple[StageResult, str]:
    """Run ``stage`` unless a completed run with the same inputs is on disk or kept.

    Args:
        stage: the stage's name.
        run: runs the stage and returns its result (which it saves).
        settings: the run's settings.
        ws: the workspace.
        force: run even when the inputs are unchanged.
        valid: a further check that the stored outputs are still those the stage wrote.
        guard: called before the outputs of a run are moved into place; raises to keep them out (the run that
            started this one has ended, say).

    Returns:
        ``(result, how)`` with ``how`` one of ``"ran"``, ``"skipped"`` (outputs in place) and
        ``"restored"`` (a kept version linked back); a run's result is saved with its fingerprint.
    """
    fp = fingerprint(stage, settings, ws)
    store = store_of(settings)
    if not force:
        done = completed(ws, stage, fp, valid)
        if done is not None:
            if stage not in NOT_KEPT and not (versions_dir(ws, stage) / fp[:32] / "result.json").is_file():
                keep(ws, stage, fp)  # a run killed while keeping it: keep it now (and clear what that run left)
            _push(store, ws, stage, fp, done)
            return done, "skipped"
        kept = restore(ws, stage, fp, store) if valid is None else None
        if kept is not None:
            return kept, "restored"
    inputs = fingerprint_inputs(stage, settings, ws)
    staging = _start(ws, stage, fp)
    with ws.writing(stage):
        result = run()
    if guard is not None:
        guard()  # e.g. the GPU stages' parent still holds the workspace
    after = fingerprint_inputs(stage, settings, ws)
    if after != inputs:  # an input changed under the stage (a concurrent writer): its outputs belong to neither
        raise RuntimeError(f"stage {stage}: its inputs changed while it ran ({', '.join(_changed(inputs, after)[:8])}); "
                           "its outputs were not saved: run it again")
    result = _move_into_place(ws, stage, staging, result)
    result.info["fingerprint"] = fp
    result.info[MANIFEST] = manifest(ws.artifacts / stage)
    result.save(ws)
    keep(ws, stage, fp)
    _push(store, ws, stage, fp, result)
    return result, "ran"


def begin(stage: str, settings: PipelineSettings, ws: Workspace) -> Path:
    """Open ``stage``'s staging folder for the fingerprint of its inputs before the stage runs (work done there
    ahead of it, e.g. its shards on a cluster: :mod:`flows.cluster.shards`); the stage's own run resumes in it."""
    return _start(ws, stage, fingerprint(stage, settings, ws))


def _push(store: ObjectStore | None, ws: Workspace, stage: str, fp: str, result: StageResult) -> None:
    """Send a completed stage to the object store, unless it is there already (or is never kept)."""
    if store is None or stage in NOT_KEPT or not fp or store.has_stage(stage, fp):
        return
    count = store.push_stage(stage, fp, ws.artifacts / stage, result.info[MANIFEST])
    log.info("stage %s: sent %d files of fingerprint %s to %s", stage, count, fp[:12], store.url)


def _start(ws: Workspace, stage: str, fp: str) -> Path:
    """Prepare the staging folder ``artifacts/.staging/<stage>`` for a run with fingerprint ``fp``: resume the
    killed run of the same fingerprint, else start from an empty folder. ``artifacts/<stage>`` is not touched:
    it keeps the outputs of the last completed run until this one completes."""
    from influence.storage import atomic_write

    folder = ws.staging_dir(stage)
    marker = folder / RUNNING
    # a stage that is never skipped (the report: its own MLflow run each time) starts afresh, never from a killed run's files
    resuming = bool(fp) and stage not in NEVER_SKIPPED and marker.is_file() and marker.read_text() == fp
    if not resuming and folder.is_dir():
        shutil.rmtree(folder)
    for old in ws.artifacts.glob(f".{stage}.replaced-*"):  # left by a run killed while moving its outputs
        shutil.rmtree(old, ignore_errors=True)
    atomic_write(marker, fp)
    return folder


def _move_into_place(ws: Workspace, stage: str, staging: Path, result: StageResult) -> StageResult:
    """Replace ``artifacts/<stage>`` by the completed staging folder (two renames); the result's paths follow.

    A run killed in between leaves no ``result.json`` in ``artifacts/<stage>``, so it is never taken for completed.
    """
    final = ws.artifacts / stage
    (staging / "result.json").unlink(missing_ok=True)  # the stage's own save; the completed one is written below
    moved = json.loads(json.dumps({"outputs": result.outputs, "info": result.info})
                       .replace(json.dumps(str(staging))[1:-1], json.dumps(str(final))[1:-1])
                       .replace(json.dumps(str(staging.relative_to(ws.root)))[1:-1], json.dumps(str(final.relative_to(ws.root)))[1:-1]))
    result.outputs, result.info = moved["outputs"], moved["info"]
    replaced = ws.artifacts / f".{stage}.replaced-{os.getpid()}"
    if final.exists():
        final.rename(replaced)  # its files live on in the kept versions (hard links)
    staging.rename(final)
    fsync_folder(ws.artifacts)
    fsync_folder(staging.parent)
    (final / RUNNING).unlink(missing_ok=True)
    shutil.rmtree(replaced, ignore_errors=True)
    return result


__all__ = ["begin", "check_stage", "collect", "completed", "device_type", "environment", "fetch", "fingerprint", "keep", "recorded_fingerprint", "restore", "run_or_skip", "stage_code", "would_run"]
