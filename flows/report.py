"""The report stage: ranked tables, the HTML page, and the MLflow run that holds them."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from flows.experiment import Experiment
from flows.settings import PipelineSettings
from flows.stage_table import NAMES, SCORE_STAGES
from flows.versioning import data_version, dataset_hashes, git_revision, verify_datasets
from flows.workspace import StageResult, Workspace, timed
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


CONVERGED_CHANGE = 0.01  # a pretraining loss still moving by more than 1% in its last epoch is no optimum


def pretraining_convergence(pretrain: StageResult | None) -> dict[str, str]:
    """The report's line on how near pretraining ended to an optimum: the relative change of its training loss
    over the last epoch (``pretrain`` records ``loss_epoch_<i>``). The multi-stage influence function's
    pretraining half assumes an optimum (docs/multistage.md); multi-stage MAGIC assumes none. ``{}`` with fewer
    than two epochs."""
    epochs = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in (pretrain.metrics if pretrain else {}).items()
                    if k.startswith("loss_epoch_"))
    if len(epochs) < 2 or not epochs[-2][1]:
        return {}
    change = (epochs[-1][1] - epochs[-2][1]) / abs(epochs[-2][1])
    verdict = ("near an optimum, as the multi-stage influence function assumes" if abs(change) <= CONVERGED_CHANGE else
               "far from an optimum: the multi-stage influence function's premise does not hold here, "
               "multi-stage MAGIC (attribution.multistage_magic) assumes none")
    return {"pretraining loss change in its last epoch": f"{100 * change:+.2f}% ({verdict})"}


def build_report(settings: PipelineSettings, ws: Workspace, extra_tags: dict[str, str] | None = None) -> StageResult:
    """Write ranked tables and the HTML report, and log the whole run to MLflow.

    Args:
        settings: the run's settings.
        ws: the workspace holding every earlier stage's outputs.
        extra_tags: more MLflow tags (for example the Prefect flow-run id).
    """
    from flows.tracking import log_pipeline_run, run_url
    from influence.data.prepare import read_table
    from influence.reports.html import highlight_words, render_report
    from influence.reports.tables import join_examples, ranked_rows

    result = StageResult("report")
    x = Experiment.for_stage("report", settings, ws)
    with timed(result):
        verify_datasets(ws.root, ws.prepared, names=("pretrain", "finetune"))
        # run as every stage is (flows.stage_cache): in a fresh staging folder, so a method turned off since the last report
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
        for row in SCORE_STAGES:
            stage, source, title = row.name, row.source, row.title
            if not row.is_enabled(settings):  # turned off by its setting: no scores to show
                continue
            for mode in settings.finetune.modes:
                scores = x.scores(stage, mode)  # float32, one matrix at a time; the figures keep a bounded sample
                loaded[f"{title} ({mode})"] = figure_sample(scores)
                ids, texts = (pretrain_ids, pretrain_text) if source == "pretraining" else (train_ids, finetune_text)
                rows = join_examples(ranked_rows(scores, query_ids, ids, k=k, source=source, method=stage, mode=mode), texts, queries)
                words = x.read_json("tracin_we", f"{mode}_words.json") if stage == "tracin_we" else {}
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
        deletion_rows = []
        for stage, data in (("deletion", "finetuning"), ("pretrain_deletion", "pretraining")):
            if stage not in results or results[stage].info.get("disabled"):
                continue
            for c in x.read_json(stage, "deletion.json"):
                deletion_rows.append({
                    "data": data, "method": c["method"], "mode": c.get("mode", settings.evaluation.mode), "removed": c["kind"],
                    "k": f"{c['k']} ({100 * c['fraction']:.1f}%)", "mean_top": c["mean_top"], "mean_random": c["mean_random"],
                    "difference": c["difference"], "interval_95": f"[{c['interval_low']:.4g}, {c['interval_high']:.4g}]",
                    "probability_top": c.get("extra_mean_top", float("nan")),
                    "probability_random": c.get("extra_mean_random", float("nan")),
                    "passed": c["passed"],
                })
        evaluation = evaluation_sections(x, results)
        figures = write_figures(x, results, out / "figures", loaded)
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
        if _ran(results, "multistage"):
            summary.update(pretraining_convergence(results.get("pretrain")))
        for mode in settings.finetune.modes:
            summary[f"test accuracy ({mode})"] = results["finetune"].metrics.get(f"{mode}.accuracy_test", float("nan"))
        summary.update({f"{s} seconds": r.seconds for s, r in results.items()})
        if "magic" in results and "finetune" in results and results["finetune"].seconds > 0:  # both stages: every mode
            summary["MAGIC cost (finetuning runs)"] = round(results["magic"].seconds / results["finetune"].seconds, 2)
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
            settings, ws.root, results, out, tags, run_name=extra_tags.get("run_name") if extra_tags else None
        )
        result.info = {"mlflow_run_id": run_id, "mlflow_experiment_id": experiment_id, "mlflow_url": run_url(uri, experiment_id, run_id), "tags": tags}
        result.outputs = {"report": str((out / "report.html").relative_to(ws.root))}
        result.metrics["rows"] = float(len(all_rows))
    result.save(ws)
    return result


def _ran(results: dict[str, StageResult], stage: str) -> bool:
    """Whether ``stage`` ran in this workspace and was not turned off by its settings."""
    return stage in results and not results[stage].info.get("disabled")


def evaluation_sections(x: Experiment, results: dict[str, StageResult]) -> list[dict]:
    """The report's LDS and mislabel-detection sections (``[]`` for a stage that did not run)."""
    sections = []
    if _ran(results, "lds"):
        found = x.read_json("lds", "lds.json")
        small = found.get("small")
        half_name = f"LDS ({100 * found['fraction']:.0f}% subsets)"
        small_name = f"LDS ({100 * small['removed'][0]:g}-{100 * small['removed'][1]:g}% removed)" if small else None
        rows = []
        for m, v in found["methods"].items():
            row = {"method": m, half_name: v["lds"], "per query": ", ".join(f"{x:.2f}" for x in v["per_query"])}
            if small:
                row[small_name] = v["lds_small"]
                row["per query (small removals)"] = ", ".join(f"{x:.2f}" for x in v["per_query_small"])
            rows.append(row)
        text = (f"{found['subsets']} random subsets of {100 * found['fraction']:.0f}% of the finetuning train split"
                + (f", and {small['subsets']} that each leave out {100 * small['removed'][0]:g}% to {100 * small['removed'][1]:g}% "
                   "of it (the small-removal protocol of the MAGIC paper, where a first-order prediction is meant to hold)"
                   if small else "")
                + f", each retrained with {found['seeds']} seed(s); per query, the Spearman correlation between the loss "
                  f"a method's scores predict for each subset (plus the sum of the scores of the examples it leaves out) "
                  f"and the loss measured after retraining, averaged over {found['queries']} queries. "
                  "1 = the method ranks the subsets exactly as retraining does; 0 = no better than chance.")
        columns = ["method", half_name] + ([small_name] if small else []) + ["per query"] + (["per query (small removals)"] if small else [])
        sections.append({"title": "Linear datamodeling score", "text": text, "rows": rows, "columns": columns})
    if _ran(results, "mislabel"):
        found = x.read_json("mislabel", "mislabel.json")
        curve = found["curve"]
        rows = []
        for share in (0.05, 0.1, 0.2, 0.3):
            i = min(range(len(curve["inspected"])), key=lambda j: abs(curve["inspected"][j] - share))
            rows.append({"inspected": f"{100 * curve['inspected'][i]:.0f}%", "flipped labels found": curve["found"][i],
                         "random order": curve["random_found"][i]})
        sections.append({
            "title": "Mislabel detection",
            "text": f"{curve['n_flipped']} of {curve['n_examples']} finetuning labels ({100 * found['fraction']:.0f}%) were "
                    f"flipped at random and the model retrained on them; inspecting the training examples by decreasing "
                    f"self-influence ({found['method']}) finds the flipped ones at the rates below. "
                    f"Area under the curve {curve['auc']:.3f} (random order {curve['random_auc']:.3f}).",
            "rows": rows, "columns": ["inspected", "flipped labels found", "random order"],
        })
    return sections


