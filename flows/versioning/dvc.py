"""What the flows do with DVC: record and push the data version, check out another, record the stages in ``dvc.lock``.

After a pipeline run writes the data stage's tables, :func:`commit_data` records them in ``dvc.lock`` and
the DVC cache (``dvc commit``) and pushes them to the default remote (``dvc push``), exactly as
``dvc repro data && dvc push`` would; :func:`checkout_data_revision` puts the data of an earlier git
revision in place (``dvc get --rev``). :func:`record_stages` is the flow's side of one bookkeeping: after a
flow run, it records in ``dvc.lock`` (as ``dvc commit`` would) every stage the flow ran or found current,
so ``dvc status`` reports nothing changed, except for the stages run with settings that differ from
``params.yaml`` (``--set`` or the UI form), which ``dvc status`` rightly reports as changed (``dvc repro``
would recompute them from the file). Reading which data a workspace holds is :mod:`flows.versioning.data_version`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from flows.definition.settings import PipelineSettings

from flows.definition import stage_table
from flows.definition.stage_table import DATA_STAGE_PARAMS as DATA_PARAMS  # the data stage's params in dvc.yaml
from flows.versioning.data_version import DATA_STAGE, data_revision_marker, dataset_hashes, md5_file, lock_hashes
from influence.exceptions import DataError, invalid
from influence.storage import atomic_write


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

    commit_stages(root, [DATA_STAGE])
    if settings is not None:
        _record_data_params(root, settings)
    if push:
        run_dvc(root, "push", DATA_STAGE)
    return dataset_hashes(root)


def _record_data_params(root: Path, settings: "PipelineSettings") -> None:
    """Write the data parameters ``settings`` holds into the data stage's entry of ``dvc.lock`` (not ``params.yaml``)."""
    from flows.definition.settings import PARAMS_FILE

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
    return lock_hashes(proc.stdout, f"dvc.lock at data_rev {rev!r} (commit {commit[:12]})")


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


def _value(values: dict, dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def matching_params(root: Path, settings: Any, names: list[str]) -> list[str]:
    """The stages among ``names`` whose declared settings equal those of ``<root>/params.yaml``."""
    from flows.definition.settings import PARAMS_FILE, load_settings

    path = Path(root) / PARAMS_FILE
    if not path.is_file():
        return []
    written, used = load_settings(path).model_dump(mode="json"), settings.model_dump(mode="json")
    return [n for n in names if all(_value(written, p) == _value(used, p) for p in stage_table.row(n).params)]


def commit_stages(root: Path, names: list[str]) -> None:
    """``dvc commit --force`` of the stages ``names``, without DVC's run cache.

    The run cache would copy every uncached output into ``.dvc/cache`` (and rewrite it in the
    workspace) so that ``dvc repro`` could restore it; the pipeline keeps its own past versions
    (:mod:`flows.incremental.stage_cache`). Cached outputs (the prepared data) go into the cache as with the CLI.
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


__all__ = ["checkout_data_revision", "commit_data", "commit_stages", "matching_params", "record_stages", "resolve_revision",
           "revision_hashes", "run_dvc"]
