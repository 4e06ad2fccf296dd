"""The Prefect task runner of the parallel work (the retrainings of the evidence stages), from ``cluster``.

``cluster.runner = "threads"`` (the default): a thread pool of ``evaluation.workers`` in the flow's own
process. ``"dask"``: prefect-dask's ``DaskTaskRunner`` on the distributed scheduler of
``cluster.dask_address`` (or ``$DASK_SCHEDULER_ADDRESS``), else on a ``distributed.LocalCluster`` of
``evaluation.workers`` worker processes with one thread each, started for the subflow and closed after
it. Dask reschedules the task of a worker that dies on another worker; a retraining group writes its
record only when it is complete, so a rescheduled group starts again from nothing.

Dask's protocol carries pickled payloads, so whoever reaches a scheduler runs code on its workers and in the
flow run: the address comes only from the operator (:func:`flows.guards.run_form.check_dask_address`), a running
scheduler is reached with the TLS certificates of Dask's own configuration (``distributed.comm.tls.*``, e.g.
``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` and ``DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT``/``__KEY``: mutual TLS),
and a LocalCluster talks TLS on loopback with certificates made for it (``security=True``), so another user
of the machine cannot submit work to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

DASK_ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"


@dataclass(frozen=True)
class RunnerChoice:
    """What :func:`task_runner` builds, and the torch intra-op threads each task should use.

    Attributes:
        kind: ``"threads"``, ``"local-dask"`` (a LocalCluster started here) or ``"dask"`` (a running scheduler).
        workers: tasks at once (threads or local worker processes); ``0`` for a running scheduler (its workers decide).
        address: the scheduler's address (``"dask"`` only).
        num_threads: torch intra-op threads per task: this machine's cores shared among ``workers``; ``None`` on a
            running scheduler's workers (torch's default there: their ``OMP_NUM_THREADS`` or their cores).
    """

    kind: str
    workers: int
    address: str = ""
    num_threads: int | None = None


def choose(settings: Any) -> RunnerChoice:
    """The runner of ``settings.cluster`` for ``settings.evaluation.workers`` parallel tasks."""
    workers, cluster = settings.evaluation.workers, settings.cluster
    shared = max(1, (os.cpu_count() or 1) // workers)
    if cluster.runner == "threads":
        return RunnerChoice("threads", workers, num_threads=shared)
    address = cluster.dask_address or os.environ.get(DASK_ADDRESS_ENV, "")
    if address:
        return RunnerChoice("dask", 0, address=address)
    return RunnerChoice("local-dask", workers, num_threads=shared)


def task_runner(choice: RunnerChoice) -> Any:
    """The Prefect task runner of ``choice``: ``ThreadPoolTaskRunner`` or prefect-dask's ``DaskTaskRunner``."""
    if choice.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=choice.workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as error:  # the cluster extra is not installed
        raise RuntimeError(f"cluster.runner='dask' needs prefect-dask and distributed (pip install "
                           f"'influence-platform[cluster]'): {error}") from None
    if choice.kind == "dask":
        return DaskTaskRunner(address=choice.address, client_kwargs={"security": security(choice.address)})
    # one process per worker, one Dask thread each (torch's own threads: num_threads); no dashboard port to bind;
    # TLS with certificates made for this cluster (security=True): no other local user can submit work to it
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": choice.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "host": "127.0.0.1", "security": True})


def security(address: str) -> Any:
    """The ``distributed.security.Security`` that reaches the scheduler ``address``: Dask's configuration's TLS
    certificates (mutual TLS when a client certificate is configured).

    Raises:
        RuntimeError: a ``tls://`` address without a CA file in Dask's configuration.
    """
    from distributed.security import Security

    found = Security()  # reads distributed.comm.tls.* (files the operator holds, e.g. from a mounted Secret)
    if address.startswith("tls://") and not found.tls_ca_file:
        raise RuntimeError(f"cluster.dask_address={address!r} uses TLS but Dask's configuration names no CA file: set "
                           "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
                           "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY where the flow runs (infra/README.md)")
    return found
