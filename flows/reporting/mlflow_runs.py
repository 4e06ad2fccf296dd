"""MLflow: one parent run per pipeline run, one child run per stage, the report and the scores as artifacts.

The pipeline flow opens its run when it starts (:func:`open_pipeline_run`: the settings as parameters, the tags,
status RUNNING), so a run that crashes is there, marked FAILED (:func:`fail_pipeline_run`); the report stage then
logs into it (:func:`log_pipeline_run`): a child run per stage with its metrics (each training loss also as a
history with one step per epoch), the report's files, its tables, and every score matrix with its ids
(``scores/<stage>/<mode>.safetensors`` and ``scores/<stage>/ids.json``), which :func:`load_scores` reads back.

Nothing else in the project imports MLflow. The tracking URI is ``tracking.tracking_uri``, else the
``MLFLOW_TRACKING_URI`` environment variable (``scripts/servers`` sets it for its worker, so
deployment runs log to the project's MLflow server, which places the artifacts), else a SQLite
file ``mlruns.db`` in the project folder with artifacts in ``mlartifacts/`` beside it, so
``mlflow ui --backend-store-uri sqlite:///mlruns.db`` browses what a run left.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.definition.settings import PipelineSettings
from flows.experiment.workspace import StageResult

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def tracking_uri(settings: PipelineSettings, root: Path) -> str:
    """The MLflow tracking URI: the configured one, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlruns.db``."""
    return (
        settings.tracking.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI", "")
        or f"sqlite:///{(root / 'mlruns.db').resolve()}"
    )


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value if not isinstance(value, list) else ",".join(map(str, value))
    return out


def _experiment(mlflow: Any, name: str, root: Path, uri: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    if uri.startswith(("http://", "https://")):  # a tracking server decides where artifacts go
        return mlflow.create_experiment(name)
    location = (root / "mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


@contextmanager
def _store(settings: PipelineSettings, root: Path) -> Iterator[tuple[Any, str, str]]:
    """``(mlflow, experiment id, tracking URI)`` of the run's store, set for the block only:
    mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, so both are put back afterwards and this
    run's store does not become the default of the next run in the same process."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow

    uri = tracking_uri(settings, root)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow, _experiment(mlflow, settings.tracking.experiment, root, uri), uri
    finally:
        mlflow.set_tracking_uri(previous)


def open_pipeline_run(settings: PipelineSettings, root: Path, tags: dict[str, str], run_name: str | None = None) -> str:
    """Open the MLflow run of a pipeline run as it starts: its settings as parameters and its tags, status RUNNING;
    its id (the report stage logs into it; :func:`fail_pipeline_run` marks it FAILED on a crash)."""
    with _store(settings, root) as (mlflow, experiment_id, uri):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        client = MlflowClient(uri)
        run_id = client.create_run(experiment_id, run_name=run_name, tags=resolve_tags(tags)).info.run_id
        params = _flatten("", settings.model_dump(mode="json"), {})
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run_id


