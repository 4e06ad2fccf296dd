"""The ``report`` stage: ranked tables, the HTML page, and the MLflow run that holds them.

The report shows what every stage that ran adds to it (:func:`flows.stages.entry.report_sections`: the
case-deletion verdicts, the LDS and mislabel sections, their figures, lines of the summary), in table order.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from flows.experiment.experiment import Experiment
from flows.stages import entry
from flows.definition.settings import PipelineSettings
from flows.definition.stage_table import NAMES, SCORE_STAGES
from flows.versioning.data_version import data_version, dataset_hashes, git_revision, verify_datasets
from flows.experiment.workspace import StageResult, Workspace, timed
from influence.storage import atomic_write

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell that starts so as a formula


def spreadsheet_safe(value):
    """``value`` as a CSV cell no spreadsheet evaluates: text that starts like a formula (and is not a number)
    gets a leading apostrophe, as OWASP recommends against CSV injection; numbers are left alone."""
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def _write_csv(rows: list[dict], path: Path) -> Path:
    from influence.reports.tables import COLUMNS

    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
    atomic_write(path, buffer.getvalue())
    return path


def _predictions(x: Experiment, mode: str) -> list[str]:
    """The predicted label name of each query by the finetuned model of ``mode``."""
    queries = x.split("queries")
    batch = torch.utils.data.default_collate([queries[i] for i in range(len(queries))])
    with torch.no_grad():
        predicted = x.query_task.outputs(x.finetuned(mode), batch).argmax(dim=1).tolist()
    return [x.label_names[p] for p in predicted]


def _modules(names: list[str]) -> str:
    """Parameter names as the modules that own them, in order (``bert.encoder.layer.5``, ``head``)."""
    return ", ".join(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else n for n in names))


def _model_summary(x: Experiment, results: dict) -> dict[str, str]:
    """The model family and the parameters each attribution looked at (the report says which subset)."""
    found = {"model family": x.read_json("features", "family.json").get("name", ""),
             "influence-function parameters": ", ".join(x.settings.attribution.if_params)}
    multistage = results.get("multistage")
    for mode, names in (multistage.info.get("parameters", {}) if multistage else {}).items():
        found[f"multi-stage parameters ({mode})"] = (f"pretrained: {_modules(names['shared'])}; finetuned: "
                                                     f"{_modules(names['finetune']) or 'none'}; pretraining Hessian over "
                                                     f"{x.settings.attribution.pretrain_hessian_params} parameters")
    return found


def run(settings: PipelineSettings, ws: Workspace, extra_tags: dict[str, str] | None = None, mlflow_run_id: str = "") -> StageResult:
    """Write ranked tables and the HTML report, and log the whole run to MLflow.

    Args:
        settings: the run's settings.
        ws: the workspace holding every earlier stage's outputs.
        extra_tags: more MLflow tags (for example the Prefect flow-run id).
        mlflow_run_id: the MLflow run the pipeline flow opened when it started; empty: a new one (``dvc repro``).
    """
    from flows.reporting.mlflow_runs import log_pipeline_run, run_url
    from influence.data.prepare import read_table
    from influence.reports.html import highlight_words, render_report
    from influence.reports.tables import join_examples, ranked_rows

    result = StageResult("report")
    x = Experiment.for_stage("report", settings, ws)
    with timed(result):
        verify_datasets(ws.root, ws.prepared, names=("pretrain", "finetune"))
        # run as every stage is (flows.incremental.stage_cache): in a fresh staging folder, so a method turned off since the last report
        # leaves no table, and the last complete report stays in place until this one is (MLflow down, disk full)
        out = x.out_dir()
        k = settings.attribution.top_k
        label = x.label_names
        pretrain_text = {r["id"]: {"text": r["text"], "label": ""} for r in read_table(x.dataset_path("pretrain"))}
        finetune_rows = {r["id"]: r for r in read_table(x.dataset_path("finetune"))}
        finetune_text = {i: {"text": r["text"], "label": label[int(r["label"])]} for i, r in finetune_rows.items()}
        query_ids = x.split("queries").ids
        train_ids = x.split("train").ids
        pretrain_ids = x.split("pretrain").ids
        predictions = {mode: _predictions(x, mode) for mode in settings.finetune.modes}
        queries = {
            qid: {"text": finetune_rows[qid]["text"], "label": label[int(finetune_rows[qid]["label"])],
                  "prediction": ", ".join(f"{m}: {predictions[m][i]}" for m in settings.finetune.modes)}
            for i, qid in enumerate(query_ids)
        }
        all_rows: list[dict] = []
        loaded: dict[str, np.ndarray] = {}  # "<title> (<mode>)" -> a sample of its [Q, N] scores, for the figures
        sections: dict[str, list[dict]] = {qid: [] for qid in query_ids}
        score_files: dict[str, dict[str, Path]] = {}  # every score matrix, logged with its ids
        score_ids: dict[str, dict[str, list[str]]] = {}
        for row in SCORE_STAGES:
            stage, source, title = row.name, row.source, row.title
            if not row.is_enabled(settings):  # turned off by its setting: no scores to show
                continue
            score_ids[stage] = {"queries": list(query_ids), "examples": list(pretrain_ids if source == "pretraining" else train_ids)}
            for mode in settings.finetune.modes:
                score_files.setdefault(stage, {})[mode] = x.path(stage, f"{mode}.safetensors")
                scores = x.scores(stage, mode)  # float32, one matrix at a time; the figures keep a bounded sample
                loaded[f"{title} ({mode})"] = figure_sample(scores)
                ids, texts = (pretrain_ids, pretrain_text) if source == "pretraining" else (train_ids, finetune_text)
                rows = join_examples(ranked_rows(scores, query_ids, ids, k=k, source=source, method=stage, mode=mode), texts, queries)
                module = entry.stage_module(stage)  # a stage with word-level terms shades them
                words = module.word_terms(x, mode) if hasattr(module, "word_terms") else {}
                _write_csv(rows, out / f"{stage}_{mode}.csv")
                all_rows.extend(rows)
                if not row.in_page:
                    continue
                for qid in query_ids:
                    section_rows = []
                    for r in rows:
                        if r["query_id"] != qid:
                            continue
                        terms = {w: t for w, t in words.get(f"{qid}|{r['id']}", [])}
                        section_rows.append(dict(r, text_html=highlight_words(r["text"], terms) if terms else ""))
                    sections[qid].append({"title": f"{title} — {source} examples, embedding {mode}", "rows": section_rows})
        _write_csv(all_rows, out / "attributions.csv")

        results = {s: StageResult.load(ws, s) for s in NAMES if (ws.artifacts / s / "result.json").is_file() and s != "report"}
        figures = write_figures(x, out / "figures", loaded)
        parts = entry.report_sections(x, results, out / "figures")  # each stage that ran: its rows, sections, figures
        deletion_rows = [row for part in parts for row in part.get("deletion", [])]
        evaluation = [section for part in parts for section in part.get("evaluation", [])]
        figures += [figure for part in parts for figure in part.get("figures", [])]
        hashes = dataset_hashes(ws.root)
        revision = git_revision(ws.root)
        version = data_version(ws.root)
        summary = {"git revision": revision, "settings digest": settings.digest(),
                   "data version": f"{version['rev']} (commit {version['commit'][:12]})"}
        sources = results["data"].info.get("sources", {}) if "data" in results and version["rev"] == "workspace" else {}
        for name, source in sources.items():  # your own files, when the data stage read them
            summary[f"{name} data"] = f"{source['path']} (md5 {source['md5']})"
        summary["classes"] = ", ".join(label)
        summary.update(_model_summary(x, results))
        for mode in settings.finetune.modes:
            summary[f"test accuracy ({mode})"] = results["finetune"].metrics.get(f"{mode}.accuracy_test", float("nan"))
        for part in parts:
            summary.update(part.get("summary", {}))
        summary.update({f"{s} seconds": r.seconds for s, r in results.items()})
        html = render_report({
            "title": "Training-data attribution report", "summary": summary, "data_versions": hashes,
            "settings": stages_settings_flat(settings), "deletion": deletion_rows,
            "evaluation": evaluation,
            "figures": [{"title": title, "caption": caption, "png": path.read_bytes()} for title, caption, path in figures],
            "queries": [{"id": q, **queries[q], "sections": sections[q]} for q in query_ids],
        })
        atomic_write(out / "report.html", html)
        tags = {"git_revision": revision, "settings_digest": settings.digest(),
                "data_rev": version["rev"], "data_commit": version["commit"],
                **{f"data.{name}.md5": h for name, h in hashes.items()},
                **{f"data.source.{name}": f"{src['path']} md5 {src['md5']}" for name, src in sources.items()}, **(extra_tags or {})}
        run_id, experiment_id, uri = log_pipeline_run(
            settings, ws.root, results, out, tags, run_name=extra_tags.get("run_name") if extra_tags else None,
            run_id=mlflow_run_id, scores=score_files, ids=score_ids)
        result.info = {"mlflow_run_id": run_id, "mlflow_experiment_id": experiment_id, "mlflow_url": run_url(uri, experiment_id, run_id), "tags": tags}
        result.outputs = {"report": str((out / "report.html").relative_to(ws.root))}
        result.metrics["rows"] = float(len(all_rows))
    result.save(ws)
    return result


FIGURE_SAMPLE = 1_000_000  # (query, example) pairs of each score matrix that the figures read


def figure_sample(scores: torch.Tensor) -> np.ndarray:
    """The scores the figures read: all of ``scores`` ``[Q, N]`` up to :data:`FIGURE_SAMPLE` entries, else
    that many drawn with a fixed seed (the same positions for matrices of one shape, so that rank
    correlations compare the same pairs); float64 ``[min(Q N, FIGURE_SAMPLE)]``."""
    flat = scores.reshape(-1)
    if flat.numel() > FIGURE_SAMPLE:
        positions = torch.randint(flat.numel(), (FIGURE_SAMPLE,), generator=torch.Generator().manual_seed(0))
        flat = flat[positions]
    return flat.double().numpy()


SCORES_CAPTION = ("Histogram of every method's scores (log counts; a seeded sample of 1,000,000 (query, example) pairs "
                  "where there are more); positive = proponent.")


def write_figures(x: Experiment, folder: Path, scores: dict[str, np.ndarray]) -> list[tuple[str, str, Path]]:
    """The report's own PNG figures: score distributions and method agreement per mode (the stages add theirs:
    :func:`flows.stages.entry.report_sections`).

    Args:
        x: the report stage's experiment.
        scores: ``{"<title> (<mode>)": sample}`` every score matrix of the score stages, as :func:`figure_sample` draws it.

    Returns:
        ``[(title, caption, path)]`` of the figures written.
    """
    from flows.reporting import figures

    written = [("Score distributions", SCORES_CAPTION, figures.score_distribution(scores, folder / "scores.png"))]
    for mode in x.settings.finetune.modes:
        same = {row.title: scores[f"{row.title} ({mode})"] for row in SCORE_STAGES
                if row.source == "finetuning" and f"{row.title} ({mode})" in scores}
        if len(same) >= 2:
            written.append((f"Agreement between methods (embedding {mode})",
                            "Spearman rank correlation between the methods' scores of the same (query, training example) pairs (the figures' sample).",
                            figures.method_agreement(same, folder / f"agreement_{mode}.png")))
    return written


def stages_settings_flat(settings: PipelineSettings) -> dict[str, object]:
    """Settings flattened to ``section.field -> value`` for display."""
    flat = {}
    for section, values in settings.model_dump(mode="json").items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    return flat
