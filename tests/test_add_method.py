"""docs/extending.md, followed in a throw-away copy of the project: a method, a stage and a solver, each added in the
files the guide names and nowhere else.

- a toy attribution method (shared words, signed by label agreement): its library module, its stage module
  (``score``), one row of the stage table, ``dvc.yaml`` regenerated; it becomes a choice of ``evaluation.methods``,
  a table of the report and a method the case-deletion check retrains for;
- a toy stage that is not a method (the vocabulary's commonest words): its stage module (``run`` and a
  ``report_section``), one row, ``dvc.yaml`` regenerated; ``dvc repro`` runs it and the report shows its line;
- a toy inverse-Hessian solver (a scaled identity): its library module and one line of the solvers' registry;
  ``influence.attribute`` takes it by name, and an attribution index refuses it (it keeps no state).
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

METHOD_STAGE = '''"""The ``shared_words`` stage: the toy method of docs/extending.md."""

from influence.methods.shared_words import shared_words_scores


def score(x, mode):
    return shared_words_scores(x.split("queries"), x.split("train"), x.family.vocab_size)
'''

TOY_STAGE = '''"""The ``common_words`` stage: the vocabulary's commonest words in the finetuning train split."""

from collections import Counter
from pathlib import Path

from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage


@stage("common_words")
def run(x: Experiment, result: StageResult) -> None:
    train, family = x.split("train"), x.family
    counts = Counter(t for row in train.tokens.tolist() for t in row if t not in family.special_ids and t != family.pad_id)
    words = [[family.token_strings([t])[0], n] for t, n in counts.most_common(5)]
    result.outputs["words"] = x.write_json("words.json", words)
    result.metrics["distinct_words"] = float(len(counts))


def report_section(x: Experiment, results: dict, folder: Path) -> dict:
    words = x.read_json("common_words", "words.json")
    return {"summary": {"commonest words": ", ".join(w for w, _ in words)}}
'''

ROWS = '''    Stage("shared_words", params=SCORE_PARAMS, inputs=SCORE_INPUTS, method="shared_words", source="finetuning",
          title="shared words", score="flows.stages.shared_words:score"),
    Stage("common_words", params=("seed",), inputs=("features",)),
    Stage("deletion",'''

SOLVER = '''"""A toy inverse-Hessian solver: the Hessian taken as the identity, ``(I + damping I)^{-1} = I / (1 + damping)``."""

from influence.solvers.base import InverseHessianSolver


class IdentitySolver(InverseHessianSolver):
    name = "identity"

    def _fit(self, objective):
        pass

    def _solve(self, rhs):
        return rhs / (1.0 + self.damping)
'''

USE_SOLVER = '''
import torch
from influence import attribute
from influence.exceptions import InvalidArgumentError
from influence.index import AttributionIndex
from influence.task import ClassificationTask

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
rows = [{"inputs": torch.randn(4, dtype=torch.float64), "label": torch.tensor(i % 3)} for i in range(12)]
task = ClassificationTask()
toy = attribute(task, model, rows[:9], rows[9:], method="if", solver="identity", damping=1.0)
dot = attribute(task, model, rows[:9], rows[9:], method="grad_dot")
ratio = toy / dot
print(json.dumps({"shape": list(toy.shape), "ratio": [float(ratio.min()), float(ratio.max())]}))
try:
    AttributionIndex.fit(sys.argv[1], task, model, rows[:9], solver="identity")
except InvalidArgumentError as error:
    print("refused:", error)
'''


@pytest.mark.slow
def test_a_method_a_stage_and_a_solver_join_through_the_files_the_guide_names(project: Path):
    # a method: 1. the library function, 2. its stage module, 3. one row, 4. dvc.yaml regenerated
    (project / "influence" / "methods" / "shared_words.py").write_text(LIBRARY)
    (project / "flows" / "stages" / "shared_words.py").write_text(METHOD_STAGE)
    # a stage: its module and one row (with the method's, before the evidence stages), dvc.yaml regenerated
    (project / "flows" / "stages" / "common_words.py").write_text(TOY_STAGE)
    table = project / "flows" / "definition" / "stage_table.py"
    table.write_text(table.read_text().replace('    Stage("deletion",', ROWS, 1))
    python = [sys.executable, "-m", "flows.cli"]
    subprocess.run([*python, "dvc-yaml"], cwd=project, check=True, capture_output=True)
    changed = {line[3:] for line in git(project, "status", "--porcelain").splitlines()}
    assert changed == {"dvc.yaml", "flows/definition/stage_table.py", "flows/stages/common_words.py",
                       "flows/stages/shared_words.py", "influence/methods/shared_words.py"}
    entries = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "flows/stages/common_words.py" in entries["common_words"]["deps"]
    assert "flows/stages/common_words.py" not in entries["shared_words"]["deps"]  # one module per stage: its own deps

    # the settings accept the new method by its name; the case-deletion check retrains for it
    subprocess.run([*python, "check", "--set", "evaluation.methods=[shared_words, if]"], cwd=project, check=True)
    params = project / "params.yaml"
    values = yaml.safe_load(params.read_text())
    values["evaluation"]["methods"] = ["shared_words"]
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    proc = subprocess.run([DVC, "repro", "shared_words", "common_words"], cwd=project, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Running stage 'shared_words'" in proc.stdout and "Running stage 'common_words'" in proc.stdout
    from safetensors.torch import load_file

    scores = load_file(str(project / "artifacts" / "shared_words" / "updated.safetensors"))["scores"]
    assert scores.shape[0] == 3 and scores.abs().sum() > 0
    words = json.loads((project / "artifacts" / "common_words" / "words.json").read_text())
    assert len(words) == 5 and all(n > 0 for _, n in words)
    # the case-deletion stage retrains for the chosen method (it reads the scores of the methods chosen only)
    subprocess.run([*python, "stage", "deletion"], cwd=project, check=True, capture_output=True, timeout=600)
    checks = json.loads((project / "artifacts" / "deletion" / "deletion.json").read_text())
    assert {c["method"] for c in checks} == {"shared_words"} and len(checks) == 2 * 2  # 2 kinds x 2 k
    result = json.loads((project / "artifacts" / "deletion" / "result.json").read_text())
    assert "shared_words.passed_fraction" in result["metrics"]

    # a solver: its module and one line of the registry; the library takes it by name
    (project / "influence" / "solvers" / "identity.py").write_text(SOLVER)
    registry = project / "influence" / "solvers" / "__init__.py"
    text = registry.read_text().replace('    "ekfac": EkfacSolver,\n', '    "ekfac": EkfacSolver,\n    "identity": IdentitySolver,\n', 1)
    registry.write_text(text.replace("from influence.solvers.exact import", "from influence.solvers.identity import IdentitySolver\nfrom influence.solvers.exact import", 1))
    used = subprocess.run([sys.executable, "-c", "import json, sys\n" + USE_SOLVER, str(project / "index")], cwd=project,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(project), "PATH": ""})
    assert used.returncode == 0, used.stderr[-3000:]
    found, refused = used.stdout.splitlines()
    ratio = json.loads(found)["ratio"]  # influence with H = I, damping 1: (1/n) g_q.g_z / 2, against g_q.g_z
    assert json.loads(found)["shape"] == [3, 9] and abs(ratio[0] - ratio[1]) < 1e-9 * abs(ratio[0])
    assert refused.startswith("refused:") and "identity" in refused
