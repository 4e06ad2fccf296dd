"""The settings model: params.yaml round trip and clear errors for bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.settings import PipelineSettings, SettingsError, load_settings, validate_settings, write_settings

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
    from flows.settings import settings_table

    assert settings_table() in (REPO / "README.md").read_text(), "README's settings table is stale: paste flows.settings.settings_table()"


def test_params_yaml_names_every_setting():
    """dvc.yaml lists settings by name, and `dvc` refuses a stage whose parameter is missing from
    params.yaml: the file must hold every field of the settings model (a new field goes there too)."""
    import yaml

    from flows.settings import PipelineSettings

    def names(value, prefix=""):
        if isinstance(value, dict):
            return {n for k, v in value.items() for n in names(v, f"{prefix}{k}.")}
        return {prefix.rstrip(".")}

    written = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = names(PipelineSettings().model_dump(mode="json")) - names(written)
    assert not missing, f"params.yaml lacks {sorted(missing)}: add them (flows.settings.write_settings writes them all)"
