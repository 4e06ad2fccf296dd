"""The ``influence`` stage: influence-function scores of the finetuning examples on the queries, per mode.

Named like the library's ``influence/methods/influence_function.py``; the stage, its ``artifacts/influence`` folder and
its ``dvc.yaml`` key keep the name ``influence``.
"""

from __future__ import annotations

import torch

from flows.experiment import recipes
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage


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


@stage("influence")
def run(x: Experiment, result: StageResult) -> None:
    """Influence-function scores of finetuning examples on the queries, per mode: [n_query, n_train].
    A solver that keeps its state (exact, Arnoldi, EK-FAC) fits an attribution index per mode
    (``artifacts/influence/<mode>/index``, which ``explain`` asks again); conjugate gradient solves per query."""
    from influence.api import attribute
    from influence.index import STATEFUL_SOLVERS, AttributionIndex

    a, train, queries = x.settings.attribution, x.split("train"), x.split("queries")
    for mode in x.settings.finetune.modes:
        if a.solver in STATEFUL_SOLVERS:
            arguments = influence_index_arguments(x, mode)
            index = recipes.resume_or_replace(AttributionIndex.fit, directory=x.out_dir(mode, "index"), **arguments)
            scores = index.scores(x.query_task, arguments["model"], queries, device=x.device)
            result.metrics[f"{mode}.index_dim"] = float(index.dim)
        else:
            model = x.finetuned(mode)
            scores = attribute(x.query_task, model, train, queries, method="if", cache_dir=x.path("gradients", mode),
                               gradient_dtype=_half(x), **_influence_options(x, mode, model))
        result.outputs[mode] = x.write_scores(mode, scores)
