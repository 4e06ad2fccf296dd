"""MLflow: one parent run per pipeline run, one child run per stage, the report as artifacts.

Nothing else in the project imports MLflow. The tracking URI is ``tracking.tracking_uri``, else the
``MLFLOW_TRACKING_URI`` environment variable (``scripts/servers`` sets it for its worker, so
deployment runs log to the project's MLflow server, which places the artifacts), else a SQLite
file ``mlruns.db`` in the project folder with artifacts in ``mlartifacts/`` beside it, so
``mlflow ui --backend-store-uri sqlite:///mlruns.db`` browses what a run left.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.settings import PipelineSettings
from flows.workspace import StageResult

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


def log_pipeline_run(
    settings: PipelineSettings,
    root: Path,
    results: dict[str, StageResult],
    report_dir: Path,
    tags: dict[str, str],
    run_name: str | None = None,
) -> tuple[str, str, str]:
    """Log a finished pipeline run to MLflow; return the parent run id, its experiment id and the tracking URI.

    Args:
        settings: the run's settings (logged as parameters, flattened with dots).
        root: project folder (default store location).
        results: every stage's result; each becomes a child run with its metrics and seconds.
        report_dir: folder whose files (HTML report, CSV tables, figures) become the parent's artifacts.
        tags: git revision, data hashes, settings digest, orchestrator ids.
        run_name: the parent run's name.
    """
    with _store(settings, root) as (mlflow, experiment_id, uri):
        params = _flatten("", settings.model_dump(mode="json"), {})
        done = _earlier_attempts(mlflow, experiment_id, tags.get("prefect_flow_run_id", ""))
        if done is not None:  # a retry of a report that was logged whole: the same run, not a second one
            return done, experiment_id, uri
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as parent:
            mlflow.log_params(params)
            mlflow.set_tags(tags)
            summary = {}
            for stage, result in results.items():
                summary[f"{stage}.seconds"] = result.seconds
                for key, value in result.metrics.items():
                    if key != "seconds":
                        summary[f"{stage}.{key}"] = float(value)
                with mlflow.start_run(experiment_id=experiment_id, run_name=stage, nested=True):
                    mlflow.set_tags({**tags, "stage": stage})
                    mlflow.log_metrics({k: float(v) for k, v in result.metrics.items()})
                    if result.outputs:
                        mlflow.log_dict(result.outputs, "outputs.json")
                    if result.info:
                        mlflow.log_dict(result.info, "info.json")
            mlflow.log_metrics(summary)
            mlflow.log_artifacts(str(report_dir), artifact_path="report")
            _log_tables(mlflow, report_dir)
            return parent.info.run_id, experiment_id, uri


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


def _log_tables(mlflow: Any, report_dir: Path) -> None:
    """Each CSV table of the report also as an MLflow table (``tables/<name>.json``, the UI's table view)."""
    import pandas as pd

    for path in sorted(report_dir.glob("*.csv")):
        frame = pd.read_csv(path, dtype={"query_id": str, "id": str})
        if not frame.empty:
            mlflow.log_table(data=frame, artifact_file=f"tables/{path.stem}.json")


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Address of a run's page in the MLflow UI.

    For a tracking server it is the server's own page; for a SQLite store it is the page that
    ``mlflow ui --backend-store-uri <uri>`` serves on its default address (127.0.0.1:5000).
    """
    from flows.reach import redact

    base = redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
