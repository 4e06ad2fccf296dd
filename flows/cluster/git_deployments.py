"""Deployments that travel: ``prefect.yaml``'s deployments, pulled by a worker as a git revision instead of run
from the deploying machine's folder.

:func:`git_prefect_file` rewrites ``prefect.yaml`` so that each flow run clones ``repository`` at the commit
``revision`` (Prefect's ``git_clone`` pull step) into the worker's working folder and runs there, with
``project_dir`` ``"."`` (the clone); every other part (the deployments, their schedules, pools and
parameters from ``params.yaml``) is the file's own. ``python -m flows.cli deploy-git --repository URL``
writes it to ``.prefect/prefect.git.yaml`` and deploys it. A worker that runs them needs the project's
environment (the image of ``infra/docker/``, or ``scripts/bootstrap``) and, for stages computed on other
machines, ``cluster.store``.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_revision(root: Path, revision: str) -> str:
    """The full commit sha of ``revision`` (a branch, tag or sha) in the repository at ``root``.

    Raises:
        ValueError: git does not know ``revision`` there.
    """
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0 or not COMMIT.fullmatch(done.stdout.strip()):
        raise ValueError(f"revision={revision!r} is not a commit of the repository at {root} (a branch, tag or sha)")
    return done.stdout.strip()


def git_prefect_file(prefect_file: dict[str, Any], repository: str, commit: str) -> dict[str, Any]:
    """``prefect_file`` (the parsed ``prefect.yaml``) with the pull steps of a git clone of ``repository`` at ``commit``.

    Args:
        prefect_file: the parsed ``prefect.yaml``.
        repository: what ``git clone`` takes (``https://...``, ``git://...``, ``ssh://...``).
        commit: a 40-character commit sha (:func:`resolve_revision`).

    Raises:
        ValueError: ``commit`` is not a full sha, or ``repository`` is empty.
    """
    if not COMMIT.fullmatch(commit):
        raise ValueError(f"commit={commit!r}: a 40-character commit sha (flows.cluster.git_deployments.resolve_revision)")
    if not repository.strip():
        raise ValueError("repository is empty: the URL a worker clones the project from")
    out = copy.deepcopy(prefect_file)
    out["pull"] = [
        {"prefect.deployments.steps.git_clone": {"id": "clone", "repository": repository, "commit_sha": commit}},
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ clone.directory }}"}},
    ]
    for step in out.get("build") or []:
        options = step.get("flows.definition.settings.deployment_parameters")
        if options is not None:
            options["project_dir"] = "."  # the clone, wherever the worker puts it
    for deployment in out.get("deployments", []):
        deployment.setdefault("tags", [])
        deployment["tags"] = [*deployment["tags"], f"git:{commit[:12]}"]
    return out


def write_git_prefect_file(root: Path, repository: str, revision: str, source: str = "prefect.yaml") -> Path:
    """Write ``.prefect/prefect.git.yaml`` from ``root/source`` for ``repository`` at ``revision``; its path."""
    commit = resolve_revision(root, revision)
    text = yaml.safe_dump(git_prefect_file(yaml.safe_load((root / source).read_text()), repository, commit), sort_keys=False)
    target = root / ".prefect" / "prefect.git.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# Written by `python -m flows.cli deploy-git` from {source}: commit {commit}.\n" + text)
    return target


__all__ = ["git_prefect_file", "resolve_revision", "write_git_prefect_file"]
