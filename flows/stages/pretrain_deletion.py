"""The ``pretrain_deletion`` stage: the case-deletion check of the pretraining attributions (multi-stage influence,
multi-stage MAGIC). Re-run pretraining and finetuning without each query's top-k pretraining sentences, and without
k random ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.experiment.experiment import Experiment
from flows.experiment.retraining import plans_retrainings, retraining_seeds, scope_modes
from flows.experiment.workspace import StageResult
from flows.stages import evidence
from flows.stages.entry import stage


def pretraining_methods(x: Experiment) -> list[str]:
    """The pretraining-data methods the pretraining case deletion checks: ``multistage``, and
    ``multistage_magic`` when ``attribution.multistage_magic`` turns its stage on."""
    return ["multistage"] + (["multistage_magic"] if x.settings.attribution.multistage_magic else [])


def pretrain_deletion_plan(x: Experiment, mode: str) -> Any:
    """The pretraining-data case deletion's retrainings for the finetuned model of ``mode``, from its multi-stage
    scores (the random removals are the same for every mode)."""
    from influence.evaluation.case_deletion import plan_deletion

    e = x.settings.evaluation
    n_pretrain = len(x.split("pretrain"))
    ks = sorted({max(1, round(f * n_pretrain)) for f in e.pretrain_k_fractions})
    return plan_deletion({method: x.checked_scores(method, mode) for method in pretraining_methods(x)}, n_train=n_pretrain,
                         k=ks, kinds=e.kinds, random_repeats=e.random_repeats, seeds=retraining_seeds(x), seed=x.settings.seed)


def plans(x: Experiment) -> dict[str, Any]:
    """``{mode: plan}`` for every mode the check retrains (:func:`flows.experiment.retraining.scope_modes`)."""
    return {mode: pretrain_deletion_plan(x, mode) for mode in scope_modes(x, "pretrain")}


def plan(x: Experiment) -> list:
    """The stage's distinct retrainings, in plan order (the random removals and the baseline serve every mode)."""
    return plans_retrainings(plans(x))


@stage("pretrain_deletion")
def run(x: Experiment, result: StageResult) -> None:
    """Case deletion for pretraining-data attribution: re-run pretraining and finetuning without each
    query's top-k multi-stage proponents (opponents), and without k random sentences (nightly)."""
    evidence.run_check(x, result, plans(x), pretraining_methods(x), by_mode=True)


def report_section(x: Experiment, results: dict[str, StageResult], folder: Path) -> dict:
    """The verdicts of the pretraining check and their curves."""
    return evidence.report_section(x, "pretrain_deletion", "pretraining", folder / "deletion_pretraining.png")
