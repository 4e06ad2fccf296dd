"""The parallel parts of the GPU stages, as tasks on a Dask cluster: the shards of the ``gradients`` stage's
per-example gradient caches, and the training rows of the attribution indexes of ``influence`` (with
``attribution.solver`` exact, arnoldi or ekfac) and of ``multistage`` (its pretraining index, with
``attribution.pretrain_solver`` arnoldi or ekfac).

With ``cluster.runner: dask`` the attribution flow runs a ``shards`` subflow before each of these stages
(prefect-dask's task runner, as for the retrainings; :mod:`flows.pipeline`):

1. :func:`begin` opens the stage's staging folder for the fingerprint of its inputs, as the stage's own run would;
2. :func:`prepare`, in the flow's process, opens each gradient cache or fits each index's solver there (the one
   serial part: its state saved in the index folder) and lists the missing shards; with an object store it sends
   an index's manifest and solver state there, by content;
3. :func:`compute`, one task per shard on the cluster: the shard from the flow's folder when its machine sees it,
   else from a workspace fetched from the object store by the fingerprints of the stages it reads
   (:mod:`flows.cluster.worker_workspace`), with the index's state fetched by its sha256; the shard goes to the store
   (by content) and the task returns its sha256, or (no store) the task returns its bytes;
4. :func:`receive`, in the flow's process, stores each shard in the staging folder, its bytes checked.

The stage itself then runs as always, finds every shard in place (the caches and indexes resume), and completes:
``dvc repro`` and the default runner compute the same shards in one process. A shard is the same computation on
the same examples in the same batches wherever it runs, so the caches and indexes are the same files (EK-FAC
over ``nn.Linear`` layers excepted: a fresh fit in one process takes each row from the layers' inputs and output
gradients, a shard elsewhere from the flat gradient, which agree to rounding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.incremental import stage_cache
from flows.experiment import recipes as training
from flows.experiment.experiment import Experiment
from flows.cluster.worker_workspace import work_dir, workspace_for
from flows.incremental.object_store import store_of
from flows.experiment.workspace import Workspace

SHARDED_STAGES = ("gradients", "influence", "multistage")
SHARD_KEY = "shard"


def targets(stage: str, settings: Any) -> list[str]:
    """The sharded outputs of ``stage`` under ``settings``: modes (``gradients``; ``influence`` with a solver that
    keeps its state) or ``"pretrain_index"`` (``multistage`` with such a pretraining solver); none for other stages."""
    from influence.index import STATEFUL_SOLVERS

    a, modes = settings.attribution, list(settings.finetune.modes)
    return {"gradients": modes, "influence": modes if a.solver in STATEFUL_SOLVERS else [],
            "multistage": ["pretrain_index"] if a.pretrain_solver in STATEFUL_SOLVERS else []}.get(stage, [])


def relative(stage: str, target: str) -> str:
    """The folder of ``target`` inside its stage's folder."""
    return {"gradients": target, "influence": f"{target}/index", "multistage": "pretrain_index"}[stage]


def _arguments(x: Experiment, target: str) -> dict:
    from flows.stages.gradients import gradient_cache_arguments
    from flows.stages.influence_function import influence_index_arguments
    from flows.stages.multistage import pretrain_index_arguments

    if x.stage == "gradients":
        return gradient_cache_arguments(x, target)
    return influence_index_arguments(x, target) if x.stage == "influence" else pretrain_index_arguments(x)


def begin(stage: str, settings: Any, root: Path) -> Path:
    """Open ``stage``'s staging folder for the fingerprint of its inputs (its own run then resumes there)."""
    return stage_cache.begin(stage, settings, Workspace(root))


def _writer(x: Experiment, target: str) -> tuple[Any, list[int]]:
    """The opened cache, or the index with its fitted solver, in the stage's (staging) folder; its missing shards."""
    from influence.gradients.cache import GradientCache
    from influence.index import AttributionIndex

    folder = x.out_dir(relative(x.stage, target))
    if x.stage == "gradients":
        cache = GradientCache(folder)
        return cache, training.resume_or_replace(cache.open, **_arguments(x, target))
    index = training.resume_or_replace(AttributionIndex.fit, directory=folder, shards=False, **_arguments(x, target))
    return index, index.missing_shards()


