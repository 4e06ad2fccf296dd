"""The report's MLflow run is logged once per flow run, however often its task is retried."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.definition.settings import PipelineSettings
from flows.reporting.mlflow_runs import log_pipeline_run
from flows.experiment.workspace import StageResult


def test_a_retried_report_leaves_one_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    settings = PipelineSettings()
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text("<html>report</html>")
    (report / "attributions.csv").write_text("query_id,id,score,text\n007,12,0.5,a film\n007,3,-0.25,'=1+1\n")
    tags = {"prefect_flow_run_id": "run-1234", "run_name": "bold-fox"}
    good = {"pretrain": StageResult("pretrain", seconds=1.0, metrics={"loss": 0.5})}
    broken = {**good, "finetune": StageResult("finetune", metrics={"accuracy": "not a number"})}
    with pytest.raises(ValueError):  # the first attempt fails half-way: the parent run and a child are logged
        log_pipeline_run(settings, tmp_path, broken, report, tags, run_name="bold-fox")
    run_id, experiment_id, uri = log_pipeline_run(settings, tmp_path, good, report, tags, run_name="bold-fox")
    again, _, _ = log_pipeline_run(settings, tmp_path, good, report, tags, run_name="bold-fox")  # a retry after success
    assert again == run_id
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([experiment_id], filter_string="tags.prefect_flow_run_id = 'run-1234'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [run_id] and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags.get("stage", "") for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id) == ["pretrain"]
    assert all(r.info.status == "FINISHED" for r in runs)
    # the report's tables as MLflow reads a table that log_table wrote (what the UI's table view shows)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # load_table searches the default store
    table = client.load_table(experiment_id, "tables/attributions.json", run_ids=[run_id])
    assert table["score"].tolist() == [0.5, -0.25] and table["text"].tolist() == ["a film", "'=1+1"]
    stored = json.loads(Path(client.download_artifacts(run_id, "tables/attributions.json", str(tmp_path))).read_text())
    assert stored == {"columns": ["query_id", "id", "score", "text"], "data": [["007", "12", 0.5, "a film"], ["007", "3", -0.25, "'=1+1"]]}
    child = next(r for r in runs if r.data.tags.get("stage") == "pretrain")
    assert child.data.metrics == {"loss": 0.5} and child.data.tags["run_name"] == "bold-fox"
    assert {a.path for a in client.list_artifacts(run_id, "report")} == {"report/report.html", "report/attributions.csv"}
    other, _, _ = log_pipeline_run(settings, tmp_path, good, report, {**tags, "prefect_flow_run_id": "run-5678"})
    assert other != run_id  # another flow run: its own MLflow run