def fail_pipeline_run(settings: PipelineSettings, root: Path, run_id: str) -> None:
    """Mark the pipeline's MLflow run FAILED (the flow ended with an error or a stop signal), unless it finished."""
    with _store(settings, root) as (mlflow, _, uri):
        from mlflow.entities import RunStatus
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        if client.get_run(run_id).info.status != "FINISHED":
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def log_pipeline_run(
    settings: PipelineSettings,
    root: Path,
    results: dict[str, StageResult],
    report_dir: Path,
    tags: dict[str, str],
    run_name: str | None = None,
    run_id: str = "",
    scores: dict[str, dict[str, Path]] | None = None,
    ids: dict[str, dict[str, list[str]]] | None = None,
) -> tuple[str, str, str]:
    """Log a finished pipeline run to MLflow; return the parent run id, its experiment id and the tracking URI.

    Args:
        settings: the run's settings (logged as parameters, flattened with dots).
        root: project folder (default store location).
        results: every stage's result; each becomes a child run with its metrics and seconds.
        report_dir: folder whose files (HTML report, CSV tables, figures) become the parent's artifacts.
        tags: git revision, data hashes, settings digest, orchestrator ids.
        run_name: the parent run's name.
        run_id: the run the pipeline flow opened (:func:`open_pipeline_run`); empty: a new one (``dvc repro``).
        scores: ``{stage: {mode: scores file}}`` logged as ``scores/<stage>/<mode>.safetensors``.
        ids: ``{stage: {"queries": [...], "examples": [...]}}``, the rows and columns of each stage's scores.
    """
    with _store(settings, root) as (mlflow, experiment_id, uri):
        params = _flatten("", settings.model_dump(mode="json"), {})
        # The client's calls, not the fluent API's: a request to a tracking server with basic auth costs a password
        # hash check (about 0.1 s), and the fluent calls made 213 requests where these make about 150 (a run lookup
        # before each artifact, one call per tag set and per run end).
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        client = MlflowClient(uri)
        run_tags = resolve_tags(tags)  # user, source, git commit: what mlflow.start_run adds, found once
        if run_id:
            _clear_children(client, experiment_id, run_id)  # an earlier attempt of this report left them
            client.log_batch(run_id, tags=_tags(tags))
            parent = run_id
        else:
            done = _earlier_attempts(mlflow, experiment_id, tags.get("prefect_flow_run_id", ""))
            if done is not None:  # a retry of a report that was logged whole: the same run, not a second one
                return done, experiment_id, uri
            parent = client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
            client.log_batch(parent, params=[Param(k, str(v)) for k, v in params.items()])
        try:
            summary = {}
            for stage, result in results.items():
                summary[f"{stage}.seconds"] = result.seconds
                for key, value in result.metrics.items():
                    if key != "seconds":
                        summary[f"{stage}.{key}"] = float(value)
                _log_stage(client, experiment_id, parent, stage, result, run_tags)
            client.log_batch(parent, metrics=_metrics(summary) + _histories(summary))
            client.log_artifacts(parent, str(report_dir), artifact_path="report")
            _log_tables(client, parent, report_dir)
            _log_scores(client, parent, scores or {}, ids or {})
        except BaseException:
            client.set_terminated(parent, RunStatus.to_string(RunStatus.FAILED))
            raise
        client.set_terminated(parent)
        return parent, experiment_id, uri


def _tags(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]


def _clear_children(client: Any, experiment_id: str, parent: str) -> None:
    for run in client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        client.delete_run(run.info.run_id)


def _metrics(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, 0) for key, value in values.items()]


EPOCH_LOSS = re.compile(r"^(?P<name>.+\.)?loss_epoch_(?P<epoch>\d+)$")


def _histories(values: dict[str, Any]) -> list[Any]:
    """Each training loss recorded per epoch (``pretrain.loss_epoch_3``, ``finetune.updated.loss_epoch_1``) also as
    one metric with a step per epoch (``pretrain.loss``, ``finetune.updated.loss``): the UI's chart of its history."""
    from mlflow.entities import Metric

    now, found = int(time.time() * 1000), []
    for key, value in values.items():
        match = EPOCH_LOSS.match(key.split(".", 1)[1] if "." in key else key)
        if match:
            stage = key.split(".", 1)[0]
            found.append(Metric(f"{stage}.{match['name'] or ''}loss", float(value), now, int(match["epoch"])))
    return found


def _log_scores(client: Any, run_id: str, scores: dict[str, dict[str, Path]], ids: dict[str, dict[str, list[str]]]) -> None:
    """Every score matrix, with the ids of its rows (queries) and columns (examples), as ``scores/<stage>/``."""
    import shutil

    for stage, modes in scores.items():
        with tempfile.TemporaryDirectory() as folder:
            for mode, path in modes.items():
                shutil.copyfile(path, Path(folder) / f"{mode}.safetensors")
            (Path(folder) / "ids.json").write_text(json.dumps(ids.get(stage, {})))
            client.log_artifacts(run_id, folder, artifact_path=f"scores/{stage}")


