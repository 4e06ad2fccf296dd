"""Local server mode with the real servers: ``scripts/servers`` on free loopback ports.

A throw-away project (git + DVC, tiny settings) gets its own Prefect server, MLflow server, work
pool, deployment and worker; the tests trigger ``pipeline/on-demand`` the way the UI's Run button
does (the deployment's ``create_flow_run`` endpoint) and read the result back from both servers.
The servers are always stopped, and the last test checks that nothing of them is left.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_project

STARTUP_BAR_SECONDS = 60
RUN_TIMEOUT_SECONDS = 900
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

pytestmark = pytest.mark.slow


@dataclass
class Servers:
    root: Path
    env: dict[str, str]
    prefect_url: str
    mlflow_url: str
    startup_seconds: float  # from `scripts/servers start` until both health endpoints answer
    start_seconds: float  # the whole start command (pool, deploy, worker)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)

    def log(self, name: str) -> str:
        path = self.root / ".prefect" / "run" / f"{name}.log"
        return path.read_text()[-4000:] if path.is_file() else f"(no {name} log)"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def servers(tmp_path_factory, raw_wheels, request) -> Servers:
    base = tmp_path_factory.mktemp("servers")
    root = make_project(
        base / "project", base / "remote", raw_wheels,
        extra=("scripts", "prefect.yaml", "requirements.lock", "pyproject.toml"),
    )
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])  # the tested venv; bootstrap finds it current
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_"))}
    env.update(
        PREFECT_PORT=str(_free_port()), MLFLOW_PORT=str(_free_port()), PREFECT_HOME=str(root / ".prefect"),
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",  # the nightly schedule's runs appear at once
    )
    prefect_url, mlflow_url = f"http://127.0.0.1:{env['PREFECT_PORT']}", f"http://127.0.0.1:{env['MLFLOW_PORT']}"
    script = str(root / "scripts" / "servers")
    request.addfinalizer(lambda: subprocess.run([script, "stop"], cwd=root, env=env, timeout=180))

    began = time.monotonic()
    start = subprocess.Popen([script, "start"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    startup = None
    while start.poll() is None or startup is None:
        if startup is None and _answers(f"{prefect_url}/api/health") and _answers(f"{mlflow_url}/health"):
            startup = time.monotonic() - began
        if start.poll() is not None and startup is None:
            break
        time.sleep(0.25)
    output = start.communicate(timeout=300)[0]
    total = time.monotonic() - began
    print(f"\nscripts/servers start: both servers answered after {startup} s; the command took {total:.1f} s\n{output}")
    assert start.returncode == 0, f"scripts/servers start failed:\n{output}"
    env["PREFECT_API_URL"] = f"{prefect_url}/api"  # for the test's own `prefect` commands
    return Servers(root, env, prefect_url, mlflow_url, startup, total)


def test_both_servers_answer_within_a_minute(servers: Servers):
    print(f"both UIs answered {servers.startup_seconds:.1f} s after `scripts/servers start`")
    assert servers.startup_seconds < STARTUP_BAR_SECONDS
    status = servers.run(str(servers.root / "scripts" / "servers"), "status")
    assert status.returncode == 0 and servers.prefect_url in status.stdout and servers.mlflow_url in status.stdout


def _deployment(servers: Servers) -> dict:
    import httpx

    response = httpx.get(f"{servers.prefect_url}/api/deployments/name/pipeline/on-demand", timeout=10)
    response.raise_for_status()
    return response.json()


def _run_count(servers: Servers, deployment_id: str) -> int:
    import httpx

    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    response = httpx.post(f"{servers.prefect_url}/api/flow_runs/count", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def test_deployment_form_defaults_come_from_params_yaml(servers: Servers):
    from flows.settings import load_settings

    deployment = _deployment(servers)
    assert deployment["work_pool_name"] == "cpu"
    assert deployment["parameters"]["settings"] == load_settings(servers.root / "params.yaml").model_dump(mode="json")
    assert Path(deployment["parameters"]["project_dir"]) == servers.root
    schema = deployment["parameter_openapi_schema"]
    queries = schema["definitions"]["AttributionSettings"]["properties"]["queries"]
    assert queries["title"] == "Queries" and queries["description"] and queries["minimum"] == 1
    assert schema["definitions"]["AttributionSettings"]["properties"]["measurement"]["enum"] == ["loss", "margin"]


def test_run_button_run_completes_and_logs_the_report_to_mlflow(servers: Servers):
    import httpx
    from mlflow.tracking import MlflowClient

    deployment = _deployment(servers)
    parameters = json.loads(json.dumps(deployment["parameters"]))
    parameters["settings"]["attribution"]["top_k"] = 2  # a custom run: one setting changed in the form
    response = httpx.post(
        f"{servers.prefect_url}/api/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": parameters}, timeout=30,
    )
    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]

    began, state = time.monotonic(), None
    while time.monotonic() - began < RUN_TIMEOUT_SECONDS:
        state = httpx.get(f"{servers.prefect_url}/api/flow_runs/{flow_run_id}", timeout=10).json()["state_type"]
        if state in TERMINAL:
            break
        time.sleep(2)
    print(f"flow run {flow_run_id}: {state} after {time.monotonic() - began:.1f} s")
    assert state == "COMPLETED", f"flow run ended {state}; worker log:\n{servers.log('worker')}"

    client = MlflowClient(tracking_uri=servers.mlflow_url)
    experiment = client.get_experiment_by_name("influence-pipeline")
    tagged = client.search_runs([experiment.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    runs = [r for r in tagged if "mlflow.parentRunId" not in r.data.tags]  # the parent; the rest are its stages
    assert len(runs) == 1, f"expected one parent MLflow run tagged with flow run {flow_run_id}, found {len(runs)}"
    assert len(tagged) > 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["attribution.top_k"] == "2"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # stored by the server
    assert {"report/report.html", "report/attributions.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    page = httpx.get(
        f"{servers.mlflow_url}/get-artifact", params={"path": "report/report.html", "run_uuid": run.info.run_id}, timeout=30,
    )
    assert page.status_code == 200 and "Case-deletion check" in page.text


def test_nightly_schedule_creates_runs(servers: Servers):
    import httpx

    response = httpx.get(f"{servers.prefect_url}/api/deployments/name/pipeline/nightly", timeout=10)
    response.raise_for_status()
    nightly = response.json()
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert "settings" not in nightly["parameters"]  # read from params.yaml when the run starts
    began, scheduled = time.monotonic(), []
    while not scheduled and time.monotonic() - began < 60:
        body = {"flow_runs": {"deployment_id": {"any_": [nightly["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}
        scheduled = httpx.post(f"{servers.prefect_url}/api/flow_runs/filter", json=body, timeout=10).json()
        time.sleep(1)
    print(f"{len(scheduled)} nightly runs scheduled after {time.monotonic() - began:.1f} s")
    assert scheduled and all(r["expected_start_time"].endswith(("T02:00:00Z", "T02:00:00+00:00")) for r in scheduled)


def test_bad_parameter_is_refused_before_any_run(servers: Servers):
    import httpx

    deployment = _deployment(servers)
    before = _run_count(servers, deployment["id"])
    settings = json.loads(json.dumps(deployment["parameters"]["settings"]))
    settings["attribution"]["queries"] = 0
    refused = servers.run(
        "prefect", "deployment", "run", "pipeline/on-demand", "--param", f"settings={json.dumps(settings)}",
    )
    message = refused.stdout + refused.stderr
    print(message)
    assert refused.returncode != 0
    assert "queries" in message and "minimum of 1" in message

    settings["attribution"]["queries"] = 3
    settings["attribution"]["measurement"] = "median"
    response = httpx.post(
        f"{servers.prefect_url}/api/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"settings": settings}}, timeout=30,
    )
    print(response.text)
    assert response.status_code == 409 and "measurement" in response.text and "median" in response.text
    assert _run_count(servers, deployment["id"]) == before


def test_restart_skips_nightly_runs_missed_while_stopped(servers: Servers):
    import httpx

    nightly = httpx.get(f"{servers.prefect_url}/api/deployments/name/pipeline/nightly", timeout=10).json()
    past = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=3)).isoformat()
    response = httpx.post(
        f"{servers.prefect_url}/api/deployments/{nightly['id']}/create_flow_run", timeout=30,
        json={"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": past}}},
    )
    assert response.status_code == 201, response.text
    missed = response.json()["id"]
    script = str(servers.root / "scripts" / "servers")
    assert servers.run(script, "stop", timeout=180).returncode == 0
    began = time.monotonic()
    restarted = servers.run(script, "start", timeout=300)
    print(f"restart took {time.monotonic() - began:.1f} s\n{restarted.stdout}")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "skipped nightly run" in restarted.stdout
    state = httpx.get(f"{servers.prefect_url}/api/flow_runs/{missed}", timeout=10).json()["state"]
    assert (state["type"], state["name"]) == ("CANCELLED", "Skipped")


def _processes_with_home(home: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"PREFECT_HOME={home}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
    return found


def test_stop_leaves_no_processes(servers: Servers):
    """Last in the file: stops the servers (the fixture's finalizer then finds nothing to do)."""
    run_dir = servers.root / ".prefect" / "run"
    sessions = [(run_dir / f"{name}.pid").read_text().strip() for name in ("worker", "prefect", "mlflow")]
    stopped = servers.run(str(servers.root / "scripts" / "servers"), "stop", timeout=180)
    assert stopped.returncode == 0, stopped.stderr
    left = subprocess.run(["ps", "-o", "pid=,args=", "-s", ",".join(sessions)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left after stop:\n{left.stdout}"
    assert _processes_with_home(servers.env["PREFECT_HOME"]) == []
    assert not _answers(f"{servers.prefect_url}/api/health") and not _answers(f"{servers.mlflow_url}/health")
