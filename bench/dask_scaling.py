"""Benchmark: the case-deletion stage's retrainings on 1, 2 and 4 Dask worker processes (one thread each).

The retraining groups of the ``deletion`` stage of a project where the pipeline has run (its scores in
``artifacts/``), the first ``--groups`` of them, are run as Prefect tasks through prefect-dask's
``DaskTaskRunner`` on a ``distributed.LocalCluster`` of ``w`` worker processes with one Dask thread and one
torch thread each, for every ``w`` of ``--workers``, each into its own fresh records folder (nothing is read
back). Prints per ``w``: the wall time of the tasks (the cluster started beforehand), the speed-up over
the first ``w``, the cluster's start time, and the overhead per task: ``(w * wall - sum of the tasks' own
compute time) / tasks`` (time a worker spends not training: Prefect's task engine, Dask's scheduling, the
transfers, and idle workers at the end). Checks that every ``w`` wrote the same records, byte for byte.
Run: ``.venv/bin/python bench/dask_scaling.py --project . [--groups 8 --workers 1,2,4]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from recording import add_json_option, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", default=".", help="a project folder where the pipeline has run")
    parser.add_argument("--groups", type=int, default=8, help="retraining groups timed (the stage's first ones)")
    parser.add_argument("--workers", default="1,2,4")
    add_json_option(parser, __file__)
    args = parser.parse_args()

    from prefect import flow, task, unmapped
    from prefect.testing.utilities import prefect_test_harness
    from prefect_dask import DaskTaskRunner

    from flows.experiment import retraining
    from flows.stages import entry
    from flows.experiment.experiment import Experiment
    from flows.definition.settings import load_settings
    from flows.experiment.workspace import Workspace

    root = Path(args.project).resolve()
    settings = load_settings(root / "params.yaml")
    x = Experiment.for_stage("deletion", settings, Workspace(root))
    grouped = retraining.groups(x, entry.plan("deletion", x), "finetune")[: args.groups]
    n_retrainings = sum(len(g) for g in grouped)

    @task(task_run_name="retrain-{group[0].key}")
    def timed_group(settings, root: Path, group: list, runs: Path) -> float:
        began = time.perf_counter()
        x = Experiment.for_stage("deletion", settings, Workspace(root))
        retraining.retrain_group(x, group, "finetune", num_threads=1, runs=runs)
        return time.perf_counter() - began

    @flow(name="dask-scaling")
    def timed(runs: Path) -> list[float]:
        futures = timed_group.map(unmapped(settings), unmapped(root), grouped, unmapped(runs))
        return [f.result() for f in futures]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; project {root}")
    print(f"{len(grouped)} retraining groups of the deletion stage ({n_retrainings} retrainings, "
          f"evaluation.retrain_group={settings.evaluation.retrain_group})")
    rows, records = [], {}
    from distributed import LocalCluster

    with prefect_test_harness(server_startup_timeout=180), tempfile.TemporaryDirectory() as scratch:
        for workers in [int(w) for w in args.workers.split(",")]:
            began = time.perf_counter()
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   host="127.0.0.1")
            started = time.perf_counter() - began
            try:
                runs = Path(scratch) / f"w{workers}"
                runs.mkdir()
                began = time.perf_counter()
                own = timed.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(runs)
                wall = time.perf_counter() - began
            finally:
                cluster.close()
            records[workers] = {p.name: p.read_bytes() for p in sorted(runs.iterdir())}
            overhead = (workers * wall - sum(own)) / len(own)
            rows.append((workers, wall, started, overhead, sum(own)))
    base = rows[0][1]
    print("| Dask workers | wall (s) | speed-up | cluster start (s) | task compute (s, sum) | overhead per task (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for workers, wall, started, overhead, compute in rows:
        print(f"| {workers} | {wall:.1f} | {base / wall:.2f}x | {started:.1f} | {compute:.1f} | {overhead:.2f} |")
    first = next(iter(records.values()))
    same = all(r == first for r in records.values())
    print(f"the same records from every cluster: {same} ({len(first)} records)")
    write(args.json, {"groups": len(grouped), "retrainings": n_retrainings, "same_records": same,
                      "rows": [{"workers": w, "wall_seconds": wall, "speedup": base / wall, "cluster_start_seconds": started,
                                "task_compute_seconds": compute, "overhead_per_task_seconds": overhead}
                               for w, wall, started, overhead, compute in rows]},
          [{"what": f"the case deletion's first {len(grouped)} retraining groups ({n_retrainings} retrainings) on {w} Dask "
                    f"worker(s), one thread each",
            "figure": f"{wall:.1f} s ({base / wall:.2f}x), overhead per task {overhead:.1f} s"}
           for w, wall, started, overhead, compute in rows])


if __name__ == "__main__":
    main()