def prepare(stage: str, settings: Any, root: Path, target: str) -> dict[str, Any]:
    """Open the cache or fit the index's solver of ``target`` in the staging folder (:func:`begin` first).

    Returns:
        ``{"missing": [shard numbers], "state": {file: sha256}}``: an index's manifest and solver state, sent to
        the object store for the tasks of other machines (empty for a cache, or with no store).
    """
    ws = Workspace(root)
    with ws.writing(stage):
        x = Experiment.for_stage(stage, settings, ws)
        _, missing = _writer(x, target)
        folder = x.out_dir(relative(stage, target))
    store, state = store_of(settings), {}
    if store is not None and stage != "gradients" and missing:
        state = {path.name: store.put_object(path) for path in sorted(folder.iterdir())
                 if path.is_file() and not path.name.startswith(("shard_", "."))}  # its manifest and fitted solver
    return {"missing": missing, "state": state}


def _index_folder(settings: Any, stage: str, target: str, root: Path, ws: Workspace, state: dict[str, str]) -> Path:
    """The fitted, incomplete index the shard reads: in the flow's staging folder, else fetched by its sha256s."""
    if ws.root == Path(root):
        return ws.staging_dir(stage) / relative(stage, target)
    store = store_of(settings)
    if store is None or not state:
        raise RuntimeError(f"the index of {stage}/{target} is in {root}, which this machine does not see, and no "
                           "object store holds its state: set cluster.store")
    folder = work_dir() / "index-states" / state["manifest.json"][:16]
    for name, sha256 in state.items():
        if not (folder / name).is_file():
            store.get_object(sha256, folder / name)
    return folder


def compute(stage: str, settings: Any, root: Path, target: str, shard: int, inputs: dict[str, str],
            state: dict[str, str], num_threads: int | None = None) -> dict[str, Any]:
    """Shard ``shard`` of ``target``, on whichever machine runs it (see the module docstring).

    Args:
        inputs: ``{stage: fingerprint}`` of the stages it reads (fetched from the object store elsewhere).
        state: what :func:`prepare` sent of an index (``{file: sha256}``).
        num_threads: torch intra-op threads of this task (``None``: the process's).

    Returns:
        ``{"shard": n, "sha256": ...}`` (sent to the object store) or ``{"shard": n, "bytes": safetensors bytes}``.
    """
    import torch
    from safetensors.torch import save

    from influence.gradients.cache import gradient_shard
    from influence.index import AttributionIndex

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    ws = workspace_for(settings, root, inputs)
    x = Experiment.for_stage(stage, settings, ws)
    arguments = _arguments(x, target)
    if stage == "gradients":
        rows = gradient_shard(index=shard, **arguments)
    else:
        index = AttributionIndex.load(_index_folder(settings, stage, target, root, ws, state), complete=False, device=x.device)
        rows = index.representation_shard(arguments["task"], arguments["model"], arguments["train_data"], shard,
                                          device=arguments["device"])
    payload = save({SHARD_KEY: rows})
    store = store_of(settings)
    if store is None:
        return {"shard": shard, "bytes": payload}
    return {"shard": shard, "sha256": store.put_object_bytes(payload)}


def receive(stage: str, settings: Any, root: Path, target: str, results: list[dict[str, Any]]) -> int:
    """Store the shards the tasks computed (:func:`compute`) in the staging folder's cache or index; how many."""
    from safetensors.torch import load

    ws, store = Workspace(root), store_of(settings)
    with ws.writing(stage):
        writer, missing = _writer(Experiment.for_stage(stage, settings, ws), target)
        for result in sorted(results, key=lambda r: r["shard"]):
            if result["shard"] not in missing:
                continue
            if "bytes" in result:
                payload = result["bytes"]
            elif store is None:
                raise RuntimeError(f"shard {result['shard']} of {stage}/{target} went to an object store, but cluster.store is empty")
            else:
                payload = store.get_object_bytes(result["sha256"])  # its sha256 checked
            rows = load(payload)[SHARD_KEY]
            (writer.put_shard if stage == "gradients" else writer.store.put_shard)(result["shard"], rows)
    return len(results)


__all__ = ["SHARDED_STAGES", "begin", "compute", "prepare", "receive", "relative", "targets"]
