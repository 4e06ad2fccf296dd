"""The one table of the pipeline's stages: every list of stages anywhere is derived from it.

A row names a stage, the settings it reads (``params``: sections or ``section.field``), the stages
whose outputs it reads (``inputs``), the prepared datasets it reads (``data``), where it runs
(``pool``: ``cpu``, or ``gpu`` for the stages of the ``attribution`` flow), and for an attribution
method its name in ``evaluation.methods`` (``method``), the examples it scores (``source``) and its
title in the report. From the table come: the stage order (:data:`NAMES`), the CLI's choices, the
Prefect tasks, the GPU flow, the methods the settings accept, the report's score tables, the
retraining stages, ``dvc.yaml`` (:mod:`flows.incremental.dvc_yaml`) and each stage's input fingerprint
(:mod:`flows.incremental.stage_cache`).

The table is enforced, not trusted: a stage reading a setting, a stage's output or a dataset that
its row does not list fails at once, naming what to add (:mod:`flows.experiment.experiment`).

The table holds declarations only: a row names its code by strings (its module in :mod:`flows.stages`, a
score stage's ``"module:score"``), resolved when the stage runs and checked by :func:`check_table`. Adding an
attribution method is one library function, one stage module with ``score(experiment, mode) -> [n_query,
n_train]``, one row here (the choice in ``evaluation.methods`` follows), and ``dvc.yaml`` regenerated
(``python -m flows.cli dvc-yaml``); docs/extending.md, "A method", shows it. This module imports nothing of
:mod:`flows` and nothing heavy: the settings model reads the method names from it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

ALL_SECTIONS = ("seed", "data", "model", "pretrain", "finetune", "attribution", "evaluation", "tracking", "cluster")
DATA_STAGE_PARAMS = (  # the data stage's settings (flows.versioning.data_version records them in params.yaml)
    "finetune_source", "finetune_file", "text_column", "label_column", "group_column", "pretrain_source",
    "pretrain_file", "pretrain_text_column", "pretrain_unit", "chunk_words", "split_seed", "train_fraction",
    "validation_fraction",
)
USER_DATA = "data/user"  # where a user's files go: a dependency of the data stage in dvc.yaml
CHECKED = "<every finetuning score stage>"  # in inputs: the score stages whose methods evaluation.methods may name
SCORED = "<every score stage>"  # in inputs: every score stage
SCORE_INPUTS = ("features", "pretrain", "finetune")
SCORE_PARAMS = ("seed", "finetune.modes", "attribution.measurement", "attribution.device", "attribution.tf32")
# the attribution settings that only turn a score stage on; the stages that read the rest of the section
# (the influence function's, multi-stage influence's, mislabel detection's) do not depend on them
ATTRIBUTION_SWITCHES = ("magic", "multistage_magic")
ATTRIBUTION_PARAMS = tuple(f"attribution.{name}" for name in (  # every other attribution setting (check_table)
    "queries", "measurement", "solver", "multistage_solver", "pretrain_solver", "damping", "pretrain_damping",
    "gauss_newton", "pretrain_gauss_newton", "cg_iterations", "hessian_examples", "pretrain_hessian_examples",
    "arnoldi_iterations", "arnoldi_rank", "arnoldi_complement", "if_params", "shared_params", "pretrain_hessian_params",
    "top_k", "tf32", "gradient_dtype", "device",
))


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage's name (its folder ``artifacts/<name>``, its task, its ``dvc.yaml`` entry).
        params: the settings it reads: whole sections (``"finetune"``) or fields (``"attribution.solver"``).
        inputs: stages whose outputs it reads.
        data: prepared datasets it reads (``data/prepared/<name>.csv``).
        pool: ``"cpu"`` or ``"gpu"`` (the ``attribution`` flow, on the ``gpu`` work pool).
        module: its module in :mod:`flows.stages` (default: its name), which holds its code: ``run``, or
            ``score``, and where they apply ``plan`` and ``report_section`` (:mod:`flows.stages.entry`).
        run: ``"module:function"`` that runs it, ``(settings, workspace) -> StageResult``; default its module's ``run``.
        score: for an attribution method run per embedding mode, ``"module:function"`` of
            ``(experiment, mode) -> [Q, N]`` (its module's ``score``); the stage then runs
            ``flows.stages.entry:score_stage``.
        method: its name among ``evaluation.methods`` (case deletion, LDS), for score stages.
        source: ``"finetuning"`` or ``"pretraining"``: which examples its scores rank.
        title: the method's name in the report.
        in_page: each query's section of the HTML report shows its top examples (all are in the CSVs).
        retrains: ``"finetune"`` or ``"pretrain"``: the stage retrains (the Prefect flow runs its
            retrainings first as parallel tasks); the scope says which training is re-run.
        enabled: the setting that turns the stage on (``None``: always on); off, it records a
            ``disabled`` result and nothing else.
        files: the user's files the stage reads, from the settings (paths relative to the project
            folder); their md5 enter its fingerprint.
        outputs: its ``dvc.yaml`` outputs (default ``artifacts/<name>``).
    """

    name: str
    params: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    pool: Literal["cpu", "gpu"] = "cpu"
    module: str = ""
    run: str = ""
    score: str = ""
    method: str | None = None
    source: Literal["finetuning", "pretraining"] | None = None
    title: str | None = None
    in_page: bool = False
    retrains: Literal["finetune", "pretrain"] | None = None
    enabled: Callable[[Any], bool] | None = None
    files: Callable[[Any], list[str]] | None = None
    outputs: tuple[str, ...] = ()

    @property
    def module_path(self) -> str:
        """The dotted name of the stage's module (``flows.stages.<module or name>``)."""
        return f"flows.stages.{self.module or self.name}"

    @property
    def entry(self) -> str:
        """``module:function`` that runs the stage."""
        return self.run or ("flows.stages.entry:score_stage" if self.score else f"{self.module_path}:run")

    @property
    def outs(self) -> tuple[str, ...]:
        return self.outputs or (f"artifacts/{self.name}",)

    def is_enabled(self, settings: Any) -> bool:
        return self.enabled is None or bool(self.enabled(settings))


