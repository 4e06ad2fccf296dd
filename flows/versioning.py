"""DVC and git: record the data version of every run, and check data files before use.

The ``data`` stage of ``dvc.yaml`` writes the normalized tables. After a pipeline run writes them,
:func:`commit_data` records them in ``dvc.lock`` and the DVC cache (``dvc commit``) and pushes them
to the default remote (``dvc push``), exactly as ``dvc repro data && dvc push`` would.
"""

from __future__ import annotations

import json
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

from flows.stage_table import DATA_STAGE_PARAMS as DATA_PARAMS  # the data stage's params in dvc.yaml
from influence.exceptions import DataError
from influence.storage import atomic_write, file_digest

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
        settings: the settings the data stage ran with; ``dvc.lock`` records its parameters (``DATA_PARAMS``) with
            these values, those the data were made with. ``params.yaml`` is never written: a value from a run form
            or ``--set`` stays out of the project's settings file (``dvc status`` then rightly reports the data
            stage's parameters as changed from ``params.yaml``, which ``dvc repro`` would build the data from).
        push: also ``dvc push`` the data to the default remote.
    """
    from flows.dvc_file import commit_stages

    commit_stages(root, [DATA_STAGE])
    if settings is not None:
        _record_data_params(root, settings)
    if push:
        run_dvc(root, "push", DATA_STAGE)
    return dataset_hashes(root)


def _record_data_params(root: Path, settings: "PipelineSettings") -> None:
    """Write the data parameters ``settings`` holds into the data stage's entry of ``dvc.lock`` (not ``params.yaml``)."""
    from flows.settings import PARAMS_FILE

    path = root / "dvc.lock"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    lock = yaml.load(path.read_text(), Loader=loader) or {}
    recorded = lock.get("stages", {}).get(DATA_STAGE, {}).setdefault("params", {}).setdefault(PARAMS_FILE, {})
    used = {f"data.{name}": getattr(settings.data, name) for name in DATA_PARAMS}
    if all(recorded.get(name) == value for name, value in used.items()):
        return
    logging.getLogger(__name__).info("dvc.lock records the data parameters of this run (params.yaml differs): %s",
                                     {k: v for k, v in used.items() if recorded.get(k) != v})
    recorded.update(used)
    atomic_write(path, yaml.safe_dump(lock, sort_keys=False, width=120))


def _lock_hashes(text: str, where: str) -> dict[str, str]:
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
    return _lock_hashes(lock.read_text(), str(lock))


def data_revision_marker(root: Path) -> Path:
    """``data/prepared/.revision.json``: present while the workspace holds the data of another revision."""
    return root / "data" / "prepared" / ".revision.json"


def resolve_revision(root: Path, rev: str) -> str:
    """The full commit sha that the git revision ``rev`` (commit, branch, tag, ``HEAD~1``...) names.

    Raises:
        DataError: ``rev`` names no commit of the repository at ``root``.
    """
    bad = not isinstance(rev, str) or not rev.strip() or rev.startswith("-") or any(c in rev for c in "\0\n\r")
    proc = None if bad else subprocess.run(  # --end-of-options: a revision is never read as an option of git
        ["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"], cwd=root,
        capture_output=True, text=True)
    if proc is None or proc.returncode != 0:
        raise DataError(
            f"data_rev {rev!r} is not a git revision of {root}; accepted: a commit sha, a branch or a tag "
            f"(`git log --oneline -- dvc.lock` lists the commits that changed the data version), or '' for the "
            f"data the workspace builds"
        )
    return proc.stdout.strip()


def revision_hashes(root: Path, rev: str) -> dict[str, str]:
    """``{dataset: md5}`` that ``dvc.lock`` records at git revision ``rev``.

    Raises:
        DataError: ``rev`` is not a revision, or its ``dvc.lock`` has no data version.
    """
    commit = resolve_revision(root, rev)
    proc = subprocess.run(["git", "show", f"{commit}:dvc.lock"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"data_rev {rev!r} (commit {commit[:12]}) has no dvc.lock: no data version was committed there")
    return _lock_hashes(proc.stdout, f"dvc.lock at data_rev {rev!r} (commit {commit[:12]})")


def checkout_data_revision(root: Path, rev: str, prepared: Path) -> dict[str, object]:
    """Put the DVC-tracked data of git revision ``rev`` into ``prepared`` (``dvc get --rev``).

    Files already holding that version are left alone; the others come from the DVC cache or the
    default remote. A marker records the revision so that later stages check the files against
    its hashes and the report records it.

    Returns:
        ``{"rev": rev, "commit": full sha, "hashes": {dataset: md5}}``.

    Raises:
        DataError: ``rev`` is not a revision or has no data version, or a fetched file does not
            match its recorded hash.
    """
    commit = resolve_revision(root, rev)
    hashes = revision_hashes(root, commit)
    prepared.mkdir(parents=True, exist_ok=True)
    for name, md5 in hashes.items():
        path = prepared / f"{name}.csv"
        if path.is_file() and md5_file(path) == md5:
            continue
        target = path.relative_to(root) if path.is_relative_to(root) else path
        run_dvc(root, "get", ".", str(target), "--rev", commit, "-o", str(path), "--force")
        if md5_file(path) != md5:
            raise DataError(f"{path} fetched for data_rev {rev!r} has md5 {md5_file(path)}, expected {md5}")
    version = {"rev": rev, "commit": commit, "hashes": hashes}
    atomic_write(data_revision_marker(root), json.dumps(version, indent=1, sort_keys=True))
    return version


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
