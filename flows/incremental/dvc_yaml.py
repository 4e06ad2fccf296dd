"""``dvc.yaml`` made from the stage table.

:func:`dvc_yaml` renders ``dvc.yaml`` from :mod:`flows.definition.stage_table`: each stage's command (the CLI's
``stage`` entry, the same functions the flow runs), its parameters, its dependencies (the datasets
and the outputs of the stages it reads, and the source files of the code it runs, from
:mod:`flows.definition.code_deps`) and its outputs. ``python -m flows.cli dvc-yaml`` writes it; a test checks
that the committed file is the rendered one.

Outputs under ``artifacts/`` are ``cache: false``: DVC records their hashes in ``dvc.lock`` (so
``dvc status`` tells whether they are current) without a second copy in its cache; the pipeline
keeps past versions of them itself (:mod:`flows.incremental.stage_cache`). The prepared data are cached and
pushed, as DVC-versioned data. ``dvc.lock`` is kept true by :mod:`flows.versioning.data_version.dvc`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flows.definition.code_deps import code_files
from flows.definition import stage_table
from flows.definition.stage_table import STAGES, USER_DATA, Stage

HEADER = (
    "# Generated from flows/definition/stage_table.py by `python -m flows.cli dvc-yaml`; do not edit by hand.\n"
    "# Each stage runs the same entry point as the Prefect flow's task (`python -m flows.cli stage NAME`).\n"
    "# Run from the project folder with the project's virtual environment on PATH.\n"
)


def stage_entry(row: Stage) -> dict[str, Any]:
    """The ``dvc.yaml`` entry of one row."""
    from flows.stages.entry import entry_functions

    deps = [f"data/prepared/{name}.csv" for name in row.data] + ([USER_DATA] if row.files else [])
    deps += [out for dep in row.inputs for out in stage_table.row(dep).outs]
    deps += code_files(entry_functions(row.name))
    outs: list[Any] = [out if out.startswith("data/") else {out: {"cache": False}} for out in row.outs]
    entry: dict[str, Any] = {"cmd": f"python -m flows.cli stage {row.name}", "deps": deps}
    if row.params:
        entry["params"] = list(row.params)
    entry["outs"] = outs
    return entry


# dvc plots show: the curves of the evidence stages, as images the report draws and as data series
PLOTS = [
    {"artifacts/mislabel/curve.json": {"x": "inspected", "y": ["found", "random"], "template": "linear",
                                       "title": "Mislabel detection: share of flipped labels found",
                                       "x_label": "share of the training set inspected", "y_label": "share found"}},
    "artifacts/report/figures/deletion.png",
    "artifacts/report/figures/deletion_pretraining.png",
    "artifacts/report/figures/mislabel.png",
]


def dvc_yaml() -> str:
    """The text of ``dvc.yaml``: the stages; every stage's ``metrics.json`` under ``metrics`` (``dvc metrics
    show``, ``dvc metrics diff``); the evidence's curves under ``plots`` (``dvc plots show``)."""
    from flows.experiment.workspace import METRICS

    stages = {row.name: stage_entry(row) for row in STAGES}
    metrics = [f"artifacts/{row.name}/{METRICS}" for row in STAGES]
    return HEADER + yaml.safe_dump({"stages": stages, "metrics": metrics, "plots": PLOTS}, sort_keys=False, width=120)


def write_dvc_yaml(root: Path) -> Path:
    """Write ``<root>/dvc.yaml`` from the table."""
    from influence.storage import atomic_write

    return atomic_write(Path(root) / "dvc.yaml", dvc_yaml())


__all__ = ["dvc_yaml", "stage_entry", "write_dvc_yaml"]