def factory_files(factory: str) -> list[str]:
    """Where a custom family's module lives in the project: ``data/user/<module>.py`` or its package's
    ``__init__.py`` (watched by ``dvc.yaml``; :func:`flows.guards.run_form.check_factory`); their md5 enter the features
    stage's fingerprint."""
    module = factory.partition(":")[0].replace(".", "/")
    return [f"{USER_DATA}/{module}.py", f"{USER_DATA}/{module}/__init__.py"]


STAGES: tuple[Stage, ...] = (
    Stage("data", params=tuple(f"data.{name}" for name in DATA_STAGE_PARAMS),
          files=lambda s: [path for source, path in ((s.data.finetune_source, s.data.finetune_file),
                                                     (s.data.pretrain_source, s.data.pretrain_file)) if source == "file"],
          outputs=("data/prepared/pretrain.csv", "data/prepared/finetune.csv", "data/prepared/mnist.csv")),
    Stage("features", params=("seed", "data", "model", "attribution.queries"), data=("pretrain", "finetune"),
          files=lambda s: factory_files(s.model.factory) if s.model.family == "custom" else []),
    Stage("pretrain", params=("seed", "pretrain"), inputs=("features",)),
    Stage("finetune", params=("seed", "finetune"), inputs=("features", "pretrain")),
    Stage("gradients", params=(*SCORE_PARAMS, "attribution.if_params"), inputs=SCORE_INPUTS, pool="gpu"),
    Stage("influence", params=(*SCORE_PARAMS, "finetune.l2", "finetune.alpha", *ATTRIBUTION_PARAMS),
          inputs=(*SCORE_INPUTS, "gradients"), pool="gpu", module="influence_function", method="if", source="finetuning",
          title="influence function", in_page=True),
    Stage("multistage", params=(*SCORE_PARAMS, "finetune.l2", "finetune.alpha", "pretrain.l2", *ATTRIBUTION_PARAMS),
          inputs=SCORE_INPUTS, pool="gpu", method="multistage", source="pretraining",
          title="multi-stage influence", in_page=True),
    Stage("tracin_we", params=(*SCORE_PARAMS, "attribution.top_k"), inputs=SCORE_INPUTS, pool="gpu",
          method="tracin_we", source="finetuning", title="TracIn-WE", in_page=True),
    Stage("tracin_last", params=SCORE_PARAMS, inputs=SCORE_INPUTS, pool="gpu", method="tracin_last",
          source="finetuning", title="last-layer TracIn", score="flows.stages.tracin_last:score"),
    Stage("grad_cos", params=(*SCORE_PARAMS, "attribution.if_params"), inputs=SCORE_INPUTS, pool="gpu",
          method="grad_cos", source="finetuning", title="gradient cosine", score="flows.stages.grad_cos:score"),
    Stage("magic", params=(*SCORE_PARAMS, "finetune", "model", "attribution.magic"), inputs=SCORE_INPUTS, pool="gpu",
          method="magic", source="finetuning", title="MAGIC", enabled=lambda s: s.attribution.magic,
          score="flows.stages.magic:score"),
    Stage("multistage_magic", params=(*SCORE_PARAMS, "pretrain", "finetune", "model", "attribution.multistage_magic"),
          inputs=SCORE_INPUTS, pool="gpu", method="multistage_magic", source="pretraining", title="multi-stage MAGIC",
          in_page=True, enabled=lambda s: s.attribution.multistage_magic, score="flows.stages.multistage_magic:score"),
    Stage("deletion", params=("seed", "finetune", "evaluation"), inputs=("features", "pretrain", "finetune", CHECKED),
          retrains="finetune", enabled=lambda s: s.evaluation.enabled),
    Stage("pretrain_deletion", params=("seed", "pretrain", "finetune", "evaluation", "attribution.multistage_magic"),
          inputs=("features", "pretrain", "finetune", "multistage", "multistage_magic"), retrains="pretrain",
          enabled=lambda s: s.evaluation.pretrain_deletion),
    Stage("lds", params=("seed", "finetune", "evaluation"), inputs=("features", "pretrain", "finetune", CHECKED),
          retrains="finetune", enabled=lambda s: s.evaluation.lds),
    Stage("mislabel", params=("seed", "finetune", "evaluation.mode", "evaluation.mislabel_fraction",
                              "evaluation.mislabel_method", "evaluation.mislabel_params", *ATTRIBUTION_PARAMS),
          inputs=("features", "pretrain"),
          enabled=lambda s: s.evaluation.mislabel_fraction > 0),
    Stage("report", params=tuple(n for n in ALL_SECTIONS if n != "cluster"), data=("pretrain", "finetune"),
          inputs=("features", "pretrain", "finetune", SCORED, "deletion", "pretrain_deletion", "lds", "mislabel")),
)


