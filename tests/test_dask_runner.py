"""The cluster settings choose the task runner of the evidence stages' retrainings (threads, a local Dask cluster,
or a Dask scheduler's address). That the records on Dask equal those on threads is checked by
tests/test_object_store.py (a local cluster) and tests/test_multi_host.py (a scheduler on another host)."""

from __future__ import annotations

import pytest

from flows.definition.settings import with_overrides


def test_the_runner_follows_the_cluster_settings(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.cluster import runners
    from flows.definition.settings import PipelineSettings

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
