"""The Prefect flow ``pipeline``: every stage, in order, and its report in MLflow.

The stages, their order, their pools and their retrainings come from the stage table
(:mod:`flows.definition.stage_table`); each runs as a task (:mod:`flows.tasks`), skipped when its inputs did
not change. At the end the flow records every stage in ``dvc.lock`` (:func:`flows.versioning.dvc.record_stages`),
so ``dvc status`` agrees with what ran.

The retrainings of the evidence stages (case deletion, LDS) are independent: a ``retrainings`` subflow runs
them as parallel tasks (``evaluation.workers`` threads, or a Dask cluster: ``cluster``), one per group of
retrainings trained together (``evaluation.retrain_group``), each group saved as it finishes, before the stage
itself reads them back (``dvc repro`` runs the same stage functions, which do the groups one after another).

The GPU stages form the ``attribution`` flow (:mod:`flows.attribution`). With ``gpu_deployment`` set (the
deployments of ``prefect.yaml`` set it) the pipeline runs it as that deployment, on the ``gpu`` work pool;
otherwise in its own process. With no ``PREFECT_API_URL`` the flows run on Prefect's temporary local server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run

from flows.attribution import attribution
from flows.cluster import runners
from flows.cluster.worker_workspace import GPU_INPUTS, hand_over, input_fingerprints, receive_records
from flows.definition.settings import PARAMS_FILE, PipelineSettings, load_profile, load_settings, validate_settings, with_overrides
from flows.definition.stage_table import GPU_STAGES, NAMES, RETRAINING_STAGES
from flows.definition import stage_table
from flows.experiment.workspace import Workspace
from flows.guards import waits
from flows.guards.run_form import check_gpu_deployment, check_reach, project_root
from flows.guards.workspace_lock import Hold, hold_workspace
from flows.incremental import stage_cache
from flows.tasks import (IO_RETRIES, _run, checkout_data_task, collect_task, open_run_task, plan_task, publish_task,
                         record_task, report_task, retrain_task, stage_task, version_data_task)
from flows.versioning.data_version import dataset_hashes
from flows.versioning.dvc import resolve_revision

CPU_STAGES = tuple(n for n in NAMES if n not in GPU_STAGES and n not in ("data", "report"))


@flow(name="retrainings", flow_run_name="{stage}-retrainings")
def retrainings(stage: str, settings: PipelineSettings, project_dir: str) -> int:
    """Every retraining of the ``deletion``, ``pretrain_deletion`` or ``lds`` stage, as parallel tasks: one per group
    of retrainings trained together (``evaluation.retrain_group``; each group saved as it finishes).

    Run with the task runner of ``cluster`` (:mod:`flows.cluster.runners`): a thread pool of ``evaluation.workers``, or a
    Dask cluster; each group gets its share of the machine's cores as torch intra-op threads (set in the thread
    that trains). Returns how many retrainings the stage has.
    """
    root = Path(project_dir)
    grouped, runs = plan_task(stage, settings, root)
    threads = runners.choose(settings).num_threads
    inputs = input_fingerprints(Workspace(root))
    futures = retrain_task.map(unmapped(stage), unmapped(settings), unmapped(root), grouped, unmapped(threads), unmapped(runs),
                               unmapped(inputs))
    progress = create_progress_artifact(0.0, description=f"retraining groups of {stage} done (of {len(futures)})")
    for done, future in enumerate(futures, start=1):
        future.result()
        update_progress_artifact(progress, 100.0 * done / max(1, len(futures)))
    receive_records(settings, runs, [r for group in grouped for r in group])  # those made on other machines
    return sum(len(group) for group in grouped)


def _skipped_in(flow_run_id, timeout: float = 60.0) -> list[str]:
    """The GPU stages of a (deployment's) flow run that ended ``Skipped``.

    Task-run states reach the API as events, recorded a moment after the flow run ends: wait until
    every GPU stage's final state is there.
    """
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    began = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            final = {r.name: r.state.name for r in runs if r.state and r.state.is_final() and r.name in GPU_STAGES}
            if len(final) == len(GPU_STAGES):
                return [stage for stage in GPU_STAGES if final.get(stage) == "Skipped"]
            if time.monotonic() - began > timeout:
                get_run_logger().warning(
                    "the final states of the GPU stages %s did not reach the Prefect API within %.0f s: the report's "
                    "stages_skipped may miss some of them", sorted(set(GPU_STAGES) - set(final)), timeout)
                return [stage for stage in GPU_STAGES if final.get(stage) == "Skipped"]
            time.sleep(0.5)


@flow(name="pipeline", log_prints=True)
def pipeline(
    settings: PipelineSettings | None = None,
    project_dir: str = ".",
    data_rev: str = "",
    gpu_deployment: str = "",
    force: bool = False,
    profile: str = "",
    overrides: dict[str, Any] | None = None,
) -> dict[str, object]:
    """Run the whole attribution pipeline and leave its report in MLflow.

    Args:
        settings: every setting (the sections of ``params.yaml``); when omitted, read from
            ``<project_dir>/params.yaml`` when the run starts.
        project_dir: the project folder (a git + DVC repository) whose workspace the stages use.
        data_rev: the data version: a git revision or tag whose DVC-tracked data the run reads;
            empty for the data the workspace builds (the data stage, then ``dvc commit`` and ``dvc push``).
        gpu_deployment: run the GPU stages as this deployment (e.g. ``attribution/gpu``, on the
            ``gpu`` work pool); empty to run them in this flow run's process.
        force: re-run every stage, even those whose inputs are unchanged since their last run.
        profile: the name of a file of ``<project_dir>/profiles/`` (without ``.yaml``) whose settings are put
            over ``settings`` first, as ``--profile`` does on the command line (e.g. ``minilm-cpu``,
            ``multistage-converged``); empty for none.
        overrides: settings put over ``settings`` (or ``params.yaml``), nested by section, e.g.
            ``{"evaluation": {"lds": true}}`` (the nightly deployment turns the LDS stage on so).

    Returns:
        ``{"mlflow_run_id": ..., "report": path, "skipped": [stages]}``.
    """
    root = project_root(project_dir)
    check_gpu_deployment(gpu_deployment)
    settings = validate_settings(settings, "flow parameter 'settings'") if settings is not None else load_settings(root / PARAMS_FILE)
    if profile:
        settings = load_profile(settings, profile, root)
    settings = with_overrides(settings, overrides, "flow parameter 'overrides'")
    check_reach(settings, root)
    logger = get_run_logger()
    with hold_workspace(root, str(flow_run.get_name() or "pipeline"), say=logger.info,
                        flow_run_id=str(flow_run.get_id() or "")) as hold:
        # the MLflow run opens now: a run that crashes is there too, marked FAILED
        name = str(flow_run.get_name() or "pipeline")
        run_id = open_run_task(settings, root, {"prefect_flow_run_id": str(flow_run.get_id() or ""), "run_name": name}, name)
        try:
            return _stages(settings, root, data_rev, gpu_deployment, force, hold, run_id)
        except BaseException:
            from flows.reporting.mlflow_runs import fail_pipeline_run

            try:
                fail_pipeline_run(settings, root, run_id)
            except Exception as error:  # noqa: BLE001 - the flow's own error is the one to see
                logger.warning("could not mark MLflow run %s FAILED: %s", run_id, error)
            raise


def _gpu_child(gpu_deployment: str, settings: PipelineSettings, root: Path, force: bool, hold: Hold) -> Any:
    """Run the GPU stages as the deployment ``gpu_deployment`` and wait for it: the child is admitted to this run's
    hold of the workspace while it runs, handed the fingerprints of what it reads through the object store (when
    one is set), and cancelled when this run stops waiting for it, however that happens (an error, a stop signal,
    the time limit). Returns the child's flow run, ended."""
    import time

    from prefect import get_client
    from prefect.deployments import run_deployment

    parent = str(flow_run.get_id() or "")
    if settings.cluster.store:  # a worker on another machine fetches what the GPU stages read: say which versions
        hand_over(settings, parent, input_fingerprints(Workspace(root), GPU_INPUTS))
    limit = waits.seconds(waits.GPU_STAGES_ENV, waits.GPU_STAGES_SECONDS)
    began = time.monotonic()
    child = run_deployment(
        gpu_deployment, timeout=0, flow_run_name=f"{flow_run.get_name() or 'pipeline'}-gpu-stages",
        # the deployment's own folder: this project folder on this machine, its clone on another one
        parameters={"settings": settings.model_dump(mode="json"), "project_dir": ".", "force": force, "on_gpu_pool": True},
    )
    hold.admit(str(child.id))
    ended = False
    try:
        with get_client(sync_client=True) as client:
            while True:
                child = client.read_flow_run(child.id)
                if child.state is not None and child.state.is_final():
                    ended = True
                    return child
                if time.monotonic() - began > limit:
                    raise TimeoutError(
                        f"the GPU stages ({gpu_deployment}, flow run {child.name}) did not end within {limit:.0f} s (state "
                        f"{child.state.name if child.state else 'unknown'}; cancelled): is a worker of its pool running "
                        f"(`scripts/servers status`)? ${waits.GPU_STAGES_ENV} sets the limit")
                time.sleep(2)
    finally:
        if not ended:
            waits.cancel_flow_run(child.id)
        hold.dismiss()


def _stages(settings: PipelineSettings, root: Path, data_rev: str, gpu_deployment: str, force: bool, hold: Hold,
            mlflow_run_id: str) -> dict[str, object]:
    """The body of :func:`pipeline`, run while it holds the workspace (``hold``: its hold, which the GPU stages run
    under); ``mlflow_run_id``: the MLflow run it opened, which the report logs into."""
    logger = get_run_logger()
    skipped: list[str] = []
    if data_rev:
        resolve_revision(root, data_rev)  # a bad revision stops the run before any work
        hashes = checkout_data_task(root, data_rev)
    else:
        data_state = stage_task.with_options(name="data", **IO_RETRIES)("data", settings, root, force, return_state=True)
        data_state.result()
        if data_state.name == "Skipped":
            skipped.append("data")
            hashes = dataset_hashes(root)
        else:
            hashes = version_data_task(settings, root)
    logger.info("data version %s: %s", data_rev or "workspace", hashes)
    for stage in CPU_STAGES[:CPU_STAGES.index("finetune") + 1]:  # everything before the GPU stages
        _run(stage, settings, root, force, skipped)
    if gpu_deployment:
        child = _gpu_child(gpu_deployment, settings, root, force, hold)
        if not child.state.is_completed():
            raise RuntimeError(f"the GPU stages ({gpu_deployment}, flow run {child.name}) ended {child.state.name}: see that flow run's logs")
        skipped += _skipped_in(child.id)
        for stage in GPU_STAGES:  # in place when the child ran here; fetched from the object store when elsewhere
            collect_task(stage, settings, root)
    else:
        skipped += attribution(settings, str(root), force)
    ws = Workspace(root)
    for stage in CPU_STAGES[CPU_STAGES.index("finetune") + 1:]:
        if stage in RETRAINING_STAGES and stage_table.row(stage).is_enabled(settings) and (force or stage_cache.would_run(stage, settings, ws)):
            retrainings.with_options(task_runner=runners.task_runner(runners.choose(settings)))(stage, settings, str(root))
        _run(stage, settings, root, force, skipped)  # reads the retrainings back, or is skipped
    tags = {"prefect_flow_run_id": str(flow_run.get_id() or ""), "run_name": str(flow_run.get_name() or "pipeline"),
            "stages_skipped": ",".join(skipped) or "none"}
    final = report_task(settings, root, tags, mlflow_run_id)
    record_task(settings, root, [n for n in NAMES if n != "data"])  # data: recorded (and pushed) when it ran
    publish_task(settings, root, final, skipped)
    logger.info("report logged to MLflow run %s (%s); stages skipped: %s", final.info["mlflow_run_id"], final.info["mlflow_url"], skipped or "none")
    return {"mlflow_run_id": final.info["mlflow_run_id"], "report": final.outputs["report"], "skipped": skipped}


__all__ = ["pipeline", "retrainings"]
