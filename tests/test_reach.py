"""Run parameters cannot reach outside what the operator allowed; credentials never reach a log."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from flows.guards.run_form import (
    PROJECT_DIR_ENV,
    TRACKING_URIS_ENV,
    ReachError,
    check_gpu_deployment,
    check_tracking_uri,
    project_root,
    redact,
)
from flows.definition.settings import PipelineSettings, SettingsError, validate_settings
from flows.reporting.mlflow_runs import run_url


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
    from flows.attribution import attribution
    from flows.pipeline import pipeline

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


def test_user_files_are_read_from_data_user_or_an_operator_folder_only(tmp_path, monkeypatch):
    from flows.guards.run_form import DATA_DIRS_ENV, check_user_file

    root, outside = tmp_path / "project", tmp_path / "outside"
    (root / "data" / "user").mkdir(parents=True)
    outside.mkdir()
    for folder in (root / "data" / "user", outside):
        (folder / "table.csv").write_text("text,label\na,x\nb,y\n")
    (root / "data" / "user" / "linked.csv").symlink_to(outside / "table.csv")
    monkeypatch.delenv(DATA_DIRS_ENV, raising=False)
    assert check_user_file("data.finetune_file", "data/user/table.csv", root) == (root / "data/user/table.csv").resolve()
    assert check_user_file("data.finetune_file", str(root / "data/user/table.csv"), root).is_file()
    for bad in (str(outside / "table.csv"), "../outside/table.csv", "data/user/../../outside/table.csv",
                "data/user/linked.csv", "params.yaml", "/etc/hosts"):
        with pytest.raises(ReachError, match=r"data.finetune_file=.*outside the folders user files are read from.*INFLUENCE_DATA_DIRS"):
            check_user_file("data.finetune_file", bad, root)
    monkeypatch.setenv(DATA_DIRS_ENV, f"{outside}:relative/ignored")
    assert check_user_file("data.pretrain_file", str(outside / "table.csv"), root) == outside / "table.csv"


def test_factory_restricted_to_data_user_or_the_operator_list_without_importing(tmp_path, monkeypatch):
    import sys

    from flows.guards.run_form import FACTORIES_ENV, check_factory

    root = tmp_path / "project"
    (root / "data" / "user" / "pkg").mkdir(parents=True)
    (root / "data" / "user" / "my_family.py").write_text("raise SystemExit('imported')\n")
    (root / "data" / "user" / "pkg" / "__init__.py").write_text("")
    (root / "data" / "user" / "pkg" / "fam.py").write_text("")
    (root / "data" / "user" / "json.py").write_text("")
    monkeypatch.delenv(FACTORIES_ENV, raising=False)
    assert check_factory("my_family:make", root) == (root / "data/user/my_family.py").resolve()
    assert check_factory("pkg.fam:make", root) == (root / "data/user/pkg/fam.py").resolve()
    for bad in ("os:getcwd", "test.autotest:x", "tests.families.hashed_words:make", "my_family", "my_family:",
                "my_family:make:x", "../my_family:make", "json:loads", "pkg:x.y", "missing:make"):
        before = set(sys.modules)
        with pytest.raises(ReachError, match=r"model.factory=.*data/user"):
            check_factory(bad, root)
        assert set(sys.modules) == before  # nothing was imported to decide
    monkeypatch.setenv(FACTORIES_ENV, "tests.families.hashed_words:make, team.models")
    assert check_factory("tests.families.hashed_words:make", root) is None
    assert check_factory("team.models:build", root) is None
    with pytest.raises(ReachError, match="tests.families.hashed_words:make"):  # the message lists the operator's list
        check_factory("tests.families.hashed_words:make_wrong", root)


def test_dask_address_and_store_from_operator_only(monkeypatch):
    from distributed.security import Security

    from flows.cluster import runners
    from flows.guards.run_form import DASK_ADDRESSES_ENV, STORES_ENV, check_dask_address, check_store

    for variable in (DASK_ADDRESSES_ENV, STORES_ENV, "DASK_SCHEDULER_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    assert check_dask_address("") == "" and check_store("") == ""
    with pytest.raises(ReachError, match=r"cluster.dask_address='tcp://10.0.0.1:8786' is not a scheduler the operator allows"):
        check_dask_address("tcp://10.0.0.1:8786")
    with pytest.raises(ReachError, match=r"cluster.store='file:///srv/elsewhere' is not an object store the operator allows"):
        check_store("file:///srv/elsewhere")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tls://scheduler:8786")
    monkeypatch.setenv(DASK_ADDRESSES_ENV, "tls://other:8786")
    monkeypatch.setenv(STORES_ENV, "s3://stages/team, file:///srv/store")
    assert check_dask_address("tls://scheduler:8786") and check_dask_address("tls://other:8786")
    assert check_store("s3://stages/team") and check_store("file:///srv/store")
    with pytest.raises(ReachError, match="tls://other:8786"):
        check_dask_address("tcp://10.0.0.1:8786")
    # a running scheduler is reached with the certificates of Dask's configuration (mutual TLS)
    import dask

    with pytest.raises(RuntimeError, match="DASK_DISTRIBUTED__COMM__TLS__CA_FILE"):
        runners.security("tls://scheduler:8786")
    with dask.config.set({"distributed.comm.tls.ca-file": "/certs/ca.pem", "distributed.comm.tls.client.cert": "/certs/c.pem",
                          "distributed.comm.tls.client.key": "/certs/c.key"}):
        found = runners.security("tls://scheduler:8786")
        assert isinstance(found, Security) and found.tls_ca_file == "/certs/ca.pem" and found.tls_client_cert == "/certs/c.pem"
        runner = runners.task_runner(runners.RunnerChoice("dask", 0, address="tls://scheduler:8786"))
        assert runner.client_kwargs["security"].tls_client_key == "/certs/c.key"
    local = runners.task_runner(runners.RunnerChoice("local-dask", 2, num_threads=1))
    assert local.cluster_kwargs["security"] is True and local.cluster_kwargs["host"] == "127.0.0.1"


def test_tracking_uri_refuses_server_stores(tmp_path, monkeypatch):
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.delenv(TRACKING_URIS_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert check_tracking_uri(f"sqlite:///{root}/mlruns.db", root)  # the command line's own store
    for bad in (f"sqlite:///{root}/.prefect/prefect.db", f"sqlite:///{root}/.prefect/auth/mlflow-auth.db",
                f"sqlite:///{root}/sub/prefect.db", f"sqlite:///{root}/.prefect/other.db"):
        with pytest.raises(ReachError, match="not allowed"):
            check_tracking_uri(bad, root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")  # the servers are configured (scripts/servers)
    with pytest.raises(ReachError, match="not allowed"):
        check_tracking_uri(f"sqlite:///{root}/mlruns.db", root)  # the MLflow server's own store: round its permissions
    assert check_tracking_uri(f"sqlite:///{root}/mlruns-scratch.db", root)


@pytest.mark.slow
def test_cli_and_flow_refuse_what_reaches_outside_before_any_work(project: Path, tmp_path, monkeypatch):
    """The issue's bar: a readable, well-formed table outside the project (by absolute path and by ../), a working
    factory outside data/user, a store and a scheduler the operator did not list: the CLI and the run form's flow each
    refuse within seconds, naming the field, before any work; params.yaml and the workspace are unchanged."""
    import subprocess
    import sys
    import time

    from flows.pipeline import pipeline

    table = tmp_path / "outside.csv"
    table.write_text("text,label,movie\n" + "".join(f"sentence {i},{'ab'[i % 2]},m{i % 7}\n" for i in range(60)))
    relative = os.path.relpath(table, project)
    cases = [
        ({"data": {"finetune_source": "file", "finetune_file": str(table)}}, "data.finetune_file"),
        ({"data": {"finetune_source": "file", "finetune_file": relative}}, "data.finetune_file"),
        ({"data": {"pretrain_source": "file", "pretrain_file": relative}}, "data.pretrain_file"),
        ({"model": {"family": "custom", "factory": "tests.families.hashed_words:make"}}, "model.factory"),
        ({"cluster": {"store": "file:///srv/elsewhere"}}, "cluster.store"),
        ({"cluster": {"runner": "dask", "dask_address": "tcp://10.0.0.1:8786"}}, "cluster.dask_address"),
    ]
    for variable in ("INFLUENCE_DATA_DIRS", "INFLUENCE_FACTORIES", "INFLUENCE_STORES", "INFLUENCE_DASK_ADDRESSES",
                     "DASK_SCHEDULER_ADDRESS", PROJECT_DIR_ENV):
        monkeypatch.delenv(variable, raising=False)
    params = project / "params.yaml"
    before = {p.relative_to(project).as_posix(): p.read_bytes() for p in project.rglob("*") if p.is_file() and ".git/" not in p.as_posix()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLUENCE_")}
    for overrides, field in cases:
        flags = [f"--set={section}.{name}={value}" for section, values in overrides.items() for name, value in values.items()]
        began = time.monotonic()
        refused = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--params", str(params), *flags], cwd=project,
                                 env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - began
        assert refused.returncode == 2 and field in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert took < 30, f"{field}: refused after {took:.1f} s"
        settings = PipelineSettings().model_dump(mode="json")
        for section, values in overrides.items():
            settings[section].update(values)
        began = time.monotonic()
        with pytest.raises(ReachError, match=re.escape(field)):
            pipeline.fn(settings=settings, project_dir=str(project))  # what a run from the form executes
        assert time.monotonic() - began < 10
    after = {p.relative_to(project).as_posix(): p.read_bytes() for p in project.rglob("*") if p.is_file() and ".git/" not in p.as_posix()}
    assert after == before and not (project / "artifacts").exists()


def test_internal_parameters_are_not_form_fields():
    """The run forms hold only what a form user may set: the attribution flow's parent and inputs reach it through the
    Prefect API and the object store, never as parameters (a form could forge them)."""
    from prefect.utilities.callables import parameter_schema

    from flows.explain import explain
    from flows.attribution import attribution
    from flows.pipeline import pipeline

    assert set(parameter_schema(attribution).properties) == {"settings", "project_dir", "force", "on_gpu_pool"}
    assert "workspace_token" not in parameter_schema(pipeline).properties
    k = parameter_schema(explain).properties["k"]
    assert (k["minimum"], k["maximum"]) == (1, 100)