def load_scores(run_id: str, tracking_uri: str = "", stage: str = "", mode: str = "") -> dict[tuple[str, str], dict[str, Any]]:
    """The score matrices a finished pipeline run logged: ``{(stage, mode): {"scores": [Q, N] tensor, "queries":
    [query ids], "examples": [example ids]}}`` (only ``stage`` and ``mode`` when given).

    Args:
        run_id: the pipeline's MLflow run (the report's ``mlflow_run_id``; ``flows.cli results`` lists them).
        tracking_uri: its store; default ``$MLFLOW_TRACKING_URI``, else MLflow's default.

    Raises:
        ValueError: the run logged no scores (a run made before they were logged, or another kind of run).
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    client = MlflowClient(tracking_uri or None)
    stages = [a.path.split("/")[-1] for a in client.list_artifacts(run_id, "scores") if a.is_dir]
    if not stages:
        raise ValueError(f"MLflow run {run_id} holds no scores/ artifacts: is it a pipeline run's, logged since they are?")
    found = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in stages if not stage else [s for s in stages if s == stage]:
            local = Path(client.download_artifacts(run_id, f"scores/{name}", folder))
            ids = json.loads((local / "ids.json").read_text())
            for path in sorted(local.glob("*.safetensors")):
                if not mode or path.stem == mode:
                    found[(name, path.stem)] = {"scores": load_file(str(path))["scores"], **ids}
    return found


def _log_stage(client: Any, experiment_id: str, parent: str, stage: str, result: StageResult, tags: dict[str, str]) -> None:
    """One stage as a child run of ``parent``: its metrics, and its outputs and info as JSON artifacts."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    metrics = _metrics(result.metrics)  # a bad value fails here, before the child run exists
    child = client.create_run(experiment_id, run_name=stage, tags={**tags, "stage": stage, MLFLOW_PARENT_RUN_ID: parent})
    run_id = child.info.run_id
    client.log_batch(run_id, metrics=metrics)
    with tempfile.TemporaryDirectory() as folder:
        for name, value in (("outputs.json", result.outputs), ("info.json", result.info)):
            if value:
                (Path(folder) / name).write_text(json.dumps(value, indent=2))
        if any(Path(folder).iterdir()):
            client.log_artifacts(run_id, folder)
    client.set_terminated(run_id)


def _earlier_attempts(mlflow: Any, experiment_id: str, flow_run_id: str) -> str | None:
    """The parent run an earlier attempt of this flow run's report logged whole, if any; runs that an interrupted
    attempt left (failed or still marked running, parents and children) are deleted, so a retry leaves one run."""
    if not flow_run_id:
        return None
    found = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                               filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    finished = [r for r in found if r.info.status == "FINISHED" and "mlflow.parentRunId" not in r.data.tags]
    if finished:
        return finished[0].info.run_id
    for run in found:
        mlflow.delete_run(run.info.run_id)
    return None


def log_explanation(settings: PipelineSettings, root: Path, found: dict[str, Any], page: str) -> str:
    """Log an explanation of new sentences as an MLflow run (``explain`` tag): its HTML page, its table,
    the sentences, the timings and the run whose models answered; return the run id."""
    import pandas as pd

    with _store(settings, root) as (mlflow, experiment_id, _):
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"explain {len(found['queries'])} sentence(s)") as run:
            mlflow.set_tags({"kind": "explain", "models_of_run": found.get("run_id", "")})
            mlflow.log_metrics({f"{source}_seconds": float(v) for source, v in found["seconds"].items()})
            mlflow.log_text(page, "explanation.html")
            mlflow.log_dict({"queries": found["queries"]}, "queries.json")
            if found["rows"]:
                mlflow.log_table(data=pd.DataFrame(found["rows"]), artifact_file="tables/explanation.json")
            return run.info.run_id


def _log_tables(client: Any, run_id: str, report_dir: Path) -> None:
    """Each CSV table of the report also as an MLflow table (``tables/<name>.json``, the UI's table view): the files
    ``MlflowClient.log_table`` writes (pandas' ``split`` JSON) and its ``mlflow.loggedArtifacts`` tag, uploaded
    together (``log_table`` makes four requests per table; a new run has no earlier table to append to)."""
    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    logged = []
    with tempfile.TemporaryDirectory() as folder:
        for path in sorted(report_dir.glob("*.csv")):
            frame = pd.read_csv(path, dtype={"query_id": str, "id": str})
            if not frame.empty:
                frame.to_json(Path(folder) / f"{path.stem}.json", orient="split", index=False, date_format="iso")
                logged.append({"path": f"tables/{path.stem}.json", "type": "table"})
        if logged:
            client.log_artifacts(run_id, folder, artifact_path="tables")
            client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged))


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Address of a run's page in the MLflow UI.

    For a tracking server it is the server's own page; for a SQLite store it is the page that
    ``mlflow ui --backend-store-uri <uri>`` serves on its default address (127.0.0.1:5000).
    """
    from flows.guards.run_form import redact

    base = redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
