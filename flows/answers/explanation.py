"""Explain new sentences with the indexes a pipeline run left: the library calls of the ``explain`` flow.

The pipeline's ``influence`` stage leaves, per embedding mode, an attribution index of the
finetuning examples (``artifacts/influence/<mode>/index``, with a solver that keeps its state:
``attribution.solver`` exact, arnoldi or ekfac) and its ``multistage`` stage an index of the
pretraining sentences (``artifacts/multistage/pretrain_index``, with ``attribution.pretrain_solver``
arnoldi or ekfac). Where a run's solver keeps no state (conjugate gradient, the default of the
finetuning side), the first explanation fits an Arnoldi index into ``artifacts/explain/`` (the
Arnoldi settings of ``attribution``) and later ones reuse it only while every argument of the fit is the
same (the model, the data, the solver's settings, the regulariser's settings: ``fit.json`` beside it,
and the index's own manifest); any difference refits it. Every index is checked against its shards'
sha256 once when it is loaded. The explain flow holds the workspace while it reads and writes
(:mod:`flows.guards.workspace_lock`). A new sentence is tokenised with the run's tokenizer and labelled with the
finetuned model's own prediction (what is explained is why the model said that: the measurement
of ``attribution.measurement`` at the predicted class). Its finetuning attribution is one gradient
and one pass over the stored rows; its pretraining attribution adds the finetuning half of
multi-stage influence (one solve with ``attribution.multistage_solver``) and one pass over the
pretraining rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult, Workspace

MAX_TEXTS = 50
MAX_K = 100  # proponents and opponents per sentence and source (attribution.top_k's bound)
FIT_ARGUMENTS = "fit.json"


def parse_texts(texts: str) -> list[str]:
    """The non-empty lines of the form's text (one query per line), at most :data:`MAX_TEXTS`."""
    from influence.exceptions import invalid

    lines = [line.strip() for line in str(texts).splitlines() if line.strip()]
    if not lines:
        raise invalid("texts", texts, "at least one non-empty line (one sentence to explain per line)")
    if len(lines) > MAX_TEXTS:
        raise invalid("texts", f"{len(lines)} lines", f"at most {MAX_TEXTS} lines per run")
    return lines


def resolve_model(ws: Workspace, model: str) -> str:
    """The MLflow run id whose models the workspace holds, checked against ``model`` (``"latest"`` or a run id)."""
    from influence.exceptions import invalid

    report = ws.artifacts / "report" / "result.json"
    latest = StageResult.load(ws, "report").info.get("mlflow_run_id", "") if report.is_file() else ""
    if model in ("", "latest"):
        return latest
    if model != latest:
        raise invalid("model", model, f"'latest' or the MLflow run id of the workspace's last pipeline run "
                      f"({latest or 'none yet'}): the workspace holds that run's models and indexes only; "
                      "re-run the pipeline with the settings of the run you want first")
    return latest


def check_k(k: Any) -> int:
    """``k`` when it is an integer from 1 to :data:`MAX_K`; raise naming it otherwise."""
    from influence.exceptions import invalid

    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise invalid("k", k, f"an integer from 1 to {MAX_K} (proponents and opponents per sentence and source)")
    return k


def _reused_or_fitted(folder: Path, arguments: dict[str, Any], fit: Any) -> Any:
    """The complete index in ``folder`` when it was fitted with ``arguments`` (``fit.json``) and its own manifest's
    fields (model, data, solver) equal those of this fit, its shards verified; else ``fit(overwrite)`` anew."""
    import json

    from influence.exceptions import CacheMismatchError, CorruptedArtifactError
    from influence.storage import write_json

    recorded = folder.parent / f"{folder.name}.{FIT_ARGUMENTS}"
    same = recorded.is_file() and json.loads(recorded.read_text()) == json.loads(json.dumps(arguments))
    index = None
    if same:
        try:  # the library compares every field it records; an index with all its shards is reopened, not refitted
            index = fit(False)
            index.store.verify()
        except (CacheMismatchError, CorruptedArtifactError):
            index = None
    if index is None:
        recorded.unlink(missing_ok=True)
        index = fit(True)
        write_json(recorded, arguments)
    return index


