"""Which data a workspace holds: the data version a run used, read from ``dvc.lock`` or a checked-out revision's marker,
and the prepared tables checked against it before a stage reads them (read-only: acting on DVC is
:mod:`flows.versioning.data_version.dvc`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from influence.exceptions import DataError
from influence.storage import file_digest

DATASETS = ("pretrain", "finetune", "mnist")
DATA_STAGE = "data"


def lock_hashes(text: str, where: str) -> dict[str, str]:
    # dvc.lock lists every stage's dependencies (about 100 kB): libyaml's parser reads it about 8x faster than pure Python (measured)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    stages = (yaml.load(text, Loader=loader) or {}).get("stages", {})
    outs = stages.get(DATA_STAGE, {}).get("outs", [])
    hashes = {Path(o["path"]).stem: o["md5"] for o in outs if "md5" in o}
    if not hashes:
        raise DataError(f"{where} records no outputs of stage '{DATA_STAGE}': run `dvc repro data` (and commit dvc.lock)")
    return hashes


def dataset_hashes(root: Path) -> dict[str, str]:
    """``{dataset name: DVC md5}`` of the data in the workspace.

    That is the data stage's outputs as ``dvc.lock`` records them, or, after a run with a
    ``data_rev``, those of that revision (:func:`checkout_data_revision` leaves a marker).

    Raises:
        DataError: ``dvc.lock`` does not record the data stage yet.
    """
    marker = data_revision_marker(root)
    if marker.is_file():
        return dict(json.loads(marker.read_text())["hashes"])
    lock = root / "dvc.lock"
    if not lock.is_file():
        raise DataError(f"{lock} is missing: run the data stage first (`dvc repro data` or the pipeline)")
    return lock_hashes(lock.read_text(), str(lock))


def data_revision_marker(root: Path) -> Path:
    """``data/prepared/.revision.json``: present while the workspace holds the data of another revision."""
    return root / "data" / "prepared" / ".revision.json"


def workspace_data_is_current(root: Path, prepared: Path) -> bool:
    """True when ``prepared`` holds the data ``dvc.lock`` records (not another revision's, not edited)."""
    if data_revision_marker(root).is_file():
        return False
    try:
        verify_datasets(root, prepared)
    except DataError:
        return False
    return True


def md5_file(path: Path) -> str:
    """md5 of a file's bytes (the hash DVC 3 records for a file output)."""
    return file_digest(path, "md5")


def verify_datasets(root: Path, prepared: Path, names: tuple[str, ...] = DATASETS) -> dict[str, str]:
    """Check that each data file exists and matches the hash in ``dvc.lock``.

    Returns:
        ``{name: md5}`` of the checked files.

    Raises:
        DataError: a file is missing or its content differs from the recorded version; the
            message names the file and the command that restores it (``dvc pull``).
    """
    recorded = dataset_hashes(root) if (root / "dvc.lock").is_file() or data_revision_marker(root).is_file() else {}
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


def data_version(root: Path) -> dict[str, str]:
    """Which data the workspace holds: ``{"rev": ..., "commit": ...}``.

    ``rev`` is the ``data_rev`` of the run that checked it out, or ``"workspace"`` when the data
    stage built it (its version is then the one ``dvc.lock`` records at ``commit``).
    """
    marker = data_revision_marker(root)
    if marker.is_file():
        found = json.loads(marker.read_text())
        return {"rev": str(found["rev"]), "commit": str(found["commit"])}
    return {"rev": "workspace", "commit": git_revision(root)}


__all__ = ["DATASETS", "DATA_STAGE", "lock_hashes", "data_revision_marker", "data_version", "dataset_hashes", "git_revision", "md5_file",
           "verify_datasets", "workspace_data_is_current"]
