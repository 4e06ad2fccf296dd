"""The ``deletion`` stage: the case-deletion check of the finetuning attributions. Retrain without each query's top-k
proponents (opponents) and without k random examples; the change of the query's loss must exceed random's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.definition.stage_table import METHOD_STAGES
from flows.experiment.experiment import Experiment
from flows.experiment.retraining import plans_retrainings, retraining_seeds
from flows.experiment.workspace import StageResult
from flows.stages import evidence
from flows.stages.entry import stage


def deletion_plan(x: Experiment) -> Any:
    """The case-deletion check's retrainings, from the checked methods' scores (``evaluation.mode``)."""
    from influence.evaluation.case_deletion import plan_deletion

    e = x.settings.evaluation
    n_train = len(x.split("train"))
    scores = {method: x.checked_scores(METHOD_STAGES[method]) for method in e.methods}
    ks = sorted({max(1, round(f * n_train)) for f in e.k_fractions})
    return plan_deletion(scores, n_train=n_train, k=ks, kinds=e.kinds, random_repeats=e.random_repeats,
                         seeds=retraining_seeds(x), seed=x.settings.seed)


def plan(x: Experiment) -> list:
    """The stage's retrainings, in plan order (the Prefect flow runs them as parallel tasks first)."""
    return plans_retrainings({x.settings.evaluation.mode: deletion_plan(x)})


@stage("deletion")
def run(x: Experiment, result: StageResult) -> None:
    """Case-deletion check: retrain without each query's top-k proponents (opponents) vs without k random
    examples (each retraining saved as it finishes; the Prefect flow runs them as parallel tasks first)."""
    evidence.run_check(x, result, {x.settings.evaluation.mode: deletion_plan(x)}, list(x.settings.evaluation.methods),
                       by_mode=False)


def report_section(x: Experiment, results: dict[str, StageResult], folder: Path) -> dict:
    """The verdicts of the finetuning check and their curves."""
    return evidence.report_section(x, "deletion", "finetuning", folder / "deletion.png")
