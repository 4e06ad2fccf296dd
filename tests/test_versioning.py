"""DVC versioning of the data stage in a temporary git repository: commit, push, pull, checks."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from flows.definition.settings import load_settings
from flows.stages.entry import run_stage
from flows.versioning.data_version import dataset_hashes, md5_file, verify_datasets
from flows.versioning.dvc import commit_data
from flows.experiment.workspace import Workspace
from influence.exceptions import DataError
from tests.conftest import DVC


def test_data_stage_is_versioned_pushed_and_restorable(project):
    ws = Workspace(project)
    result = run_stage("data", load_settings(project / "params.yaml"), ws)
    assert result.metrics["finetune_rows"] > 12000 and result.metrics["pretrain_rows"] > 50000
    hashes = commit_data(project)
    assert set(hashes) == {"pretrain", "finetune", "mnist"}
    for name, digest in hashes.items():
        assert md5_file(ws.dataset(name)) == digest
    assert verify_datasets(project, ws.prepared) == hashes

    ws.dataset("finetune").unlink()
    with pytest.raises(DataError, match=r"finetune\.csv is missing; restore it with `dvc pull data`"):
        verify_datasets(project, ws.prepared)

    with open(ws.dataset("pretrain"), "a") as handle:
        handle.write("tampered\n")
    with pytest.raises(DataError, match=r"pretrain\.csv is corrupted.*`dvc pull --force data`"):
        verify_datasets(project, ws.prepared, names=("pretrain",))

    shutil.rmtree(project / ".dvc" / "cache")  # only the remote holds the data now
    pulled = subprocess.run([DVC, "pull", "--force", "data"], cwd=project, capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert verify_datasets(project, ws.prepared) == hashes
    assert dataset_hashes(project) == hashes


def test_stage_before_data_names_the_missing_file(project):
    with pytest.raises(DataError, match="dvc.lock is missing|is missing"):
        run_stage("features", load_settings(project / "params.yaml"), Workspace(project))


def test_data_parameters_of_a_run_go_to_dvc_lock_never_to_params_yaml(project):
    """A run whose data settings differ from params.yaml (a run form, --set) records them in dvc.lock's data stage;
    params.yaml, the project's own settings file, is never written (a form value must not reach the nightly)."""
    import yaml

    from flows.definition.settings import validate_settings
    from flows.versioning.dvc import _record_data_params

    params, lock = project / "params.yaml", project / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  data:\n    cmd: python -m flows.cli stage data\n")  # as dvc commit leaves it
    _record_data_params(project, load_settings(params))
    before, lock_before = params.read_text(), lock.read_text()
    settings = load_settings(params)
    _record_data_params(project, settings.model_copy(update={"seed": 7}))
    assert params.read_text() == before and lock.read_text() == lock_before  # a non-data override changes nothing
    changed = validate_settings({**settings.model_dump(), "data": {**settings.data.model_dump(), "split_seed": 99}})
    _record_data_params(project, changed)
    assert params.read_text() == before
    recorded = yaml.safe_load(lock.read_text())["stages"]["data"]["params"]["params.yaml"]
    assert recorded["data.split_seed"] == 99 and recorded["data.train_fraction"] == settings.data.train_fraction
