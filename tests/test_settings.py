"""The settings model: params.yaml round trip and clear errors for bad values."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.definition.settings import PipelineSettings, SettingsError, load_settings, validate_settings, write_settings

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_settings_model_defaults():
    assert load_settings(REPO / "params.yaml") == PipelineSettings()


def test_round_trip(tmp_path):
    settings = PipelineSettings()
    write_settings(settings, tmp_path / "params.yaml")
    assert load_settings(tmp_path / "params.yaml") == settings


@pytest.mark.parametrize(
    ("raw", "field", "accepted"),
    [
        ({"attribution": {"solver": "newton"}}, "attribution.solver", "'exact', 'cg', 'arnoldi' or 'ekfac'"),
        ({"finetune": {"modes": ["frozen"]}}, "finetune.modes.0", "'fixed' or 'updated'"),
        ({"data": {"train_fraction": 1.5}}, "data.train_fraction", "less than 1"),
        ({"pretrain": {"epochs": 0}}, "pretrain.epochs", "greater than or equal to 1"),
        ({"attribution": {"sovler": "cg"}}, "attribution.sovler", "unknown setting"),
    ],
)
def test_bad_values_name_field_and_accepted_values(raw, field, accepted):
    with pytest.raises(SettingsError) as info:
        validate_settings(raw, source="params.yaml")
    message = str(info.value)
    assert field in message and accepted in message and "params.yaml" in message


def test_cross_field_rules():
    with pytest.raises(SettingsError, match="evaluation.mode='updated' is not among finetune.modes"):
        validate_settings({"finetune": {"modes": ["fixed"]}, "evaluation": {"mode": "updated"}})
    with pytest.raises(SettingsError, match="train_fraction \\+ validation_fraction"):
        validate_settings({"data": {"train_fraction": 0.9, "validation_fraction": 0.2}})
    only_updated = {"finetune": {"modes": ["updated"]}, "evaluation": {"pretrain_deletion": True, "pretrain_modes": ["fixed", "updated"]}}
    with pytest.raises(SettingsError, match=r"pretrain_modes=\['fixed', 'updated'\]: \['fixed'\] not among finetune.modes"):
        validate_settings(only_updated)
    with pytest.raises(SettingsError, match=r"names 'magic', whose stage attribution.magic=false turns off"):
        validate_settings({"attribution": {"magic": False}, "evaluation": {"methods": ["if", "magic"]}})
    assert not validate_settings({"attribution": {"magic": False}}).attribution.magic  # the default methods leave it out
    with pytest.raises(SettingsError, match="names a mode twice"):
        validate_settings({"evaluation": {"pretrain_modes": ["fixed", "fixed"]}})
    assert validate_settings({"evaluation": {"pretrain_modes": ["fixed", "updated"]}}).evaluation.pretrain_modes == ["fixed", "updated"]


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: [unclosed")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(tmp_path / "params.yaml")


def test_cli_refuses_bad_params_before_any_work(tmp_path):
    raw = PipelineSettings().model_dump(mode="json")
    raw["attribution"]["measurement"] = "accuracy"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--params", str(tmp_path / "params.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "attribution.measurement = 'accuracy'" in proc.stderr and "'loss' or 'margin'" in proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "artifacts").exists()


def test_settings_digest_changes_with_values():
    assert PipelineSettings().digest() != validate_settings({"seed": 1}).digest()


def test_readme_documents_every_setting():
    from flows.definition.settings import settings_table

    assert settings_table() in (REPO / "docs" / "settings.md").read_text(), "docs/settings.md's table is stale: paste flows.definition.settings.settings_table()"


def test_params_yaml_names_every_setting():
    """dvc.yaml lists settings by name, and `dvc` refuses a stage whose parameter is missing from
    params.yaml: the file must hold every field of the settings model (a new field goes there too)."""
    import yaml

    from flows.definition.settings import PipelineSettings

    def names(value, prefix=""):
        if isinstance(value, dict):
            return {n for k, v in value.items() for n in names(v, f"{prefix}{k}.")}
        return {prefix.rstrip(".")}

    written = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = names(PipelineSettings().model_dump(mode="json")) - names(written)
    assert not missing, f"params.yaml lacks {sorted(missing)}: add them (flows.definition.settings.write_settings writes them all)"


# -- random settings (Hypothesis): accepted and runnable, or refused naming the field ----------------

def _leaves(model, prefix=""):
    """``[(dotted name, field)]`` of every leaf setting."""
    from pydantic import BaseModel

    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _leaves(annotation, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", field))
    return found


LEAVES = _leaves(PipelineSettings)


def _values():
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.integers(-(2**70), 2**70), st.integers(-3, 300),
        st.floats(allow_nan=True, allow_infinity=True), st.floats(-1.0, 2.0),
        st.booleans(), st.none(), st.text(max_size=8),
        st.sampled_from(["fixed", "updated", "cg", "arnoldi", "all", "head", "encoder", "encodr", "loss", "file", "minilm"]),
    )
    return st.one_of(scalars, st.lists(scalars, max_size=3))


def _set(raw, dotted, value):
    *path, leaf = dotted.split(".")
    node = raw
    for part in path:
        node = node[part]
    node[leaf] = value


def _mutations(names):
    from hypothesis import strategies as st

    return st.lists(st.tuples(st.sampled_from(names), _values()), min_size=1, max_size=3, unique_by=lambda m: m[0])


def test_random_settings_are_accepted_or_refused_naming_a_changed_field(tmp_path_factory):
    """Up to three settings set to random values (out of range, of the wrong type, infinite, NaN, unknown
    module names): either the settings validate (and survive params.yaml unchanged) or the error names one
    of the changed fields."""
    from hypothesis import HealthCheck, given, settings

    folder = tmp_path_factory.mktemp("random-settings")

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_mutations([name for name, _ in LEAVES]))
    def check(mutations):
        raw = PipelineSettings().model_dump(mode="json")
        for name, value in mutations:
            _set(raw, name, value)
        try:
            accepted = validate_settings(raw)
        except SettingsError as error:
            message = str(error)
            assert any(name.rsplit(".", 1)[-1] in message for name, _ in mutations), (mutations, message)
            return
        write_settings(accepted, folder / "params.yaml")
        assert load_settings(folder / "params.yaml") == accepted

    check()


def test_known_bad_settings_are_refused_at_parse_time():
    """What used to fail minutes into a run: unbounded seeds and counts, inf/nan rates, a rank above the
    iterations, a one-example train split, unknown module names."""
    cases = [
        ({"seed": 2**40}, "seed"),
        ({"seed": -1}, "seed"),
        ({"attribution": {"cg_iterations": 10**9}}, "attribution.cg_iterations"),
        ({"pretrain": {"learning_rate": float("inf")}}, "pretrain.learning_rate"),
        ({"finetune": {"alpha": float("nan")}}, "finetune.alpha"),
        ({"attribution": {"damping": float("nan")}}, "attribution.damping"),
        ({"attribution": {"arnoldi_rank": 40, "arnoldi_iterations": 30}}, "arnoldi_rank=40 exceeds arnoldi_iterations=30"),
        ({"data": {"finetune_train_examples": 1}}, "finetune_train_examples=1"),
        ({"attribution": {"if_params": ["encoder", "haed"]}}, "['haed'] name no module of the 'cnn' classifier"),
        ({"attribution": {"shared_params": ["embeding"]}}, "attribution.shared_params"),
        ({"evaluation": {"mislabel_params": ["all", "head"]}}, "mislabel_params"),
        ({"attribution": {"if_params": ["head; rm -rf"]}}, "are not module or parameter names"),
    ]
    for raw, named in cases:
        with pytest.raises(SettingsError, match=re.escape(named)):
            validate_settings(raw)
    custom = validate_settings({"model": {"family": "custom", "factory": "pkg.mod:make"},
                                "attribution": {"if_params": ["bert.encoder.layer.5"]}})
    assert custom.attribution.if_params == ["bert.encoder.layer.5"]  # other families: checked by the features stage


@pytest.mark.slow
def test_random_accepted_data_settings_run_the_first_stages(tmp_path, raw_wheels):
    """Random values of the settings the first stages read (data, features): each accepted set runs both."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from flows.stages.entry import run_stage
    from flows.experiment.workspace import Workspace
    from tests.conftest import TINY_SETTINGS, make_project

    root = make_project(tmp_path / "project", tmp_path / "remote", raw_wheels)
    ws = Workspace(root)
    base = validate_settings(TINY_SETTINGS).model_dump(mode="json")
    fields = st.fixed_dictionaries({}, optional={
        "seed": st.integers(-1, 2**32), "split_seed": st.integers(-1, 2**32),
        "train_fraction": st.floats(0.0, 1.0), "validation_fraction": st.floats(0.0, 1.0),
        "pretrain_sentences": st.integers(50, 400), "finetune_train_examples": st.integers(0, 300),
        "max_length": st.integers(2, 40), "vocab_min_count": st.integers(0, 3), "vocab_max_size": st.integers(50, 900),
        "queries": st.integers(0, 6),
    })

    @settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(fields)
    def check(values):
        raw = json.loads(json.dumps(base))
        for name, value in values.items():
            section = "" if name == "seed" else "attribution" if name == "queries" else "data"
            (raw[section] if section else raw)[name] = value
        raw["evaluation"]["queries"] = min(raw["evaluation"]["queries"], max(raw["attribution"]["queries"], 1))
        try:
            accepted = validate_settings(raw)
        except SettingsError as error:
            assert any(name in str(error) for name in values), (values, str(error))
            return
        for stage in ("data", "features"):
            result = run_stage(stage, accepted, ws)
            assert result.outputs and all((root / path).exists() for path in result.outputs.values())

    check()


def test_every_profile_applies_over_params_yaml():
    """A profile names only settings that exist, with values they accept (what `--profile NAME` checks at start)."""
    from flows.definition.settings import load_profile

    names = sorted(p.stem for p in (REPO / "profiles").glob("*.yaml"))
    assert {"minilm-cpu", "minilm-gpu", "multistage-converged"} <= set(names)
    for name in names:
        load_profile(load_settings(REPO / "params.yaml"), name, REPO)
    converged = load_profile(load_settings(REPO / "params.yaml"), "multistage-converged", REPO)
    assert converged.evaluation.pretrain_deletion and converged.evaluation.pretrain_modes == ["fixed", "updated"]
