"""The report stage: ranked tables, the HTML page, and the MLflow run that holds them."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from safetensors.torch import load_file

from flows import stages
from flows.settings import PipelineSettings
from flows.versioning import dataset_hashes, git_revision, verify_datasets
from flows.workspace import STAGES, StageResult, Workspace, timed

LABELS = {"1": "fresh", "0": "rotten", 1: "fresh", 0: "rotten"}
SCORE_STAGES = (("multistage", "pretraining", "multi-stage influence"), ("influence", "finetuning", "influence function"),
                ("tracin_we", "finetuning", "TracIn-WE"))


def _write_csv(rows: list[dict], path: Path) -> Path:
    from influence.reports.tables import COLUMNS

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _predictions(settings: PipelineSettings, ws: Workspace, mode: str) -> list[str]:
    model = stages.finetuned_model(settings, ws, mode)
    queries = stages.load_split(ws, "queries")
    batch = torch.utils.data.default_collate([queries[i] for i in range(len(queries))])
    with torch.no_grad():
        predicted = model(batch["tokens"]).argmax(dim=1).tolist()
    return [LABELS[p] for p in predicted]


def build_report(settings: PipelineSettings, ws: Workspace, extra_tags: dict[str, str] | None = None) -> StageResult:
    """Write ranked tables and the HTML report, and log the whole run to MLflow.

    Args:
        settings: the run's settings.
        ws: the workspace holding every earlier stage's outputs.
        extra_tags: more MLflow tags (for example the Prefect flow-run id).
    """
    from influence.data.prepare import read_table
    from influence.reports.html import highlight_words, render_report
    from influence.reports.tables import join_examples, ranked_rows

    from flows.tracking import log_pipeline_run

    result = StageResult("report")
    with timed(result):
        verify_datasets(ws.root, ws.prepared, names=("pretrain", "finetune"))
        out = ws.stage_dir("report")
        k = settings.attribution.top_k
        pretrain_text = {r["id"]: {"text": r["text"], "label": ""} for r in read_table(ws.dataset("pretrain"))}
        finetune_rows = {r["id"]: r for r in read_table(ws.dataset("finetune"))}
        finetune_text = {i: {"text": r["text"], "label": LABELS[r["label"]]} for i, r in finetune_rows.items()}
        query_ids = stages.load_split(ws, "queries").ids
        train_ids = stages.load_split(ws, "train").ids
        pretrain_ids = stages.load_split(ws, "pretrain").ids
        predictions = {mode: _predictions(settings, ws, mode) for mode in settings.finetune.modes}
        queries = {
            qid: {"text": finetune_rows[qid]["text"], "label": LABELS[finetune_rows[qid]["label"]],
                  "prediction": ", ".join(f"{m}: {predictions[m][i]}" for m in settings.finetune.modes)}
            for i, qid in enumerate(query_ids)
        }
        all_rows: list[dict] = []
        sections: dict[str, list[dict]] = {qid: [] for qid in query_ids}
        for stage, source, title in SCORE_STAGES:
            for mode in settings.finetune.modes:
                scores = load_file(str(ws.artifacts / stage / f"{mode}.safetensors"))["scores"]
                ids, texts = (pretrain_ids, pretrain_text) if source == "pretraining" else (train_ids, finetune_text)
                rows = join_examples(ranked_rows(scores, query_ids, ids, k=k, source=source, method=stage, mode=mode), texts, queries)
                words = stages._load_json(ws.artifacts / "tracin_we" / f"{mode}_words.json") if stage == "tracin_we" else {}
                _write_csv(rows, out / f"{stage}_{mode}.csv")
                all_rows.extend(rows)
                for qid in query_ids:
                    section_rows = []
                    for r in rows:
                        if r["query_id"] != qid:
                            continue
                        terms = {w: t for w, t in words.get(f"{qid}|{r['id']}", [])}
                        section_rows.append(dict(r, text_html=highlight_words(r["text"], terms) if terms else ""))
                    sections[qid].append({"title": f"{title} — {source} examples, embedding {mode}", "rows": section_rows})
        _write_csv(all_rows, out / "attributions.csv")

        results = {s: StageResult.load(ws, s) for s in STAGES if (ws.artifacts / s / "result.json").is_file() and s != "report"}
        deletion_rows = []
        if "deletion" in results and not results["deletion"].info.get("skipped"):
            for c in stages._load_json(ws.artifacts / "deletion" / "deletion.json"):
                deletion_rows.append({
                    "method": c["method"], "mode": settings.evaluation.mode, "removed": c["kind"],
                    "k": f"{c['k']} ({100 * c['fraction']:.1f}%)", "mean_top": c["mean_top"], "mean_random": c["mean_random"],
                    "difference": c["difference"], "interval_95": f"[{c['interval_low']:.4g}, {c['interval_high']:.4g}]",
                    "passed": c["passed"],
                })
        hashes = dataset_hashes(ws.root)
        revision = git_revision(ws.root)
        summary = {"git revision": revision, "settings digest": settings.digest()}
        for mode in settings.finetune.modes:
            summary[f"test accuracy ({mode})"] = results["finetune"].metrics.get(f"{mode}.accuracy_test", float("nan"))
        summary.update({f"{s} seconds": r.seconds for s, r in results.items()})
        html = render_report({
            "title": "Training-data attribution report", "summary": summary, "data_versions": hashes,
            "settings": stages_settings_flat(settings), "deletion": deletion_rows,
            "queries": [{"id": q, **queries[q], "sections": sections[q]} for q in query_ids],
        })
        (out / "report.html").write_text(html)
        tags = {"git_revision": revision, "settings_digest": settings.digest(),
                **{f"data.{name}.md5": h for name, h in hashes.items()}, **(extra_tags or {})}
        run_id = log_pipeline_run(settings, ws.root, results, out, tags, run_name=extra_tags.get("run_name") if extra_tags else None)
        result.info = {"mlflow_run_id": run_id, "tags": tags}
        result.outputs = {"report": str((out / "report.html").relative_to(ws.root))}
        result.metrics["rows"] = float(len(all_rows))
    result.save(ws)
    return result


def stages_settings_flat(settings: PipelineSettings) -> dict[str, object]:
    """Settings flattened to ``section.field -> value`` for display."""
    flat = {}
    for section, values in settings.model_dump(mode="json").items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat
