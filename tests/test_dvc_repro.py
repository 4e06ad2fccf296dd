"""`dvc repro` runs the same stages as the Prefect flow, through the same entry points."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from safetensors.torch import load_file

from flows import stages
from flows.settings import load_settings
from flows.workspace import STAGES, StageResult, Workspace
from tests.conftest import DVC


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_and_the_exact_solver_agrees_with_cg(project):
    proc = subprocess.run([DVC, "repro"], cwd=project, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    ws = Workspace(project)
    report = StageResult.load(ws, "report")
    assert report.info["mlflow_run_id"] and (project / report.outputs["report"]).is_file()

    # nothing changed: a second repro runs nothing
    again = subprocess.run([DVC, "repro"], cwd=project, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout

    # the exact solver on the same workspace gives the CG scores
    settings = load_settings(project / "params.yaml")
    cg = {m: load_file(str(project / "artifacts" / "influence" / f"{m}.safetensors"))["scores"] for m in settings.finetune.modes}
    exact_settings = settings.model_copy(update={"attribution": settings.attribution.model_copy(update={"solver": "exact"})})
    stages.influence(exact_settings, ws)
    for mode in settings.finetune.modes:
        exact = load_file(str(project / "artifacts" / "influence" / f"{mode}.safetensors"))["scores"]
        assert exact.shape == cg[mode].shape
        correlation = float(((exact - exact.mean()) * (cg[mode] - cg[mode].mean())).sum() / (exact.std() * cg[mode].std() * (exact.numel() - 1)))
        assert correlation > 0.99, (mode, correlation)
