"""The Prefect flows: ``pipeline`` (every stage, in order) and ``attribution`` (the GPU stages).

The stages, their order, their pools and their retrainings come from the stage table
(:mod:`flows.stage_table`). Each stage is one task over its entry point (the same functions
``dvc repro`` runs); tasks return :class:`~flows.workspace.StageResult` (paths and numbers, never
tensors). A stage whose inputs (its settings, its code, its data, the stages it reads) match its
last completed run in the workspace, or a kept earlier version, is skipped: its task ends in a
Completed state named ``Skipped`` (:mod:`flows.stage_cache`). Only the I/O tasks retry, with
back-off (obtaining the data, DVC, MLflow); DVC commands hold a concurrency slot of their
workspace, so two runs at once never run DVC on one workspace together. At the end the flow
records every stage in ``dvc.lock`` (:func:`flows.dvc_file.record_stages`), so ``dvc status``
agrees with what ran.

The retrainings of the evidence stages (case deletion, LDS) are independent: a ``retrainings``
subflow runs them as parallel tasks (``evaluation.workers`` threads, or a Dask cluster: ``cluster``), one per group of retrainings
trained together (``evaluation.retrain_group``), each group saved as it finishes, before the stage
itself reads them back (``dvc repro`` runs the same stage functions, which do the groups one after
another).

The GPU stages (gradient caching, inverse-Hessian solves, scoring) form the ``attribution``
flow. With ``cluster.runner: dask``, a ``shards`` subflow first computes the shards of a stage's gradient caches
and index rows as tasks on the Dask cluster (:mod:`flows.shards`). With ``gpu_deployment`` set (the deployments of ``prefect.yaml`` set it) the pipeline runs it
as that deployment, on the ``gpu`` work pool; otherwise in its own process. With no
``PREFECT_API_URL`` the flows run on Prefect's temporary local server.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task, unmapped
from prefect.runtime import flow_run
from prefect.states import Completed

from flows import dvc_file, publish, report, retraining, runners, shards, stage_cache, waits
from flows.experiment import Experiment
from flows.fetched_workspace import (GPU_INPUTS, fetch_into, hand_over, handed_over, input_fingerprints, receive_records,
                                     send_records, workspace_for)
from flows.reach import check_gpu_deployment, check_reach, project_root
from flows.settings import PARAMS_FILE, PipelineSettings, load_profile, load_settings, validate_settings, with_overrides
from flows.stage_table import GPU_STAGES, NAMES, RETRAINING_STAGES
from flows.stage_table import stage as table_row
from flows.stages import run_stage
from flows.versioning import checkout_data_revision, commit_data, dataset_hashes, resolve_revision, workspace_data_is_current
from flows.workspace import StageResult, Workspace
from flows.workspace_lock import Hold, hold_workspace

CPU_STAGES = tuple(n for n in NAMES if n not in GPU_STAGES and n not in ("data", "report"))


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Whether an I/O task's failure may pass by waiting: not a full disk (ENOSPC, EDQUOT), whose retries would only
    fail again after their delays."""
    import errno

    try:
        state.result()
    except OSError as error:
        return error.errno not in (errno.ENOSPC, errno.EDQUOT)
    except BaseException:  # noqa: BLE001 - any other failure is retried as before
        return True
    return True


IO_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": _worth_retrying}


@contextmanager
def dvc_slot(root: Path) -> Iterator[None]:
    """Hold the workspace's DVC slot: one DVC command at a time in ``root``, waiting up to ``$INFLUENCE_DVC_SLOT_SECONDS``.

    An ``flock`` on ``.dvc/tmp/influence-dvc.lock`` (DVC's own lock refuses a second command at once instead of waiting):
    the kernel frees it when its holder dies, however it dies. (A Prefect global concurrency slot, used before, stays
    taken when its holder is killed: with the temporary server of a command-line run its lease is never revoked.)
    """
    import fcntl
    import time

    path = root / ".dvc" / "tmp" / "influence-dvc.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = waits.seconds(waits.DVC_SLOT_ENV, waits.DVC_SLOT_SECONDS)
    deadline = time.monotonic() + limit
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"waited {limit:.0f} s for the DVC slot of {root} ({path}): another DVC command of "
                                       f"this workspace held it all that time; ${waits.DVC_SLOT_ENV} sets the limit") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# the hold the GPU stages run under when their parent, a pipeline run in another process, holds the workspace (set by
