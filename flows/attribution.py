"""The Prefect flow ``attribution``: the GPU stages (gradient caches, inverse-Hessian solves, scores).

Started by the pipeline as a subflow in its process, or as the deployment ``attribution/gpu`` on the ``gpu``
work pool (another process, maybe another machine). With ``cluster.runner: dask``, a ``shards`` subflow first
computes the shards of a stage's gradient caches and index rows as tasks on the Dask cluster
(:mod:`flows.cluster.shards`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from flows.cluster import runners
from flows.cluster import shards
from flows.cluster.worker_workspace import GPU_INPUTS, fetch_into, handed_over, input_fingerprints
from flows.definition.settings import PARAMS_FILE, PipelineSettings, load_settings, validate_settings
from flows.definition.stage_table import GPU_STAGES
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import Workspace
from flows.guards.run_form import check_reach, project_root
from flows.guards.workspace_lock import hold_workspace
from flows.incremental import stage_cache
from flows.tasks import _PARENT_HOLD, _run


@task(task_run_name="begin-{stage}")
def begin_shards_task(stage: str, settings: PipelineSettings, root: Path) -> str:
    return str(shards.begin(stage, settings, root))


@task(task_run_name="prepare-{stage}-{target}")
def prepare_shards_task(stage: str, settings: PipelineSettings, root: Path, target: str) -> dict[str, Any]:
    return shards.prepare(stage, settings, root, target)


@task(task_run_name="shard-{stage}-{target}-{shard}")
def shard_task(stage: str, settings: PipelineSettings, root: Path, target: str, shard: int, inputs: dict[str, str],
               state: dict[str, str], num_threads: int | None) -> dict[str, Any]:
    return shards.compute(stage, settings, root, target, shard, inputs, state, num_threads)


@task(task_run_name="receive-{stage}-{target}")
def receive_shards_task(stage: str, settings: PipelineSettings, root: Path, target: str, results: list[dict]) -> int:
    return shards.receive(stage, settings, root, target, results)


@flow(name="shards", flow_run_name="{stage}-shards")
def shards_flow(stage: str, settings: PipelineSettings, project_dir: str) -> int:
    """The shards of ``stage``'s gradient caches or index rows as parallel tasks on the Dask cluster of ``cluster``
    (:mod:`flows.cluster.shards`), before the stage itself runs and finds them in place. Returns how many were computed."""
    root = Path(project_dir)
    begin_shards_task(stage, settings, root)
    threads = runners.choose(settings).num_threads
    inputs = input_fingerprints(Workspace(root), GPU_INPUTS)
    done = 0
    for target in shards.targets(stage, settings):
        plan = prepare_shards_task(stage, settings, root, target)
        futures = shard_task.map(unmapped(stage), unmapped(settings), unmapped(root), unmapped(target), plan["missing"],
                                 unmapped(inputs), unmapped(plan["state"]), unmapped(threads))
        done += receive_shards_task(stage, settings, root, target, [future.result() for future in futures])
    return done


@flow(name="attribution", log_prints=True)
def attribution(
    settings: PipelineSettings | None = None,
    project_dir: str = ".",
    force: bool = False,
    on_gpu_pool: bool = False,
) -> list[str]:
    """The GPU stages: cache per-example gradients, solve, and score (influence, multi-stage, TracIn-WE).

    Started by the pipeline (a subflow in its process, or its deployment ``attribution/gpu`` on the ``gpu``
    pool) it runs under the pipeline's hold of the workspace (:mod:`flows.guards.workspace_lock`: the parent is found
    through the Prefect API, never a parameter) and, on another machine, fetches the stages it reads from the
    object store as the pipeline hands them over there (signed, :mod:`flows.incremental.object_store`); started on its own,
    it takes the workspace itself.

    Args:
        settings: every setting; when omitted, read from ``<project_dir>/params.yaml``.
        project_dir: the project folder whose workspace holds the finetuned models.
        force: re-run stages whose inputs are unchanged.
        on_gpu_pool: set by the ``gpu`` deployment: warn when this worker has no CUDA device.

    Returns:
        the stages that were skipped because their inputs were unchanged.
    """
    import torch

    root = project_root(project_dir)
    settings = validate_settings(settings, "flow parameter 'settings'") if settings is not None else load_settings(root / PARAMS_FILE)
    check_reach(settings, root)
    logger = get_run_logger()
    if on_gpu_pool and not torch.cuda.is_available():
        logger.warning("this gpu worker has no CUDA device: the GPU stages fall back to the CPU")
    logger.info("GPU stages on device %s", Experiment(settings, Workspace(root)).device)
    skipped: list[str] = []
    own, parent = str(flow_run.get_id() or ""), _parent_flow_run_id()
    with hold_workspace(root, str(flow_run.get_name() or "attribution"), say=logger.info, flow_run_id=own,
                        parent_flow_run_id=parent) as hold:
        inputs = handed_over(settings, parent) if parent else {}
        fetched = fetch_into(settings, Workspace(root), inputs)
        if fetched:
            logger.info("fetched %s from the object store %s", fetched, settings.cluster.store)
        reset = _PARENT_HOLD.set(hold if hold.parent_flow_run_id else None)
        try:
            progress = create_progress_artifact(0.0, description=f"GPU stages done (of {len(GPU_STAGES)})")
            for done, stage in enumerate(GPU_STAGES, start=1):
                if (settings.cluster.runner == "dask" and shards.targets(stage, settings)
                        and (force or stage_cache.would_run(stage, settings, Workspace(root)))):
                    hold.check(f"before the shards of stage {stage}")
                    shards_flow.with_options(task_runner=runners.task_runner(runners.choose(settings)))(stage, settings, str(root))
                _run(stage, settings, root, force, skipped)
                update_progress_artifact(progress, 100.0 * done / len(GPU_STAGES))
        finally:
            _PARENT_HOLD.reset(reset)
    return skipped


def _parent_flow_run_id() -> str:
    """The id of the flow run that started this one as a deployment (``run_deployment`` links it as a subflow), from
    the Prefect API; ``""`` for a run started on its own or called in the parent's process."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run.parent_task_run_id is None:
        return ""
    return str(flow_run.get_parent_flow_run_id() or "")


__all__ = ["attribution", "shards_flow"]
