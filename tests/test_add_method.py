"""Adding an attribution method touches three files: its library module, the stage table, dvc.yaml.

The recipe of README ("Adding a method"), followed in a throw-away copy of the project: a toy method
(shared words, signed by label agreement) becomes a stage, a choice of ``evaluation.methods``, a
table of the report and a method the case-deletion check retrains for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import DVC, git

LIBRARY = '''"""A toy attribution method: the words a query shares with a training example, signed by label agreement."""

import torch
import torch.nn.functional as F


def shared_words_scores(query_data, train_data, vocab_size: int) -> torch.Tensor:
    """``[m, n]``: distinct words shared by query and example, positive when their labels agree."""
    def bags(data):
        return F.one_hot(data.tokens, vocab_size).amax(dim=1)[:, 1:].float()  # padding id 0 left out

    agree = (query_data.labels[:, None] == train_data.labels[None, :]).float() * 2 - 1
    return bags(query_data) @ bags(train_data).T * agree
'''

ADAPTER = '''

def _shared_words(x, mode):
    from influence.methods.shared_words import shared_words_scores

    return shared_words_scores(x.split("queries"), x.split("train"), x.family.vocab_size)


STAGES: tuple[Stage, ...] = ('''

ROW = '''    Stage("shared_words", params=SCORE_PARAMS, inputs=SCORE_INPUTS, method="shared_words", source="finetuning",
          title="shared words", score=_shared_words),
    Stage("deletion",'''


@pytest.mark.slow
def test_a_toy_method_joins_the_pipeline_through_three_files(project: Path):
    (project / "influence" / "methods" / "shared_words.py").write_text(LIBRARY)  # 1. the library function
    table = project / "flows" / "stage_table.py"  # 2. one row (and its adapter) in the stage table
    text = table.read_text()
    text = text.replace("\n\nSTAGES: tuple[Stage, ...] = (", ADAPTER, 1).replace('    Stage("deletion",', ROW, 1)
    table.write_text(text)
    python = [sys.executable, "-m", "flows.cli"]
    subprocess.run([*python, "dvc-yaml"], cwd=project, check=True, capture_output=True)  # 3. dvc.yaml regenerated
    changed = {line[3:] for line in git(project, "status", "--porcelain").splitlines()}
    assert changed == {"dvc.yaml", "flows/stage_table.py", "influence/methods/shared_words.py"}

    # the settings accept the new method by its name; the case-deletion check retrains for it
    subprocess.run([*python, "check", "--set", "evaluation.methods=[shared_words, if]"], cwd=project, check=True)
    params = project / "params.yaml"
    values = yaml.safe_load(params.read_text())
    values["evaluation"]["methods"] = ["shared_words"]
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    proc = subprocess.run([DVC, "repro", "shared_words"], cwd=project, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Running stage 'shared_words'" in proc.stdout and "Running stage 'finetune'" in proc.stdout
    from safetensors.torch import load_file

    scores = load_file(str(project / "artifacts" / "shared_words" / "updated.safetensors"))["scores"]
    assert scores.shape[0] == 3 and scores.abs().sum() > 0
    # the case-deletion stage retrains for the chosen method (it reads the scores of the methods chosen only)
    subprocess.run([*python, "stage", "deletion"], cwd=project, check=True, capture_output=True, timeout=600)
    checks = json.loads((project / "artifacts" / "deletion" / "deletion.json").read_text())
    assert {c["method"] for c in checks} == {"shared_words"} and len(checks) == 2 * 2  # 2 kinds x 2 k
    result = json.loads((project / "artifacts" / "deletion" / "result.json").read_text())
    assert "shared_words.passed_fraction" in result["metrics"]
