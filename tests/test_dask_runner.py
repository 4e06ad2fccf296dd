"""The retrainings of the evidence stages on a Dask cluster (prefect-dask's task runner) give the same records
as on threads, and the cluster settings are checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.settings import load_settings, with_overrides


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_the_runner_follows_the_cluster_settings(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows import runners
    from flows.settings import PipelineSettings

    monkeypatch.delenv(runners.DASK_ADDRESS_ENV, raising=False)
    monkeypatch.setattr(runners.os, "cpu_count", lambda: 8)
    base = PipelineSettings()
    threads = runners.choose(base)
    assert (threads.kind, threads.workers, threads.num_threads) == ("threads", 2, 4)
    assert isinstance(runners.task_runner(threads), ThreadPoolTaskRunner)
    local = runners.choose(with_overrides(base, {"cluster": {"runner": "dask"}, "evaluation": {"workers": 4}}))
    assert (local.kind, local.workers, local.num_threads) == ("local-dask", 4, 2)
    runner = runners.task_runner(local)
    assert isinstance(runner, DaskTaskRunner)
    assert runner.cluster_kwargs["n_workers"] == 4 and runner.cluster_kwargs["threads_per_worker"] == 1
    remote = runners.choose(with_overrides(base, {"cluster": {"runner": "dask", "dask_address": "tcp://10.0.0.1:8786"}}))
    assert (remote.kind, remote.address, remote.num_threads) == ("dask", "tcp://10.0.0.1:8786", None)
    assert runners.task_runner(remote).address == "tcp://10.0.0.1:8786"
    monkeypatch.setenv(runners.DASK_ADDRESS_ENV, "tcp://10.0.0.2:8786")
    assert runners.choose(with_overrides(base, {"cluster": {"runner": "dask"}})).address == "tcp://10.0.0.2:8786"
    assert runners.choose(base).kind == "threads"  # the environment alone does not move the work to Dask
    for bad in ("10.0.0.1:8786", "http://10.0.0.1:8786", "tcp://10.0.0.1"):
        with pytest.raises(ValueError, match="tcp://host:port"):
            with_overrides(base, {"cluster": {"runner": "dask", "dask_address": bad}})


@pytest.mark.slow
def test_retrainings_on_a_local_dask_cluster_equal_those_on_threads(project: Path, prefect_harness):
    from flows import retraining, runners
    from flows.experiment import Experiment
    from flows.pipeline import pipeline, retrainings
    from flows.workspace import Workspace

    settings = with_overrides(load_settings(project / "params.yaml"),
                              {"evaluation": {"enabled": True, "mislabel_fraction": 0.0, "methods": ["grad_cos", "if"]}})
    pipeline(settings=settings, project_dir=str(project))  # the case deletion's retrainings on threads
    runs = retraining.runs_folder(Experiment.for_stage("deletion", settings, Workspace(project)), "finetune")
    on_threads = {path.name: path.read_bytes() for path in runs.iterdir()}
    assert len(on_threads) > 4
    shutil.rmtree(runs)

    on_dask = with_overrides(settings, {"cluster": {"runner": "dask"}})
    assert retraining.runs_folder(Experiment.for_stage("deletion", on_dask, Workspace(project)), "finetune") == runs
    runner = runners.task_runner(runners.choose(on_dask))
    count = retrainings.with_options(task_runner=runner)("deletion", on_dask, str(project))
    assert count == len(on_threads)
    assert {path.name: path.read_bytes() for path in runs.iterdir()} == on_threads  # the same records, bit for bit
