"""The Prefect tasks the flows share: one stage (run or skipped), the data version, the retrainings, the report.

Each stage is one task over its entry point (the same functions ``dvc repro`` runs); tasks return
:class:`~flows.experiment.workspace.StageResult` (paths and numbers, never tensors). A stage whose inputs (its
settings, its code, its data, the stages it reads) match its last completed run in the workspace, or a kept
earlier version, is skipped: its task ends in a Completed state named ``Skipped``
(:mod:`flows.incremental.stage_cache`). Only the I/O tasks retry, with back-off (obtaining the data, DVC, MLflow),
and never on a full disk; DVC commands hold the workspace's DVC slot.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import task
from prefect.states import Completed

from flows.cluster.worker_workspace import send_records, workspace_for
from flows.definition.settings import PipelineSettings
from flows.definition.stage_table import RETRAINING_STAGES
from flows.experiment import retraining
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult, Workspace
from flows.guards import waits
from flows.guards.workspace_lock import Hold
from flows.incremental import stage_cache
from flows.reporting import prefect_artifacts
from flows.stages import entry
from flows.stages import report
from flows.versioning import dvc
from flows.versioning.data_version import workspace_data_is_current


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
    result, how = stage_cache.run_or_skip(stage, lambda: entry.run_stage(stage, settings, ws), settings, ws, force=force, valid=valid,
                                          guard=guard)
    if how != "ran":
        where = "outputs in place" if how == "skipped" else "a kept version restored"
        return Completed(name="Skipped", message=f"inputs unchanged, {where} (fingerprint {result.info['fingerprint'][:12]})",
                         data=result)
    return result


@task(name="version-data", **IO_RETRIES)
def version_data_task(settings: PipelineSettings, root: Path) -> dict[str, str]:
    with dvc_slot(root):
        return dvc.commit_data(root, settings)


@task(name="checkout-data", **IO_RETRIES)
def checkout_data_task(root: Path, data_rev: str) -> dict[str, str]:
    with dvc_slot(root):
        return dvc.checkout_data_revision(root, data_rev, Workspace(root).prepared)["hashes"]


@task(task_run_name="plan-{stage}")
def plan_task(stage: str, settings: PipelineSettings, root: Path) -> tuple[list[list], Path]:
    """The stage's retrainings in the groups trained together, and the folder where each one's measurements are saved."""
    x = Experiment.for_stage(stage, settings, Workspace(root))
    return retraining.groups(x, entry.plan(stage, x), RETRAINING_STAGES[stage]), retraining.runs_folder(x, RETRAINING_STAGES[stage])


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


@task(task_run_name="collect-{stage}", **IO_RETRIES)
def collect_task(stage: str, settings: PipelineSettings, root: Path) -> StageResult:
    return stage_cache.collect(stage, settings, Workspace(root))


@task(name="report", **IO_RETRIES)
def report_task(settings: PipelineSettings, root: Path, tags: dict[str, str], mlflow_run_id: str = "") -> StageResult:
    ws = Workspace(root)  # staged as every stage: the last complete report stays in place until this one is
    return stage_cache.run_or_skip("report", lambda: report.run(settings, ws, extra_tags=tags, mlflow_run_id=mlflow_run_id),
                                   settings, ws)[0]


@task(name="open-mlflow-run", **IO_RETRIES)
def open_run_task(settings: PipelineSettings, root: Path, tags: dict[str, str], run_name: str) -> str:
    """The pipeline's MLflow run, opened as the flow starts (the report logs into it; a crash marks it FAILED)."""
    from flows.reporting.mlflow_runs import open_pipeline_run

    return open_pipeline_run(settings, root, tags, run_name)


@task(name="record-stages", **IO_RETRIES)
def record_task(settings: PipelineSettings, root: Path, names: list[str]) -> list[str]:
    with dvc_slot(root):
        return dvc.record_stages(root, settings, names)


@task(name="publish")
def publish_task(settings: PipelineSettings, root: Path, final: StageResult, skipped: list[str]) -> list[str]:
    return prefect_artifacts.publish(settings, root, final, skipped)


def _run(stage: str, settings: PipelineSettings, root: Path, force: bool, skipped: list[str]) -> StageResult:
    options = IO_RETRIES if stage == "data" else {}
    state = stage_task.with_options(name=stage, **options)(stage, settings, root, force, return_state=True)
    if state.name == "Skipped":
        skipped.append(stage)
    return state.result()


__all__ = ["IO_RETRIES", "checkout_data_task", "collect_task", "dvc_slot", "open_run_task", "plan_task", "publish_task",
           "record_task", "report_task", "retrain_task", "stage_task", "version_data_task"]