def _fit_arguments(x: Experiment, mode: str | None) -> dict[str, Any]:
    """What an index of ``artifacts/explain`` depends on beyond its own manifest: the settings of the solver, the
    Hessian sample, the regularisers and the parameters (for ``mode``'s finetuned model; None: the pretraining)."""
    s = x.settings
    return {"mode": mode, "seed": s.seed, "attribution": s.attribution.model_dump(mode="json"),
            "finetune": s.finetune.model_dump(mode="json"), "pretrain": s.pretrain.model_dump(mode="json")}


def indexes(x: Experiment, mode: str) -> dict[str, Any]:
    """The finetuning index of ``mode`` and the pretraining index, loaded: those the pipeline's stages
    left, or (when the run's solver keeps no state, e.g. conjugate gradient) ones fitted here once
    into ``artifacts/explain/`` with Arnoldi and reused while the models are the same."""
    from influence.index import STATEFUL_SOLVERS, AttributionIndex

    a, found = x.settings.attribution, {}
    stage_index = x.path("influence", mode, "index")
    if a.solver in STATEFUL_SOLVERS and (stage_index / "manifest.json").is_file():
        found["finetuning"] = AttributionIndex.load(stage_index, device=x.device, verify=True)
    else:
        model, train = x.finetuned(mode), x.split("train")
        solver = x.solver("finetune") if a.solver in STATEFUL_SOLVERS else x.solver("self_influence")
        folder = x.ws.artifacts / "explain" / mode / "index"
        found["finetuning"] = _reused_or_fitted(folder, _fit_arguments(x, mode), lambda overwrite: AttributionIndex.fit(
            folder, x.query_task, model, train, params=a.if_params, **solver, regularizer=x.regularizer(mode, model),
            hessian_data=x.hessian_sample(train, a.hessian_examples), batch_size=x.batch(256), device=x.device,
            overwrite=overwrite))
    stage_index = x.path("multistage", "pretrain_index")
    if a.pretrain_solver in STATEFUL_SOLVERS and (stage_index / "manifest.json").is_file():
        found["pretraining"] = AttributionIndex.load(stage_index, device=x.device, verify=True)
    else:
        pretrained, sentences = x.pretrained(), x.split("pretrain")
        shared = list(x.multistage_shared(x.finetuned(mode)).values())
        pt = x.solver("pretrain")
        if pt["solver"] not in STATEFUL_SOLVERS:
            pt = {**pt, "solver": "arnoldi", "solver_options": {"n_iterations": a.arnoldi_iterations, "top_k": a.arnoldi_rank,
                                                                 "seed": x.settings.seed, "gauss_newton": a.pretrain_gauss_newton,
                                                                 "complement": a.arnoldi_complement}}
        folder = x.ws.artifacts / "explain" / "pretrain_index"
        found["pretraining"] = _reused_or_fitted(folder, _fit_arguments(x, None), lambda overwrite: AttributionIndex.fit(
            folder, x.pretrain_task, pretrained, sentences, params="all" if a.pretrain_hessian_params == "all" else shared,
            **pt, regularizer=x.pretrain_regularizer(), hessian_data=x.hessian_sample(sentences, a.pretrain_hessian_examples),
            batch_size=x.batch(128), device=x.device, overwrite=overwrite))
    return found


def queries_of(x: Experiment, model: Any, texts: list[str]) -> Any:
    """The sentences as a labelled dataset: tokens ``[m, L]``, the model's predicted labels ``[m]``."""
    from influence.data.datasets import TextClassificationDataset
    from influence.models.family import check_encoded

    family, ids = x.family, [f"text-{i + 1}" for i in range(len(texts))]
    tokens = family.encode(texts, x.settings.data.max_length)
    check_encoded(family, ids, tokens, "the texts to explain")
    with torch.no_grad():
        predicted = model(tokens).argmax(dim=-1).long()
    return TextClassificationDataset(tokens, predicted, ids)


