"""The ``magic`` stage: MAGIC, exact metagradients through the recorded finetuning run (Ilyas & Engstrom 2025)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import attribute_queries


def _finetune_recipe(x: Experiment, mode: str) -> Any:
    """The finetuning run of ``mode`` as MAGIC replays it (:func:`flows.experiment.recipes.finetune_recipe`)."""
    from flows.experiment.recipes import finetune_recipe
    from influence.methods.magic import TrainingRecipe

    return TrainingRecipe(**finetune_recipe(x, mode))


def score(x: Experiment, mode: str) -> Any:
    """``[Q, N]`` MAGIC scores of ``mode``'s queries over the finetuning examples."""
    return attribute_queries(x, mode, method="magic", training=_finetune_recipe(x, mode), batch_size=x.batch(256))


def report_section(x: Experiment, results: dict[str, StageResult], folder: Path) -> dict:
    """The report's line on MAGIC's cost: its seconds over the finetuning stage's (both run every mode)."""
    finetune = results.get("finetune")
    if finetune is None or finetune.seconds <= 0:
        return {}
    return {"summary": {"MAGIC cost (finetuning runs)": round(results["magic"].seconds / finetune.seconds, 2)}}
