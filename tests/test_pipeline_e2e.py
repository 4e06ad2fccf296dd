"""The whole Prefect flow on a tiny slice of the real data, with real Prefect, MLflow and DVC."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from flows.settings import load_settings
from influence.reports.tables import COLUMNS


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_pipeline_end_to_end(project: Path, prefect_harness):
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline

    settings = load_settings(project / "params.yaml")
    outcome = pipeline(settings=settings, project_dir=str(project))

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns.db'}")
    client = MlflowClient()
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for name in ("pretrain", "finetune", "mnist"):
        assert len(run.data.tags[f"data.{name}.md5"]) == 32
    assert run.data.tags["git_revision"] != "unknown"
    assert run.data.params["attribution.solver"] == settings.attribution.solver
    metrics = run.data.metrics
    for mode in settings.finetune.modes:
        assert 0.0 <= metrics[f"finetune.{mode}.accuracy_test"] <= 1.0
    for method in settings.evaluation.methods:
        assert f"deletion.{method}.passed_fraction" in metrics
        assert any(k.startswith(f"deletion.{method}.proponents.k") and k.endswith(".interval_low") for k in metrics)
        assert any(k.startswith(f"deletion.{method}.opponents.k") and k.endswith(".passed") for k in metrics)
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert {c.data.tags["stage"] for c in children} >= {"data", "pretrain", "finetune", "multistage", "influence", "tracin_we", "deletion"}

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/report.html" in artifacts and "report/attributions.csv" in artifacts
    local = Path(client.download_artifacts(run.info.run_id, "report", str(project / "downloaded")))
    rows = list(csv.DictReader(io.StringIO((local / "attributions.csv").read_text())))
    assert list(rows[0]) == list(COLUMNS)
    sources = {(r["source"], r["method"], r["mode"]) for r in rows}
    for mode in settings.finetune.modes:
        assert {("pretraining", "multistage", mode), ("finetuning", "influence", mode), ("finetuning", "tracin_we", mode)} <= sources
    k, n_queries = settings.attribution.top_k, settings.attribution.queries
    assert len(rows) == 3 * len(settings.finetune.modes) * n_queries * 2 * k
    page = (local / "report.html").read_text()
    assert page.count("<h2>Query ") == n_queries and "Case-deletion check" in page
