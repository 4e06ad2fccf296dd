"""The ``multistage`` stage: multi-stage influence of the pretraining sentences on the finetuned queries, per mode."""

from __future__ import annotations

from pathlib import Path

import torch

from flows.experiment import recipes
from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage


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


@stage("multistage")
def run(x: Experiment, result: StageResult) -> None:
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
        index = recipes.resume_or_replace(AttributionIndex.fit, directory=x.out_dir("pretrain_index"),
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


def report_section(x: Experiment, results: dict[str, StageResult], folder: Path) -> dict:
    """The report's line on pretraining's convergence, the premise of the multi-stage influence function."""
    return {"summary": pretraining_convergence(results.get("pretrain"))}
