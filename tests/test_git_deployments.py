"""Deployments that travel: prefect.yaml rewritten to pull the project as a git commit (flows.cluster.git_deployments)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cluster.git_deployments import git_prefect_file, resolve_revision

REPO = Path(__file__).resolve().parents[1]


def test_the_deployments_pull_a_commit_and_run_in_the_clone():
    source = yaml.safe_load((REPO / "prefect.yaml").read_text())
    commit = "0123456789abcdef0123456789abcdef01234567"
    out = git_prefect_file(source, "git://10.0.0.1/project", commit)
    assert out["pull"][0] == {"prefect.deployments.steps.git_clone": {
        "id": "clone", "repository": "git://10.0.0.1/project", "commit_sha": commit}}
    assert out["pull"][1]["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ clone.directory }}"
    assert [d["name"] for d in out["deployments"]] == [d["name"] for d in source["deployments"]]
    assert all(f"git:{commit[:12]}" in d["tags"] for d in out["deployments"])
    assert out["build"][0]["flows.definition.settings.deployment_parameters"]["project_dir"] == "."
    assert source["pull"][0].keys() == {"prefect.deployments.steps.set_working_directory"}  # the source is untouched
    for bad in ("HEAD", "0123456"):
        with pytest.raises(ValueError, match="40-character commit sha"):
            git_prefect_file(source, "git://h/p", bad)
    with pytest.raises(ValueError, match="repository is empty"):
        git_prefect_file(source, " ", commit)


def test_deploy_git_writes_the_file_of_a_resolved_commit(tmp_path):
    from flows.definition.settings import deployment_parameters

    root = tmp_path / "project"
    root.mkdir()
    for name in ("prefect.yaml", "params.yaml"):
        (root / name).write_bytes((REPO / name).read_bytes())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "one", "--allow-empty"], cwd=root, check=True)
    head = resolve_revision(root, "HEAD")
    with pytest.raises(ValueError, match="not a commit"):
        resolve_revision(root, "no-such-branch")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "deploy-git", "--repository", "https://git.example/p.git",
                           "--write-only", "--params", str(root / "params.yaml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    written = yaml.safe_load((root / ".prefect" / "prefect.git.yaml").read_text())
    assert written["pull"][0]["prefect.deployments.steps.git_clone"]["commit_sha"] == head
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "deploy-git", "--repository", "x", "--revision", "nope",
                          "--write-only", "--params", str(root / "params.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and "revision='nope'" in bad.stderr
    assert deployment_parameters(str(root / "params.yaml"), project_dir=".")["project_dir"] == "."
    assert deployment_parameters(str(root / "params.yaml"))["project_dir"] == str(root)