def explain_texts(x: Experiment, texts: list[str], mode: str, k: int) -> dict[str, Any]:
    """Top-``k`` finetuning and pretraining proponents and opponents of each sentence.

    Returns:
        ``{"rows": [...], "queries": [...], "seconds": {...}}``: one row per (sentence, source,
        side, rank) with the example's id, text, label and score.
    """
    import time

    from flows.stages.multistage import multistage_sensitivity
    from influence.data.prepare import read_table
    from influence.exceptions import invalid

    check_k(k)
    if mode not in x.settings.finetune.modes:
        raise invalid("mode", mode, f"one of the run's embedding modes {list(x.settings.finetune.modes)} (finetune.modes)")
    timings: dict[str, float] = {}
    began = time.perf_counter()
    found = indexes(x, mode)
    timings["indexes"] = time.perf_counter() - began
    began = time.perf_counter()
    model = x.finetuned(mode)
    queries = queries_of(x, model, texts)
    finetune_top = found["finetuning"].query(x.query_task, model, queries, k, device=x.device)
    timings["finetuning"] = time.perf_counter() - began
    began = time.perf_counter()
    shared = x.multistage_shared(model)
    sensitivity = multistage_sensitivity(x, mode, model, queries)
    pretrain_top = found["pretraining"].top_k_vectors(sensitivity, k, names=list(shared.values()))
    timings["pretraining"] = time.perf_counter() - began
    labels = x.label_names
    finetune_rows = {r["id"]: r for r in read_table(x.dataset_path("finetune"))}
    pretrain_rows = {r["id"]: r for r in read_table(x.dataset_path("pretrain"))}
    sources = {"finetuning": (finetune_top, x.split("train").ids, finetune_rows),
               "pretraining": (pretrain_top, x.split("pretrain").ids, pretrain_rows)}
    rows = []
    for source, (top, ids, table) in sources.items():
        for r in top.to_rows(queries.ids, ids):
            example = table[r["train"]]
            label = labels[int(example["label"])] if source == "finetuning" else ""
            rows.append({"query_id": r["query"], "query": texts[queries.ids.index(r["query"])], "source": source,
                         "kind": r["side"], "rank": r["rank"], "id": r["train"], "label": label, "score": r["score"],
                         "text": example["text"]})
    described = [{"id": i, "text": t, "prediction": labels[int(p)]} for i, t, p in zip(queries.ids, texts, queries.labels)]
    return {"rows": rows, "queries": described, "seconds": timings}


def explanation_page(found: dict[str, Any], mode: str, run_id: str) -> str:
    """The HTML page of an explanation (the report's layout: one section per sentence and source)."""
    from influence.reports.html import render_report

    queries = []
    for q in found["queries"]:
        sections = []
        for source in ("finetuning", "pretraining"):
            rows = [r for r in found["rows"] if r["query_id"] == q["id"] and r["source"] == source]
            title = "influence function" if source == "finetuning" else "multi-stage influence"
            sections.append({"title": f"{title} — {source} examples, embedding {mode}", "rows": rows})
        queries.append({"id": q["id"], "text": q["text"], "label": "(new text)", "prediction": q["prediction"],
                        "sections": sections})
    summary = {"models of MLflow run": run_id or "(none logged yet)", "embedding mode": mode,
               **{f"{s} seconds": round(v, 3) for s, v in found["seconds"].items()}}
    return render_report({"title": "Explanation of new sentences", "summary": summary, "queries": queries})


__all__ = ["MAX_K", "MAX_TEXTS", "check_k", "indexes", "explain_texts", "explanation_page", "parse_texts", "queries_of", "resolve_model"]
