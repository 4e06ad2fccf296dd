"""The Prefect flow ``explain``: new sentences from the UI's form, answered from the saved indexes.

The ``explain/text`` deployment's form takes free text (one sentence per line), the model
(``latest``, or the MLflow run id of the workspace's last pipeline run), the embedding mode and
``k``. The flow scores each sentence against the attribution indexes the last pipeline run left
(:mod:`flows.answers.explanation`) and publishes the top-``k`` proponents and opponents, from the
finetuning and the pretraining data, as a Prefect table artifact and as an MLflow run (the HTML
page, the table, the sentences and the timings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from prefect import flow, get_run_logger, task
from pydantic import Field
from prefect.runtime import flow_run

from flows.answers import explanation as explaining
from flows.experiment.experiment import Experiment
from flows.guards.run_form import check_reach, project_root
from flows.definition.settings import PARAMS_FILE, PipelineSettings, load_settings, validate_settings
from flows.experiment.workspace import Workspace
from flows.guards.workspace_lock import hold_workspace

TABLE_COLUMNS = ("query_id", "query", "source", "kind", "rank", "id", "label", "score", "text")


@task(name="explain-texts")
def explain_task(settings: PipelineSettings, project_dir: str, texts: list[str], model: str, mode: str, k: int) -> dict:
    ws = Workspace(Path(project_dir))
    # the workspace is held while the indexes are read and fitted: a pipeline run (or another explanation) never
    # replaces them under this one
    with hold_workspace(ws.root, str(flow_run.get_name() or "explain"), say=get_run_logger().info,
                        flow_run_id=str(flow_run.get_id() or "")):
        run_id = explaining.resolve_model(ws, model)
        return {**explaining.explain_texts(Experiment(settings, ws), texts, mode, k), "run_id": run_id}


@task(name="log-explanation")
def log_task(settings: PipelineSettings, project_dir: str, found: dict, mode: str) -> str:
    from flows.reporting.mlflow_runs import log_explanation

    page = explaining.explanation_page(found, mode, found["run_id"])
    return log_explanation(settings, Path(project_dir), found, page)


@flow(name="explain", log_prints=True)
def explain(
    texts: str,
    model: str = "latest",
    mode: Literal["fixed", "updated"] = "updated",
    k: Annotated[int, Field(ge=1, le=explaining.MAX_K)] = 5,
    project_dir: str = ".",
    settings: PipelineSettings | None = None,
) -> dict:
    """Explain new sentences: their top proponents and opponents among the finetuning and pretraining examples.

    Args:
        texts: the sentences, one per line (at most 50).
        model: ``latest`` or the MLflow run id of the workspace's last pipeline run.
        mode: the embedding mode whose finetuned model and indexes are used.
        k: proponents and opponents per sentence and source (1 to 100).
        project_dir: the project folder whose workspace holds the models and indexes.
        settings: the settings the models were made with; when omitted, ``<project_dir>/params.yaml``.

    Returns:
        ``{"rows": [...], "mlflow_run_id": ..., "seconds": {...}}``.
    """
    from prefect.artifacts import create_table_artifact

    explaining.check_k(k)
    lines = explaining.parse_texts(texts)
    root = str(project_root(project_dir))
    settings = validate_settings(settings, "flow parameter 'settings'") if settings is not None else load_settings(Path(root) / PARAMS_FILE)
    check_reach(settings, Path(root))
    found = explain_task(settings, root, lines, model, mode, k)
    run_id = log_task(settings, root, found, mode)
    create_table_artifact([{c: r[c] for c in TABLE_COLUMNS} for r in found["rows"]], key="explanation",
                          description=f"Top {k} proponents and opponents of {len(lines)} sentence(s), embedding {mode}.")
    get_run_logger().info("explained %d sentence(s) in %s; MLflow run %s", len(lines),
                          {s: f"{v:.2f} s" for s, v in found["seconds"].items()}, run_id)
    return {"rows": found["rows"], "mlflow_run_id": run_id, "seconds": found["seconds"]}
