"""Prefect artifacts of a pipeline run: a link to its MLflow run, a markdown summary and a table.

The content comes from the workspace the run left (stage results, ``artifacts/report/*.csv``,
``artifacts/deletion/deletion.json``); :func:`summary_markdown` and :func:`proponent_table` are
plain functions, :func:`publish` hands them to Prefect.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from flows.definition.settings import PipelineSettings
from flows.experiment.workspace import StageResult, Workspace

SUMMARY_QUERIES = 3  # queries whose top proponents the markdown summary shows
SUMMARY_ROWS = 3  # proponents shown per query and source
TABLE_ROWS = 200  # rows of the table artifact (the full tables are in MLflow)


def _attributions(ws: Workspace) -> list[dict]:
    path = ws.artifacts / "report" / "attributions.csv"
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_{}[]()#+-.!|~"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"})


def _short(text: str, width: int = 90) -> str:
    """``text`` on one line, at most ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown_text(text: str, width: int = 90) -> str:
    """Dataset text made inert for the markdown summary: one line, shortened, every markdown and HTML character
    escaped (a review cannot add links, images, tables or tags to the page)."""
    return _short(text, width).translate(_MARKDOWN_SPECIAL)


def deletion_verdicts(ws: Workspace, stage: str = "deletion") -> list[dict]:
    """Rows of a case-deletion check (``artifacts/<stage>/deletion.json``), ``[]`` when it did not run."""
    path = ws.artifacts / stage / "deletion.json"
    ran = path.is_file() and not StageResult.load(ws, stage).info.get("disabled")
    return json.loads(path.read_text()) if ran else []


def _evidence_lines(ws: Workspace) -> list[str]:
    """The pretraining case deletion, LDS and mislabel-detection results, when those stages ran."""
    lines = []
    pretraining = deletion_verdicts(ws, "pretrain_deletion")
    if pretraining:
        lines += ["", "Pretraining data (multi-stage scores; pretraining and finetuning re-run):", ""]
        lines += [f"- {c['method']}, embedding {c.get('mode', '')}, {c['kind']}, k={c['k']}: change beyond random "
                  f"{c['difference']:+.4f}, 95% interval [{c['interval_low']:.4f}, {c['interval_high']:.4f}], "
                  f"{'**pass**' if c['passed'] else 'fail'}" for c in pretraining]
    for stage, render in (
        ("lds", lambda r: "LDS: " + ", ".join(f"{m} {v['lds']:.3f}" for m, v in r["methods"].items())),
        ("mislabel", lambda r: f"Mislabel detection ({r['method']} self-influence): AUC {r['curve']['auc']:.3f} "
                               f"vs {r['curve']['random_auc']:.3f} for a random order"),
    ):
        path = ws.artifacts / stage / f"{stage}.json"
        if path.is_file() and not StageResult.load(ws, stage).info.get("disabled"):
            lines += ["", render(json.loads(path.read_text()))]
    return lines


def summary_markdown(settings: PipelineSettings, ws: Workspace, mlflow_url: str, skipped: list[str]) -> str:
    """The run's summary for the Prefect UI: accuracy, the verdict, a few queries' top proponents.

    Args:
        settings: the run's settings.
        ws: the workspace the run wrote.
        mlflow_url: the MLflow run's page.
        skipped: stages skipped because their inputs were unchanged.
    """
    finetune = StageResult.load(ws, "finetune")
    lines = ["# Training-data attribution", "", f"Full report: [MLflow run]({mlflow_url}) (artifact `report/report.html`).", ""]
    lines += ["| embedding | test accuracy |", "| --- | --- |"]
    lines += [f"| {m} | {finetune.metrics.get(f'{m}.accuracy_test', float('nan')):.3f} |" for m in settings.finetune.modes]
    lines += ["", f"Stages skipped (inputs unchanged): {', '.join(skipped) if skipped else 'none'}.", ""]
    verdicts = deletion_verdicts(ws)
    lines += [f"## Case-deletion check (embedding {settings.evaluation.mode})", ""]
    if verdicts:
        lines += ["Mean change of the query loss beyond removing k random examples, with its 95% interval; "
                  "a method passes when removing its proponents raises the loss (interval above 0) or removing "
                  "its opponents lowers it (interval below 0).", ""]
        lines += ["| method | removed | k | change beyond random | 95% interval | verdict |", "| --- | --- | --- | --- | --- | --- |"]
        for c in verdicts:
            verdict = "**pass**" if c["passed"] else "fail"
            lines.append(f"| {c['method']} | {c['kind']} | {c['k']} | {c['difference']:+.4f} | "
                         f"[{c['interval_low']:.4f}, {c['interval_high']:.4f}] | {verdict} |")
    else:
        lines.append("Not run (evaluation.enabled is false).")
    lines += _evidence_lines(ws)
    rows = _attributions(ws)
    queries = list(dict.fromkeys(r["query_id"] for r in rows))[:SUMMARY_QUERIES]
    lines += ["", "## Top proponents", "", "Positive score = proponent: removing it would raise the query's loss.", ""]
    for qid in queries:
        mine = [r for r in rows if r["query_id"] == qid and r["kind"] == "proponent"]
        if not mine:
            continue
        first = mine[0]
        lines += [f"### {markdown_text(qid)} ({markdown_text(first['query_label'])}; predicted {markdown_text(first['query_prediction'])})",
                  "", f"> {markdown_text(first['query_text'], 200)}", ""]
        lines += ["| source | method | mode | rank | example | score |", "| --- | --- | --- | --- | --- | --- |"]
        for r in mine:
            if int(r["rank"]) <= SUMMARY_ROWS:
                lines.append(f"| {r['source']} | {r['method']} | {r['mode']} | {r['rank']} | {markdown_text(r['text'])} | {float(r['score']):.3g} |")
        lines.append("")
    return "\n".join(lines)


def proponent_table(ws: Workspace, limit: int = TABLE_ROWS) -> list[dict]:
    """The first ``limit`` rows of ``attributions.csv`` (texts shortened) for a Prefect table artifact."""
    keep = ("query_id", "source", "method", "mode", "kind", "rank", "id", "label", "score", "text")
    return [{k: (_short(r[k]) if k == "text" else r[k]) for k in keep} for r in _attributions(ws)[:limit]]


def publish(settings: PipelineSettings, root: Path, report: StageResult, skipped: list[str]) -> list[str]:
    """Create the run's Prefect artifacts; return their keys.

    Args:
        settings: the run's settings.
        root: the project folder.
        report: the report stage's result (its ``info`` holds the MLflow run's address).
        skipped: stages skipped because their inputs were unchanged.
    """
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    ws = Workspace(root)
    url = report.info["mlflow_url"]
    create_link_artifact(url, link_text=f"MLflow run {report.info['mlflow_run_id']}", key="mlflow-run",
                         description="The report of this run in the MLflow UI.")
    create_markdown_artifact(summary_markdown(settings, ws, url, skipped), key="attribution-summary",
                             description="Accuracy, the case-deletion verdict and the top proponents of a few queries.")
    create_table_artifact(proponent_table(ws), key="attributions",
                          description=f"Top proponents and opponents (first {TABLE_ROWS} rows; all of them are in MLflow).")
    return ["mlflow-run", "attribution-summary", "attributions"]