def _expanded(rows: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """The rows with :data:`CHECKED` and :data:`SCORED` in ``inputs`` replaced by the score stages' names."""
    groups = {CHECKED: [r.name for r in rows if r.method and r.source == "finetuning"],
              SCORED: [r.name for r in rows if r.method]}
    return tuple(dataclasses.replace(r, inputs=tuple(n for i in r.inputs for n in groups.get(i, [i]))) for r in rows)


STAGES = _expanded(STAGES)

NAMES: tuple[str, ...] = tuple(row.name for row in STAGES)
BY_NAME: dict[str, Stage] = {row.name: row for row in STAGES}
GPU_STAGES: tuple[str, ...] = tuple(row.name for row in STAGES if row.pool == "gpu")
SCORE_STAGES: tuple[Stage, ...] = tuple(row for row in STAGES if row.method is not None)
# the methods whose finetuning scores the evidence stages check (evaluation.methods accepts these)
CHECKED_METHODS: tuple[str, ...] = tuple(row.method for row in SCORE_STAGES if row.source == "finetuning")
METHOD_STAGES: dict[str, str] = {row.method: row.name for row in SCORE_STAGES}
RETRAINING_STAGES: dict[str, str] = {row.name: row.retrains for row in STAGES if row.retrains}


def row(name: str) -> Stage:
    """The row of stage ``name``.

    Raises:
        KeyError: no such stage (the message lists the stages).
    """
    if name not in BY_NAME:
        raise KeyError(f"no stage {name!r}; the stages are {list(NAMES)}")
    return BY_NAME[name]


def check_table() -> None:
    """Refuse a table whose rows contradict each other (run by the tests and by ``cli check``).

    Raises:
        ValueError: naming the row and the problem.
    """
    problems = []
    for index, row in enumerate(STAGES):
        for dep in row.inputs:
            if dep not in BY_NAME or NAMES.index(dep) >= index:
                problems.append(f"{row.name}: input {dep!r} is not a stage listed before it")
        for param in row.params:
            if param.split(".")[0] not in ALL_SECTIONS:
                problems.append(f"{row.name}: param {param!r} is not in a section of the settings {ALL_SECTIONS}")
        if (row.method is None) != (row.source is None) or (row.method is None) != (row.title is None):
            problems.append(f"{row.name}: method, source and title go together")
        if row.score and row.method is None:
            problems.append(f"{row.name}: a score stage needs a method name")
        for reference in (row.entry, row.score) if row.score else (row.entry,):
            module, _, attribute = reference.partition(":")
            try:
                found = callable(getattr(importlib.import_module(module), attribute, None))
            except ImportError as error:
                found, attribute = False, f"{attribute} ({error})"
            if not found:
                problems.append(f"{row.name}: {reference!r} names no function")
        if row.retrains and not callable(getattr(importlib.import_module(row.module_path), "plan", None)):
            problems.append(f"{row.name}: a stage that retrains has a plan(experiment) in {row.module_path}")
    if len(set(NAMES)) != len(NAMES) or len(set(METHOD_STAGES)) != len(SCORE_STAGES):
        problems.append("stage and method names must be distinct")
    if problems:
        raise ValueError("flows/definition/stage_table.py: " + "; ".join(problems))


__all__ = [
    "BY_NAME", "CHECKED_METHODS", "GPU_STAGES", "METHOD_STAGES", "NAMES", "RETRAINING_STAGES", "SCORE_STAGES",
    "STAGES", "Stage", "check_table", "row",
]
