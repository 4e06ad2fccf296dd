"""DVC and git: record the data version of every run, and check data files before use.

The ``data`` stage of ``dvc.yaml`` writes the normalized tables. After a pipeline run writes them,
:func:`commit_data` records them in ``dvc.lock`` and the DVC cache (``dvc commit``) and pushes them
to the default remote (``dvc push``), exactly as ``dvc repro data && dvc push`` would.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from flows.settings import PipelineSettings

from influence.exceptions import DataError

DATASETS = ("pretrain", "finetune", "mnist")
DATA_STAGE = "data"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true")
    return env


def run_dvc(root: Path, *args: str) -> str:
    """Run one ``dvc`` command in ``root`` and return its output.

    Raises:
        RuntimeError: the command failed; the message holds DVC's own output.
    """
    sibling = Path(sys.executable).with_name("dvc")
    dvc = str(sibling) if sibling.exists() else (shutil.which("dvc") or "dvc")
    proc = subprocess.run([dvc, *args], cwd=root, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {root}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def commit_data(root: Path, settings: "PipelineSettings | None" = None, push: bool = True) -> dict[str, str]:
    """Record the data stage's outputs in ``dvc.lock`` and the cache, push them, return their hashes.

    Args:
        root: the project folder (a DVC repository).
        settings: the settings the data stage ran with; when its parameters (``DATA_PARAMS``)
            differ from ``params.yaml``, those values are written there first, so that
            ``dvc.lock`` records the parameters actually used (other settings are left alone).
        push: also ``dvc push`` the data to the default remote.
    """
    if settings is not None:
        _record_data_params(root, settings)
    run_dvc(root, "commit", "--force", DATA_STAGE)
    if push:
        run_dvc(root, "push", DATA_STAGE)
    return dataset_hashes(root)


DATA_PARAMS = ("split_seed", "train_fraction", "validation_fraction")  # the data stage's params in dvc.yaml


def _record_data_params(root: Path, settings: "PipelineSettings") -> None:
    from flows.settings import PARAMS_FILE

    path = root / PARAMS_FILE
    raw = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    section = raw.setdefault("data", {})
    used = {name: getattr(settings.data, name) for name in DATA_PARAMS}
    if all(section.get(name) == value for name, value in used.items()):
        return
    logging.getLogger(__name__).warning("recording the data parameters of this run in %s: %s", path, used)
    section.update(used)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def dataset_hashes(root: Path) -> dict[str, str]:
    """``{dataset name: DVC md5}`` of the data stage's outputs, read from ``dvc.lock``.

    Raises:
        DataError: ``dvc.lock`` does not record the data stage yet.
    """
    lock = root / "dvc.lock"
    if not lock.is_file():
        raise DataError(f"{lock} is missing: run the data stage first (`dvc repro data` or the pipeline)")
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    outs = stages.get(DATA_STAGE, {}).get("outs", [])
    hashes = {Path(o["path"]).stem: o["md5"] for o in outs if "md5" in o}
    if not hashes:
        raise DataError(f"{lock} records no outputs of stage '{DATA_STAGE}': run `dvc repro data`")
    return hashes


def md5_file(path: Path) -> str:
    """md5 of a file's bytes (the hash DVC 3 records for a file output)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_datasets(root: Path, prepared: Path, names: tuple[str, ...] = DATASETS) -> dict[str, str]:
    """Check that each data file exists and matches the hash in ``dvc.lock``.

    Returns:
        ``{name: md5}`` of the checked files.

    Raises:
        DataError: a file is missing or its content differs from the recorded version; the
            message names the file and the command that restores it (``dvc pull``).
    """
    recorded = dataset_hashes(root) if (root / "dvc.lock").is_file() else {}
    found = {}
    for name in names:
        path = prepared / f"{name}.csv"
        if not path.is_file():
            raise DataError(f"data file {path} is missing; restore it with `dvc pull data` (or rebuild it with `dvc repro data`)")
        actual = md5_file(path)
        if name in recorded and recorded[name] != actual:
            raise DataError(
                f"data file {path} is corrupted or was changed by hand (md5 {actual}, dvc.lock records "
                f"{recorded[name]}); restore it with `dvc pull --force data` (or rebuild it with `dvc repro data`)"
            )
        found[name] = actual
    return found


def git_revision(root: Path) -> str:
    """The checked-out git commit of ``root`` (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")
