"""The stage table is the one list of stages: everything derived from it agrees, and it is enforced."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.definition import stage_table
from flows.definition.stage_table import BY_NAME, CHECKED_METHODS, GPU_STAGES, NAMES, STAGES

REPO = Path(__file__).resolve().parents[1]


def test_table_is_consistent_and_every_list_is_derived_from_it():
    from flows import cli
    from flows import pipeline
    from flows.definition.settings import EvaluationSettings

    stage_table.check_table()
    assert NAMES[0] == "data" and NAMES[-1] == "report" and len(set(NAMES)) == len(NAMES)
    assert cli.build_parser().parse_args(["stage", "tracin_last"]).name == "tracin_last"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["stage", "no_such_stage"])
    assert set(pipeline.CPU_STAGES) | set(GPU_STAGES) == set(NAMES) - {"data", "report"}
    assert GPU_STAGES == ("gradients", "influence", "multistage", "tracin_we", "tracin_last", "grad_cos", "magic", "multistage_magic")
    literal = EvaluationSettings.model_fields["methods"].annotation.__args__[0].__args__
    assert tuple(literal) == CHECKED_METHODS == ("if", "tracin_we", "tracin_last", "grad_cos", "magic")
    for row in STAGES:  # every row runs through an entry point that exists
        module, function = row.entry.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), row.entry
        assert set(row.inputs) <= set(NAMES[: NAMES.index(row.name)])


def test_the_switches_of_score_stages_are_no_parameter_of_the_stages_that_read_the_rest_of_attribution(monkeypatch):
    """Turning MAGIC or multi-stage MAGIC on or off must not re-run the influence function: those stages
    declare every attribution setting but the switches, and a setting added to neither list is refused."""
    for name in ("influence", "multistage", "mislabel"):
        params = BY_NAME[name].params
        assert "attribution" not in params and "attribution.magic" not in params and "attribution.multistage_magic" not in params
    assert "attribution.magic" in BY_NAME["magic"].params and "attribution.multistage_magic" in BY_NAME["multistage_magic"].params
    from flows.definition.settings import check_attribution_params

    check_attribution_params()
    monkeypatch.setattr(stage_table, "ATTRIBUTION_PARAMS", stage_table.ATTRIBUTION_PARAMS[:-1])
    with pytest.raises(ValueError, match=r"must split the attribution settings: missing \['attribution.device'\]"):
        check_attribution_params()


def test_dvc_yaml_is_the_rendered_table():
    from flows.incremental.dvc_yaml import dvc_yaml

    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(), "dvc.yaml is stale: run `python -m flows.cli dvc-yaml`"


def test_a_stage_reading_an_undeclared_setting_or_input_fails_naming_it(tmp_path):
    from flows.definition.declared import UndeclaredSettingError, declared_settings
    from flows.experiment.experiment import Experiment, UndeclaredInputError
    from flows.definition.settings import PipelineSettings
    from flows.experiment.workspace import Workspace

    settings = PipelineSettings()
    seen = declared_settings(settings, "pretrain", BY_NAME["pretrain"].params)
    assert seen.pretrain.epochs == settings.pretrain.epochs and seen.seed == settings.seed
    with pytest.raises(UndeclaredSettingError, match=r"stage 'pretrain' read the setting 'finetune\.epochs'"):
        range(seen.finetune.epochs)
    with pytest.raises(UndeclaredSettingError, match="attribution.solver"):
        if seen.attribution.solver == "cg":
            pass
    partial = declared_settings(settings, "gradients", BY_NAME["gradients"].params)
    assert partial.attribution.if_params == settings.attribution.if_params
    with pytest.raises(UndeclaredSettingError, match="attribution.damping"):
        float(partial.attribution.damping)
    x = Experiment.for_stage("pretrain", settings, Workspace(tmp_path))
    with pytest.raises(UndeclaredInputError, match=r"stage 'pretrain' read the outputs of stage 'finetune'"):
        x.path("finetune", "fixed", "model.safetensors")
    with pytest.raises(UndeclaredInputError, match="dataset 'finetune'"):
        x.dataset_path("finetune")
    assert x.path("features", "vocab.json") == tmp_path / "artifacts" / "features" / "vocab.json"


def test_code_fingerprint_covers_the_code_a_stage_runs_and_no_more(monkeypatch):
    from flows.definition.code_deps import code_files
    from flows.stages import grad_cos, lds
    from flows.incremental.stage_cache import stage_code
    from flows.stages.entry import entry_functions

    files = {name: set(code_files(entry_functions(name))) for name in NAMES}
    assert "influence/models/training.py" in files["pretrain"] and "flows/experiment/recipes.py" in files["pretrain"]
    assert not any(f.startswith("influence/solvers") or f.startswith("influence/methods") for f in files["pretrain"])
    assert "influence/solvers/cg.py" in files["influence"] and "influence/methods/influence_function.py" in files["influence"]
    assert "flows/stages/report.py" in files["report"] and all("flows/stages/report.py" not in files[n] for n in NAMES if n != "report")
    assert "flows/experiment/retraining.py" in files["deletion"] and "flows/experiment/retraining.py" not in files["finetune"]

    before = {name: stage_code(name) for name in NAMES}
    # an edit of one stage's function changes that stage's code fingerprint only
    body = lds.run.__wrapped__
    monkeypatch.setattr(body, "__code__", body.__code__.replace(co_consts=body.__code__.co_consts + ("edited",)))
    after = {name: stage_code(name) for name in NAMES}
    assert [n for n in NAMES if before[n] != after[n]] == ["lds"]
    # and the score callable of a table row is part of its stage's code only
    monkeypatch.setattr(grad_cos.score, "__code__", grad_cos.score.__code__.replace(co_consts=grad_cos.score.__code__.co_consts + ("x",)))
    assert [n for n in NAMES if after[n] != stage_code(n)] == ["grad_cos"]
