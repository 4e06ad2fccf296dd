"""Skip a stage whose inputs did not change since it last completed in this workspace.

A stage's *fingerprint* is the sha256 of what it reads:

- its settings: the parameters ``dvc.yaml`` lists for it (the same declaration ``dvc repro`` uses);
- the code version: every ``*.py`` file of ``influence/`` and ``flows/`` (any code change re-runs);
- its data: the md5 of each dataset it reads (the hashes DVC records), for stages whose
  ``dvc.yaml`` dependencies are data files;
- the fingerprints of the stages whose outputs it reads (``artifacts/<stage>`` dependencies), so a
  change anywhere upstream reaches every stage below it.

A completed stage stores its fingerprint in ``artifacts/<stage>/result.json``. The next run skips
the stage when the stored fingerprint equals the new one and every output it lists still exists.
The ``report`` stage is never skipped: each pipeline run gets its own MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import yaml

from flows.settings import PipelineSettings
from flows.workspace import StageResult, Workspace

NEVER_SKIPPED = ("report",)
CODE_PACKAGES = ("influence", "flows")
log = logging.getLogger(__name__)


def stage_spec(root: Path, stage: str) -> dict:
    """The ``dvc.yaml`` entry of ``stage`` (``deps``, ``params``, ``outs``).

    Raises:
        KeyError: ``dvc.yaml`` has no such stage (the message lists the stages it has).
    """
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise KeyError(f"stage {stage!r} is not in {root / 'dvc.yaml'}; it has {sorted(stages)}")
    return stages[stage]


def code_version(root: Path) -> str:
    """sha256 over the path and bytes of every ``*.py`` file of the project's packages."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _param(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        node = node[part]
    return node


def fingerprint(stage: str, settings: PipelineSettings, ws: Workspace, data_hashes: dict[str, str]) -> str:
    """The fingerprint of ``stage``'s inputs (see the module docstring).

    Args:
        stage: a stage of ``dvc.yaml``.
        settings: the run's settings.
        ws: the workspace; upstream stages' fingerprints are read from their ``result.json``.
        data_hashes: ``{dataset name: md5}`` of the data this run uses.

    Returns:
        a 64-character hex digest; ``""`` when an upstream stage has no recorded fingerprint (the
        stage then runs).
    """
    spec = stage_spec(ws.root, stage)
    values = settings.model_dump(mode="json")
    inputs: dict = {
        "stage": stage,
        "params": {name: _param(values, name) for name in spec.get("params", [])},
        "code": code_version(ws.root),
        "data": {},
        "upstream": {},
    }
    for dep in spec.get("deps", []):
        parts = Path(dep).parts
        if parts[:2] == ("data", "prepared"):
            name = Path(dep).stem
            inputs["data"][name] = data_hashes.get(name, "")
        elif parts[0] == "artifacts":
            upstream = recorded_fingerprint(ws, parts[1])
            if not upstream:
                return ""
            inputs["upstream"][parts[1]] = upstream
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded_fingerprint(ws: Workspace, stage: str) -> str:
    """The fingerprint stored with ``stage``'s last completed result, or ``""``."""
    path = ws.artifacts / stage / "result.json"
    if not path.is_file():
        return ""
    try:
        return str(json.loads(path.read_text()).get("info", {}).get("fingerprint", ""))
    except json.JSONDecodeError:
        return ""


def completed(ws: Workspace, stage: str, fp: str, valid: Callable[[], bool] | None = None) -> StageResult | None:
    """The stored result of ``stage`` when it completed with fingerprint ``fp`` and its outputs exist.

    Args:
        valid: a further check of the outputs (e.g. the data files against their recorded hashes).
    """
    if not fp or stage in NEVER_SKIPPED or recorded_fingerprint(ws, stage) != fp:
        return None
    if valid is not None and not valid():
        log.info("stage %s: its outputs changed since it ran; running it again", stage)
        return None
    result = StageResult.load(ws, stage)
    missing = [p for p in result.outputs.values() if not (ws.root / p).exists()]
    if missing:
        log.info("stage %s: outputs %s are missing; running it again", stage, missing)
        return None
    return result


def run_or_skip(
    stage: str,
    run: Callable[[], StageResult],
    settings: PipelineSettings,
    ws: Workspace,
    data_hashes: dict[str, str],
    force: bool = False,
    valid: Callable[[], bool] | None = None,
) -> tuple[StageResult, bool]:
    """Run ``stage`` unless a completed run with the same inputs is on disk.

    Args:
        stage: the stage's name.
        run: runs the stage and returns its result (which it saves).
        settings: the run's settings.
        ws: the workspace.
        data_hashes: ``{dataset: md5}`` of the data this run uses.
        force: run even when the inputs are unchanged.
        valid: a further check that the stored outputs are still those the stage wrote.

    Returns:
        ``(result, skipped)``; a run's result is saved again with its fingerprint in ``info``.
    """
    fp = fingerprint(stage, settings, ws, data_hashes)
    if not force:
        done = completed(ws, stage, fp, valid)
        if done is not None:
            return done, True
    result = run()
    result.info["fingerprint"] = fp
    result.save(ws)
    return result, False
