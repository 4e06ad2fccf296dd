"""``dvc.yaml`` made from the stage table, and ``dvc.lock`` kept true by the Prefect flow.

:func:`dvc_yaml` renders ``dvc.yaml`` from :mod:`flows.stage_table`: each stage's command (the CLI's
``stage`` entry, the same functions the flow runs), its parameters, its dependencies (the datasets
and the outputs of the stages it reads, and the source files of the code it runs, from
:mod:`flows.code_deps`) and its outputs. ``python -m flows.cli dvc-yaml`` writes it; a test checks
that the committed file is the rendered one.

Outputs under ``artifacts/`` are ``cache: false``: DVC records their hashes in ``dvc.lock`` (so
``dvc status`` tells whether they are current) without a second copy in its cache; the pipeline
keeps past versions of them itself (:mod:`flows.stage_cache`). The prepared data are cached and
pushed, as DVC-versioned data.

:func:`record_stages` is the flow's side of one bookkeeping: after a flow run, it records in
``dvc.lock`` (as ``dvc commit`` would) every stage the flow ran or found current, so ``dvc status`` reports nothing changed, except
for the stages run with settings that differ from ``params.yaml`` (``--set`` or the UI form), which
``dvc status`` rightly reports as changed (``dvc repro`` would recompute them from the file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flows.code_deps import code_files
from flows.stage_table import STAGES, USER_DATA, Stage, stage
from influence.exceptions import invalid

HEADER = (
    "# Generated from flows/stage_table.py by `python -m flows.cli dvc-yaml`; do not edit by hand.\n"
    "# Each stage runs the same entry point as the Prefect flow's task (`python -m flows.cli stage NAME`).\n"
    "# Run from the project folder with the project's virtual environment on PATH.\n"
)


def stage_entry(row: Stage) -> dict[str, Any]:
    """The ``dvc.yaml`` entry of one row."""
    from flows.stages import entry_functions

    deps = [f"data/prepared/{name}.csv" for name in row.data] + ([USER_DATA] if row.files else [])
    deps += [out for dep in row.inputs for out in stage(dep).outs]
    deps += code_files(entry_functions(row.name))
    outs: list[Any] = [out if out.startswith("data/") else {out: {"cache": False}} for out in row.outs]
    entry: dict[str, Any] = {"cmd": f"python -m flows.cli stage {row.name}", "deps": deps}
    if row.params:
        entry["params"] = list(row.params)
    entry["outs"] = outs
    return entry


def dvc_yaml() -> str:
    """The text of ``dvc.yaml``."""
    stages = {row.name: stage_entry(row) for row in STAGES}
    return HEADER + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)


def write_dvc_yaml(root: Path) -> Path:
    """Write ``<root>/dvc.yaml`` from the table."""
    from influence.storage import atomic_write

    return atomic_write(Path(root) / "dvc.yaml", dvc_yaml())


def _value(values: dict, dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def matching_params(root: Path, settings: Any, names: list[str]) -> list[str]:
    """The stages among ``names`` whose declared settings equal those of ``<root>/params.yaml``."""
    from flows.settings import PARAMS_FILE, load_settings

    path = Path(root) / PARAMS_FILE
    if not path.is_file():
        return []
    written, used = load_settings(path).model_dump(mode="json"), settings.model_dump(mode="json")
    return [n for n in names if all(_value(written, p) == _value(used, p) for p in stage(n).params)]


def commit_stages(root: Path, names: list[str]) -> None:
    """``dvc commit --force`` of the stages ``names``, without DVC's run cache.

    The run cache would copy every uncached output into ``.dvc/cache`` (and rewrite it in the
    workspace) so that ``dvc repro`` could restore it; the pipeline keeps its own past versions
    (:mod:`flows.stage_cache`). Cached outputs (the prepared data) go into the cache as with the CLI.
    """
    from dvc.repo import Repo, lock_repo

    if not names:
        return
    repo = Repo(str(root))
    try:
        with lock_repo(repo):
            dvcfile = Path(root).resolve() / "dvc.yaml"  # a full path: a bare name would be read from the cwd
            # the file's stages read once: collecting them one name at a time parses dvc.yaml and dvc.lock again for each
            # (about 3 s of a pipeline run's bookkeeping with the 17 stages)
            by_name = {s.name: s for s in repo.stage.collect(str(dvcfile))}
            missing = [name for name in names if name not in by_name]
            if missing:
                raise invalid("names", missing, f"stages of {dvcfile}: {sorted(by_name)}")
            found = [by_name[name] for name in dict.fromkeys(names)]
            for entry in found:
                entry.save(run_cache=False)
                entry.commit()  # a no-op for uncached outputs: they stay where and what they are
            found[0].dvcfile.dump_stages(found, update_pipeline=False)
    finally:
        repo.close()


def record_stages(root: Path, settings: Any, names: list[str]) -> list[str]:
    """Record in ``dvc.lock`` the stages among ``names`` run with ``params.yaml``'s settings; the stages recorded."""
    recorded = matching_params(root, settings, names)
    commit_stages(root, recorded)
    return recorded


__all__ = ["commit_stages", "dvc_yaml", "matching_params", "record_stages", "stage_entry", "write_dvc_yaml"]
