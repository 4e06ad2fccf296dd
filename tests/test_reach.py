"""Run parameters cannot reach outside what the operator allowed; credentials never reach a log."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.reach import (
    PROJECT_DIR_ENV,
    TRACKING_URIS_ENV,
    ReachError,
    check_gpu_deployment,
    check_tracking_uri,
    project_root,
    redact,
)
from flows.settings import PipelineSettings, SettingsError, validate_settings
from flows.tracking import run_url


@pytest.mark.parametrize(("uri", "shown"), [
    ("http://alice:s3cret@mlflow.example:5000/", "http://mlflow.example:5000/"),
    ("https://token@host/path?x=1", "https://host/path?x=1"),
    ("http://u:p@[::1]:5000", "http://[::1]:5000"),
    ("postgresql://user:pw@db/mlflow", "postgresql://db/mlflow"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlruns.db", "sqlite:////tmp/mlruns.db"),
    ("", ""),
])
def test_redact_strips_credentials_only(uri, shown):
    assert redact(uri) == shown
    assert "s3cret" not in redact(uri) and "pw@" not in redact(uri)


def test_run_page_address_never_carries_credentials():
    assert run_url("http://alice:s3cret@host:5000", "1", "abc") == "http://host:5000/#/experiments/1/runs/abc"


def test_project_dir_is_fixed_where_the_operator_fixed_it(tmp_path, monkeypatch):
    own, other = tmp_path / "project", tmp_path / "elsewhere"
    own.mkdir()
    other.mkdir()
    monkeypatch.delenv(PROJECT_DIR_ENV, raising=False)
    assert project_root(str(other)) == other.resolve()  # the command line: the caller owns the machine
    monkeypatch.setenv(PROJECT_DIR_ENV, str(own))
    assert project_root(str(own)) == own.resolve()
    assert project_root(str(own / "sub" / "..")) == own.resolve()
    for bad in (str(other), "/", str(own / "..")):
        with pytest.raises(ReachError, match="project_dir=.*not this worker's project folder") as error:
            project_root(bad)
        assert str(own) in str(error.value)


@pytest.mark.parametrize("name", ["", "attribution/gpu", "attribution/gpu-2", "attribution/a.b_c"])
def test_gpu_deployment_of_the_attribution_flow_is_accepted(name):
    assert check_gpu_deployment(name) == name


@pytest.mark.parametrize("name", ["pipeline/nightly", "attribution/", "attribution/../x", "other/gpu", "attribution/gpu;rm",
                                  "attribution/gpu/extra", " attribution/gpu"])
def test_other_deployments_are_refused(name):
    with pytest.raises(ReachError, match="gpu_deployment=.*attribution/<deployment>"):
        check_gpu_deployment(name)


def test_tracking_uri_allow_list(tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.delenv(TRACKING_URIS_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert check_tracking_uri("", root) == ""
    assert check_tracking_uri(f"sqlite:///{root}/other.db", root)
    for bad in ("http://evil.example:5000", f"sqlite:///{tmp_path}/outside.db", f"sqlite:///{root}/../outside.db",
                "file:///etc", "databricks"):
        with pytest.raises(ReachError, match="tracking.tracking_uri=.*not allowed"):
            check_tracking_uri(bad, root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    monkeypatch.setenv(TRACKING_URIS_ENV, "http://team-mlflow:5000, https://mlflow.example")
    for good in ("http://127.0.0.1:5001", "http://team-mlflow:5000", "https://mlflow.example"):
        assert check_tracking_uri(good, root) == good
    with pytest.raises(ReachError, match="team-mlflow"):  # the message lists what is accepted
        check_tracking_uri("http://evil.example:5000", root)
    monkeypatch.setenv(TRACKING_URIS_ENV, "http://bob:hunter2@team:5000")
    with pytest.raises(ReachError) as error:
        check_tracking_uri("http://x", root)
    assert "hunter2" not in str(error.value)


def test_settings_refuse_a_tracking_uri_with_credentials():
    data = PipelineSettings().model_dump(mode="json")
    data["tracking"]["tracking_uri"] = "http://alice:s3cret@mlflow.example:5000"
    with pytest.raises(SettingsError, match="tracking.*credentials") as error:
        validate_settings(data, "params.yaml")
    assert "s3cret" not in str(error.value)
    data["tracking"]["tracking_uri"] = "http://mlflow.example:5000"
    assert validate_settings(data, "params.yaml").tracking.tracking_uri == "http://mlflow.example:5000"


def test_pipeline_flow_refuses_before_any_work(tmp_path, monkeypatch):
    """The flows check their parameters first: a refused run leaves nothing behind in either folder."""
    from flows.explain import explain
    from flows.pipeline import attribution, pipeline

    own, other = tmp_path / "project", tmp_path / "elsewhere"
    own.mkdir()
    other.mkdir()
    monkeypatch.setenv(PROJECT_DIR_ENV, str(own))
    for call in (lambda: pipeline.fn(project_dir=str(other)), lambda: attribution.fn(project_dir=str(other)),
                 lambda: explain.fn(texts="a sentence", project_dir=str(other))):
        with pytest.raises(ReachError, match="project_dir"):
            call()
    with pytest.raises(ReachError, match="gpu_deployment"):
        pipeline.fn(project_dir=str(own), gpu_deployment="pipeline/nightly")
    settings = PipelineSettings().model_dump(mode="json")
    settings["tracking"]["tracking_uri"] = "http://evil.example:5000"
    monkeypatch.delenv(TRACKING_URIS_ENV, raising=False)
    with pytest.raises(ReachError, match="tracking_uri"):
        pipeline.fn(settings=settings, project_dir=str(own))
    for name in ("../params", "/etc/x", "no-such-profile", ".hidden"):  # the form's profile: a file of profiles/ or nothing
        with pytest.raises(SettingsError, match=f"profile '{re.escape(name)}'"):
            pipeline.fn(settings=PipelineSettings().model_dump(mode="json"), project_dir=str(own), profile=name)
    assert list(own.iterdir()) == [] and list(other.iterdir()) == []
    assert isinstance(ReachError("x"), SettingsError) and Path(own).is_dir()
