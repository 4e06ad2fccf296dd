"""What every stage module shares: the ``@stage`` decorator, the score stages' runner, and how a stage's module is found.

A stage lives in its own module of :mod:`flows.stages`, named as the stage (``influence``: ``influence_function``),
with the same small interface: ``run(settings, workspace) -> StageResult`` (its body decorated with
:func:`stage`), or for a method scored per embedding mode ``score(experiment, mode) -> [Q, N]`` (run by
:func:`score_stage`); a stage that retrains adds ``plan(experiment) -> [Retraining]``, and one the report shows
adds ``report_section(experiment, results, folder)``. The stage table names each stage's module; nothing
outside the stage's module tests its name. Each stage reads its inputs through its
:class:`~flows.experiment.experiment.Experiment`, makes one or a few library calls, writes its outputs and returns
a :class:`~flows.experiment.workspace.StageResult` (paths and numbers, never tensors), also saved as
``artifacts/<stage>/result.json``; the Prefect flow and ``dvc repro`` run the same functions.
"""

from __future__ import annotations

import functools
import importlib
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from flows.definition import stage_table
from flows.experiment.experiment import PARTIAL, Experiment
from flows.experiment.workspace import StageResult, Workspace, timed


def stage(name: str) -> Callable[[Callable[[Experiment, StageResult], None]], Callable]:
    """A stage from its body ``(experiment, result)``: the experiment as the row of ``name`` declares it, the
    timing, the ``disabled`` result of a stage its settings turn off, ``result.json``."""

    def decorate(body: Callable[[Experiment, StageResult], None]) -> Callable:
        @functools.wraps(body)
        def run(settings, ws: Workspace) -> StageResult:
            x, row = Experiment.for_stage(name, settings, ws), stage_table.row(name)
            result = StageResult(name)
            if not row.is_enabled(x.settings):
                result.info["disabled"] = True
            else:
                with timed(result):
                    body(x, result)
            result.save(ws)
            return result

        return run

    return decorate


def resolve(reference: str) -> Any:
    """The object a row names as ``"package.module:attribute"``."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def stage_module(name: str) -> ModuleType:
    """The module of stage ``name`` (its row's ``module``): ``run``, and where they apply ``score``, ``plan`` and
    ``report_section``."""
    return importlib.import_module(stage_table.row(name).module_path)


def entry_functions(name: str) -> list[Callable]:
    """The functions stage ``name`` starts from: its ``run``, or ``score_stage`` and its ``score``
    (what it runs, for :func:`run_stage`, its code fingerprint and its ``dvc.yaml`` deps)."""
    row = stage_table.row(name)
    if row.score:
        return [score_stage, resolve(row.score)]
    return [resolve(row.entry)]


def run_stage(name: str, settings, ws: Workspace) -> StageResult:
    """Run stage ``name`` through the entry its row of the stage table names."""
    if stage_table.row(name).score:
        return score_stage(name, settings, ws)
    return entry_functions(name)[0](settings, ws)


def plan(name: str, x: Experiment) -> list:
    """The retrainings of the retraining stage ``name`` (its module's ``plan(x)``), in plan order."""
    return stage_module(name).plan(x)


def report_sections(x: Experiment, results: dict[str, StageResult], folder: Path) -> list[dict]:
    """What each stage that ran adds to the report, in table order: its module's ``report_section(x, results,
    folder)`` (``{"summary": {...}, "deletion": [rows], "evaluation": [sections], "figures": [(title, caption,
    path)]}``, any of them), for every stage whose result is there and was not turned off."""
    found = []
    for row in stage_table.STAGES:
        if row.name in results and not results[row.name].info.get("disabled"):
            module = stage_module(row.name)
            if hasattr(module, "report_section"):
                found.append(module.report_section(x, results, folder))
    return found


def attribute_queries(x: Experiment, mode: str, **options: Any) -> Any:
    """``influence.attribute`` of the experiment's queries against its finetuning train split, in ``mode``."""
    from influence.api import attribute

    return attribute(x.query_task, x.finetuned(mode), x.split("train"), x.split("queries"), device=x.device, **options)


def score_stage(name: str, settings, ws: Workspace) -> StageResult:
    """A score stage whose row gives ``score(experiment, mode) -> [Q, N]``: scores per mode, written.

    A run killed after some modes resumes with the next one: a mode's scores already in the staging folder (kept
    only for a run of the same inputs, :mod:`flows.incremental.stage_cache`; written whole or not at all) are read back, not
    computed again (multi-stage MAGIC takes about an hour per mode on the nightly settings)."""
    from influence.exceptions import CorruptedArtifactError
    from influence.models.checkpoints import load_metadata

    def body(x: Experiment, result: StageResult) -> None:
        for mode in x.settings.finetune.modes:
            written = x.path(name, f"{mode}.safetensors")
            try:
                load_metadata(written)  # its header: write_scores writes a file whole or not at all
            except CorruptedArtifactError:  # not there yet: compute it
                result.outputs[mode] = x.write_scores(mode, resolve(stage_table.row(name).score)(x, mode))
            else:
                result.outputs[mode] = x.relative(written)
                result.info.setdefault("resumed_modes", []).append(mode)
        shutil.rmtree(x.path(name, PARTIAL), ignore_errors=True)  # the modes' pieces, now written whole

    return stage(name)(body)(settings, ws)


__all__ = ["attribute_queries", "entry_functions", "plan", "report_sections", "resolve", "run_stage", "score_stage",
           "stage", "stage_module"]
