"""`dvc repro` runs the same stages as the Prefect flow, through the same entry points, and their
outputs are bit-identical to those of the code before the pipeline's refactoring into one experiment
object and one stage table (``tests/golden/stage_digests.json``, made by that code on the same tiny
settings with ``python -m tests.stage_digests``; regenerate it when a change of numbers is meant:
``UPDATE_GOLDEN=1 pytest tests/test_dvc_repro.py``).

Bit-identical floats hold for one set of CPU kernels only: two CPUs of the same lock (here, one with
AMX and one without) round differently in the matrix multiplies. The golden file is therefore a list
of digest sets, one per machine kind it was made on (the first made here); a run must equal one of
them on every file that set names (an older set may name fewer: outputs changed by a later, meant
change of numbers that could not be re-made on that machine are left out of it)."""

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
    golden_path = Path(__file__).parent / "golden" / "stage_digests.json"
    found = stage_digests(project)
    if os.environ.get("UPDATE_GOLDEN") == "1":  # a change of numbers that is meant: this machine's set first
        golden_path.write_text(json.dumps([found], indent=1, sort_keys=True) + "\n")
    sets = json.loads(golden_path.read_text())
    assert sorted(found) == sorted(sets[0])
    differing = [{k: v for k, v in found.items() if k in golden and golden[k] != v} for golden in sets]
    assert min(differing, key=len) == {}, "stage outputs differ from every set of golden digests"
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
