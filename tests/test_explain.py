"""The explain flow's input checks (fast); the flow itself runs on a finished pipeline in
``tests/test_pipeline_e2e.py`` and from the Prefect UI in ``tests/test_servers.py``."""

from __future__ import annotations

import pytest

from flows.answers import explanation as explaining
from flows.experiment.workspace import StageResult, Workspace
from influence.exceptions import InvalidArgumentError


def test_texts_are_one_sentence_per_line():
    assert explaining.parse_texts("  first one \n\n second\n") == ["first one", "second"]
    with pytest.raises(InvalidArgumentError, match="at least one non-empty line"):
        explaining.parse_texts(" \n \n")
    with pytest.raises(InvalidArgumentError, match="at most 50 lines"):
        explaining.parse_texts("\n".join(f"sentence {i}" for i in range(51)))


def test_model_is_latest_or_the_last_runs_id(tmp_path):
    ws = Workspace(tmp_path)
    assert explaining.resolve_model(ws, "latest") == ""
    with pytest.raises(InvalidArgumentError, match="none yet"):
        explaining.resolve_model(ws, "abc123")
    result = StageResult("report")
    result.info["mlflow_run_id"] = "abc123"
    result.save(ws)
    assert explaining.resolve_model(ws, "latest") == explaining.resolve_model(ws, "abc123") == "abc123"
    with pytest.raises(InvalidArgumentError, match="abc123"):
        explaining.resolve_model(ws, "def456")


def test_mode_must_be_one_of_the_runs(tmp_path):
    from flows.experiment.experiment import Experiment
    from flows.definition.settings import PipelineSettings

    settings = PipelineSettings().model_copy(update={"finetune": PipelineSettings().finetune.model_copy(update={"modes": ["fixed"]})})
    with pytest.raises(InvalidArgumentError, match=r"finetune.modes"):
        explaining.explain_texts(Experiment(settings, Workspace(tmp_path)), ["a sentence"], "updated", 2)


def test_k_is_capped():
    assert explaining.check_k(1) == 1 and explaining.check_k(explaining.MAX_K) == explaining.MAX_K
    for bad in (0, -3, explaining.MAX_K + 1, 10**9, 2.5, True, "5"):
        with pytest.raises(InvalidArgumentError, match=r"k.*an integer from 1 to 100"):
            explaining.check_k(bad)