# the attribution flow for its stages; a context variable, not a task parameter: a hold holds an open file)
_PARENT_HOLD: contextvars.ContextVar[Hold | None] = contextvars.ContextVar("influence_parent_hold", default=None)


@task(task_run_name="{stage}")
def stage_task(stage: str, settings: PipelineSettings, root: Path, force: bool = False):
    ws = Workspace(root)
    valid = (lambda: workspace_data_is_current(root, ws.prepared)) if stage == "data" else None
    guard, hold = None, _PARENT_HOLD.get()
    if hold is not None:  # the GPU stages under their parent's hold: it must last
        hold.check(f"before stage {stage}")
        guard = lambda: hold.check(f"before saving the outputs of stage {stage}")  # noqa: E731
    result, how = stage_cache.run_or_skip(stage, lambda: run_stage(stage, settings, ws), settings, ws, force=force, valid=valid,
                                          guard=guard)
    if how != "ran":
        where = "outputs in place" if how == "skipped" else "a kept version restored"
        return Completed(name="Skipped", message=f"inputs unchanged, {where} (fingerprint {result.info['fingerprint'][:12]})",
                         data=result)
    return result


@task(name="version-data", **IO_RETRIES)
def version_data_task(settings: PipelineSettings, root: Path) -> dict[str, str]:
    with dvc_slot(root):
        return commit_data(root, settings)


@task(name="checkout-data", **IO_RETRIES)
def checkout_data_task(root: Path, data_rev: str) -> dict[str, str]:
    with dvc_slot(root):
        return checkout_data_revision(root, data_rev, Workspace(root).prepared)["hashes"]


@task(task_run_name="plan-{stage}")
def plan_task(stage: str, settings: PipelineSettings, root: Path) -> tuple[list[list], Path]:
    """The stage's retrainings in the groups trained together, and the folder where each one's measurements are saved."""
    x = Experiment.for_stage(stage, settings, Workspace(root))
    return retraining.groups(x, retraining.planned(x), RETRAINING_STAGES[stage]), retraining.runs_folder(x, RETRAINING_STAGES[stage])


@task(task_run_name="retrain-{stage}-{group[0].key}")
def retrain_task(stage: str, settings: PipelineSettings, root: Path, group: list, num_threads: int | None, runs: Path,
                 inputs: dict[str, str]) -> list[str]:
    """One group of retrainings, in the flow's folder or (on a machine that does not see it) in a workspace fetched
    from the object store; with a store, its records are also sent there."""
    ws = workspace_for(settings, root, inputs)
    x = Experiment.for_stage(stage, settings, ws)
    scope = RETRAINING_STAGES[stage]
    found = retraining.retrain_group(x, group, scope, num_threads=num_threads, runs=runs if ws.root == Path(root) else None)
    send_records(settings, runs.name, found)
    return [r["key"] for r in found]


