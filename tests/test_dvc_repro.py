"""`dvc repro` runs the same stages as the Prefect flow, through the same entry points; its outputs agree with a
stored reference within stated tolerances (``tests/stage_values.py``: the same ids and integers, scores that
correlate and differ by at most a small share, the same top examples and verdicts where they are no near tie),
so the test holds on any CPU, whose kernels round floats their own way; and a stage run again on the same machine
gives the same bytes. Regenerate the reference when a change of numbers is meant:
``UPDATE_GOLDEN=1 pytest tests/test_dvc_repro.py``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from flows.stages import entry as stages
from flows.definition.settings import load_settings
from flows.definition.stage_table import NAMES as STAGES
from flows.experiment.workspace import StageResult, Workspace
from tests.conftest import DVC


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_and_the_exact_solver_agrees_with_cg(project):
    from flows.definition.settings import with_overrides, write_settings
    from tests.stage_digests import stage_digests

    nightly = {"attribution": {"multistage_magic": True},  # every stage computes
               "evaluation": {"lds": True, "lds_subsets": 4, "lds_small_subsets": 4, "pretrain_deletion": True}}
    write_settings(with_overrides(load_settings(project / "params.yaml"), nightly), project / "params.yaml")
    proc = subprocess.run([DVC, "repro"], cwd=project, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tests import stage_values

    reference = Path(__file__).parent / "golden" / "stage_values"
    found = stage_values.stage_values(project)
    if os.environ.get("UPDATE_GOLDEN") == "1":  # a change of numbers that is meant
        stage_values.save(found, reference)
    problems = stage_values.compare(found, stage_values.load(reference))
    assert not problems, "stage outputs differ from the reference beyond the tolerances:\n" + "\n".join(problems)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    ws = Workspace(project)
    report = StageResult.load(ws, "report")
    assert report.info["mlflow_run_id"] and (project / report.outputs["report"]).is_file()

    # nothing changed: a second repro runs nothing
    again = subprocess.run([DVC, "repro"], cwd=project, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout

    # a stage run again on this machine gives the same bytes (the flow's entry point, as dvc repro's)
    before = {k: v for k, v in stage_digests(project).items() if k.startswith("tracin_last/")}
    stages.run_stage("tracin_last", load_settings(project / "params.yaml"), ws)
    assert before and {k: v for k, v in stage_digests(project).items() if k.startswith("tracin_last/")} == before

    # the exact solver on the same workspace gives the CG scores
    settings = load_settings(project / "params.yaml")
    cg = {m: load_file(str(project / "artifacts" / "influence" / f"{m}.safetensors"))["scores"] for m in settings.finetune.modes}
    exact_settings = settings.model_copy(update={"attribution": settings.attribution.model_copy(update={"solver": "exact"})})
    stages.run_stage("influence", exact_settings, ws)
    for mode in settings.finetune.modes:
        exact = load_file(str(project / "artifacts" / "influence" / f"{mode}.safetensors"))["scores"]
        assert exact.shape == cg[mode].shape
        correlation = float(((exact - exact.mean()) * (cg[mode] - cg[mode].mean())).sum() / (exact.std() * cg[mode].std() * (exact.numel() - 1)))
        assert correlation > 0.99, (mode, correlation)
        cg[mode] = exact

    # bfloat16 gradients: the index rows are stored in bfloat16, the scores stay those of float32
    half = exact_settings.model_copy(update={"attribution": exact_settings.attribution.model_copy(update={"gradient_dtype": "bfloat16"})})
    stages.run_stage("influence", half, ws)
    for mode in settings.finetune.modes:
        scores = load_file(str(project / "artifacts" / "influence" / f"{mode}.safetensors"))["scores"]
        manifest = json.loads((project / "artifacts" / "influence" / mode / "index" / "manifest.json").read_text())
        assert manifest["storage_dtype"] == "bfloat16"
        error = float((scores - cg[mode]).abs().max() / cg[mode].abs().max())
        assert 0 < error < 2e-2, (mode, error)