FIGURE_CAPTIONS = {
    "scores": ("Score distributions", "Histogram of every method's scores (log counts; a seeded sample of 1,000,000 (query, example) pairs where there are more); positive = proponent."),
    "deletion": ("Case-deletion curves", "Mean change of the query loss after removing each query's top-k examples, "
                 "against k, for each method and for k random examples (bars: 95% intervals; hollow: not passed)."),
    "mislabel": ("Mislabel detection", "Share of the planted label flips found while inspecting the training set "
                 "in decreasing order of self-influence, against a random order."),
}


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


def write_figures(x: Experiment, results: dict[str, StageResult], folder: Path,
                  scores: dict[str, np.ndarray]) -> list[tuple[str, str, Path]]:
    """The report's PNG figures: score distributions, method agreement per mode, deletion and mislabel curves.

    Args:
        x: the report stage's experiment.
        results: every stage's result (a figure of a stage that did not run is left out).
        scores: ``{"<title> (<mode>)": sample}`` every score matrix of the score stages, as :func:`figure_sample` draws it.

    Returns:
        ``[(title, caption, path)]`` of the figures written (a figure whose stage did not run is left out).
    """
    from flows import figures

    written = []
    written.append((*FIGURE_CAPTIONS["scores"], figures.score_distribution(scores, folder / "scores.png")))
    for mode in x.settings.finetune.modes:
        same = {row.title: scores[f"{row.title} ({mode})"] for row in SCORE_STAGES
                if row.source == "finetuning" and f"{row.title} ({mode})" in scores}
        if len(same) >= 2:
            written.append((f"Agreement between methods (embedding {mode})",
                            "Spearman rank correlation between the methods' scores of the same (query, training example) pairs (the figures' sample).",
                            figures.method_agreement(same, folder / f"agreement_{mode}.png")))
    for stage, name, data in (("deletion", "deletion", "finetuning"), ("pretrain_deletion", "deletion_pretraining", "pretraining")):
        if _ran(results, stage):
            title, caption = FIGURE_CAPTIONS["deletion"]
            rows = x.read_json(stage, "deletion.json")
            if len({row.get("mode") for row in rows}) > 1:  # the pretraining check of several modes: a line per method and mode
                rows = [dict(row, method=f"{row['method']} ({row['mode']})") for row in rows]
            written.append((f"{title} ({data} data)", caption, figures.deletion_curves(rows, folder / f"{name}.png")))
    if _ran(results, "mislabel"):
        found = x.read_json("mislabel", "mislabel.json")
        written.append((*FIGURE_CAPTIONS["mislabel"], figures.mislabel_curve(found["curve"], folder / "mislabel.png", label=found["method"])))
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
