"""DVC versioning of the data stage in a temporary git repository: commit, push, pull, checks."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from flows.settings import load_settings
from flows.stages import run_stage
from flows.versioning import commit_data, dataset_hashes, md5_file, verify_datasets
from flows.workspace import Workspace
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


def test_only_changed_data_parameters_are_recorded_in_params_yaml(project):
    from flows.settings import validate_settings
    from flows.versioning import _record_data_params

    params = project / "params.yaml"
    before = params.read_text()
    settings = load_settings(params)
    _record_data_params(project, settings.model_copy(update={"seed": 7}))
    assert params.read_text() == before  # a non-data override leaves the file alone
    changed = validate_settings({**settings.model_dump(), "data": {**settings.data.model_dump(), "split_seed": 99}})
    _record_data_params(project, changed)
    after = load_settings(params)
    assert after.data.split_seed == 99 and after.seed == settings.seed and after.data.pretrain_sentences == settings.data.pretrain_sentences