@flow(name="retrainings", flow_run_name="{stage}-retrainings")
def retrainings(stage: str, settings: PipelineSettings, project_dir: str) -> int:
    """Every retraining of the ``deletion``, ``pretrain_deletion`` or ``lds`` stage, as parallel tasks: one per group
    of retrainings trained together (``evaluation.retrain_group``; each group saved as it finishes).

    Run with the task runner of ``cluster`` (:mod:`flows.runners`): a thread pool of ``evaluation.workers``, or a
    Dask cluster; each group gets its share of the machine's cores as torch intra-op threads (set in the thread
    that trains). Returns how many retrainings the stage has.
    """
    root = Path(project_dir)
    grouped, runs = plan_task(stage, settings, root)
    threads = runners.choose(settings).num_threads
    inputs = input_fingerprints(Workspace(root))
    futures = retrain_task.map(unmapped(stage), unmapped(settings), unmapped(root), grouped, unmapped(threads), unmapped(runs),
                               unmapped(inputs))
    for future in futures:
        future.result()
    receive_records(settings, runs, [r for group in grouped for r in group])  # those made on other machines
    return sum(len(group) for group in grouped)


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
    (:mod:`flows.shards`), before the stage itself runs and finds them in place. Returns how many were computed."""
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


@task(task_run_name="collect-{stage}", **IO_RETRIES)
def collect_task(stage: str, settings: PipelineSettings, root: Path) -> StageResult:
    return stage_cache.collect(stage, settings, Workspace(root))


@task(name="report", **IO_RETRIES)
def report_task(settings: PipelineSettings, root: Path, tags: dict[str, str]) -> StageResult:
    ws = Workspace(root)  # staged as every stage: the last complete report stays in place until this one is
    return stage_cache.run_or_skip("report", lambda: report.build_report(settings, ws, extra_tags=tags), settings, ws)[0]


@task(name="record-stages", **IO_RETRIES)
def record_task(settings: PipelineSettings, root: Path, names: list[str]) -> list[str]:
    with dvc_slot(root):
        return dvc_file.record_stages(root, settings, names)


@task(name="publish")
def publish_task(settings: PipelineSettings, root: Path, final: StageResult, skipped: list[str]) -> list[str]:
    return publish.publish(settings, root, final, skipped)


def _run(stage: str, settings: PipelineSettings, root: Path, force: bool, skipped: list[str]) -> StageResult:
    options = IO_RETRIES if stage == "data" else {}
    state = stage_task.with_options(name=stage, **options)(stage, settings, root, force, return_state=True)
    if state.name == "Skipped":
        skipped.append(stage)
    return state.result()


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


@flow(name="attribution", log_prints=True)
def attribution(
    settings: PipelineSettings | None = None,
    project_dir: str = ".",
    force: bool = False,
    on_gpu_pool: bool = False,
) -> list[str]:
    """The GPU stages: cache per-example gradients, solve, and score (influence, multi-stage, TracIn-WE).

    Started by the pipeline (a subflow in its process, or its deployment ``attribution/gpu`` on the ``gpu``
    pool) it runs under the pipeline's hold of the workspace (:mod:`flows.workspace_lock`: the parent is found
    through the Prefect API, never a parameter) and, on another machine, fetches the stages it reads from the
    object store as the pipeline hands them over there (signed, :mod:`flows.object_store`); started on its own,
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
            for stage in GPU_STAGES:
                if (settings.cluster.runner == "dask" and shards.targets(stage, settings)
                        and (force or stage_cache.would_run(stage, settings, Workspace(root)))):
                    hold.check(f"before the shards of stage {stage}")
                    shards_flow.with_options(task_runner=runners.task_runner(runners.choose(settings)))(stage, settings, str(root))
                _run(stage, settings, root, force, skipped)
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
        return _stages(settings, root, data_rev, gpu_deployment, force, hold)


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


def _stages(settings: PipelineSettings, root: Path, data_rev: str, gpu_deployment: str, force: bool, hold: Hold) -> dict[str, object]:
    """The body of :func:`pipeline`, run while it holds the workspace (``hold``: its hold, which the GPU stages run under)."""
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
        if stage in RETRAINING_STAGES and table_row(stage).is_enabled(settings) and (force or stage_cache.would_run(stage, settings, ws)):
            retrainings.with_options(task_runner=runners.task_runner(runners.choose(settings)))(stage, settings, str(root))
        _run(stage, settings, root, force, skipped)  # reads the retrainings back, or is skipped
    tags = {"prefect_flow_run_id": str(flow_run.get_id() or ""), "run_name": str(flow_run.get_name() or "pipeline"),
            "stages_skipped": ",".join(skipped) or "none"}
    final = report_task(settings, root, tags)
    record_task(settings, root, [n for n in NAMES if n != "data"])  # data: recorded (and pushed) when it ran
    publish_task(settings, root, final, skipped)
    logger.info("report logged to MLflow run %s (%s); stages skipped: %s", final.info["mlflow_run_id"], final.info["mlflow_url"], skipped or "none")
    return {"mlflow_run_id": final.info["mlflow_run_id"], "report": final.outputs["report"], "skipped": skipped}
