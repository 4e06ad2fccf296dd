"""The Prefect flow ``pipeline``: every stage of the attribution pipeline, in order.

Each task wraps one stage function of :mod:`flows.stages` (the same functions ``dvc repro`` runs)
and returns a :class:`~flows.workspace.StageResult`: paths and numbers, never tensors. Only the
I/O tasks (downloading the pinned data, DVC, MLflow) retry. With no ``PREFECT_API_URL`` the flow
runs on Prefect's temporary local server.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows import report, stages
from flows.settings import PARAMS_FILE, PipelineSettings, load_settings, validate_settings
from flows.versioning import commit_data
from flows.workspace import StageResult, Workspace


@task(name="data", retries=2, retry_delay_seconds=[5, 30])
def data_task(settings: PipelineSettings, root: Path) -> StageResult:
    return stages.data(settings, Workspace(root))


@task(name="version-data", retries=2, retry_delay_seconds=[2, 10])
def version_data_task(settings: PipelineSettings, root: Path) -> dict[str, str]:
    return commit_data(root, settings)


@task(name="features")
def features_task(settings: PipelineSettings, root: Path) -> StageResult:
    return stages.features(settings, Workspace(root))


@task(name="pretrain")
def pretrain_task(settings: PipelineSettings, root: Path) -> StageResult:
    return stages.pretrain(settings, Workspace(root))


@task(name="finetune")
def finetune_task(settings: PipelineSettings, root: Path) -> StageResult:
    return stages.finetune(settings, Workspace(root))


@task(name="gradients")
def gradients_task(settings: PipelineSettings, root: Path) -> StageResult:
    return stages.gradients(settings, Workspace(root))


@task(name="influence")
def influence_task(settings: PipelineSettings, root: Path) -> StageResult:
    return stages.influence(settings, Workspace(root))


@task(name="multistage")
def multistage_task(settings: PipelineSettings, root: Path) -> StageResult:
    return stages.multistage(settings, Workspace(root))


@task(name="tracin-we")
def tracin_we_task(settings: PipelineSettings, root: Path) -> StageResult:
    return stages.tracin_we(settings, Workspace(root))


@task(name="deletion")
def deletion_task(settings: PipelineSettings, root: Path) -> StageResult:
    return stages.deletion(settings, Workspace(root))


@task(name="report", retries=2, retry_delay_seconds=[2, 10])
def report_task(settings: PipelineSettings, root: Path, tags: dict[str, str]) -> StageResult:
    return report.build_report(settings, Workspace(root), extra_tags=tags)


@flow(name="pipeline", log_prints=True)
def pipeline(settings: PipelineSettings | None = None, project_dir: str = ".") -> dict[str, str]:
    """Run the whole attribution pipeline and leave its report in MLflow.

    Args:
        settings: every setting (the sections of ``params.yaml``); when omitted, read from
            ``<project_dir>/params.yaml``.
        project_dir: the project folder (a git + DVC repository) whose workspace the stages use.

    Returns:
        ``{"mlflow_run_id": ..., "report": path}``.
    """
    root = Path(project_dir).resolve()
    settings = validate_settings(settings, "flow parameter 'settings'") if settings is not None else load_settings(root / PARAMS_FILE)
    logger = get_run_logger()
    data_task(settings, root)
    hashes = version_data_task(settings, root)
    logger.info("data versions: %s", hashes)
    features_task(settings, root)
    pretrain_task(settings, root)
    finetune_task(settings, root)
    gradients_task(settings, root)
    influence_task(settings, root)
    multistage_task(settings, root)
    tracin_we_task(settings, root)
    deletion_task(settings, root)
    tags = {"prefect_flow_run_id": str(flow_run.get_id() or ""), "run_name": str(flow_run.get_name() or "pipeline")}
    final = report_task(settings, root, tags)
    logger.info("report logged to MLflow run %s", final.info["mlflow_run_id"])
    return {"mlflow_run_id": final.info["mlflow_run_id"], "report": final.outputs["report"]}
