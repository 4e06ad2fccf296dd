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
import shutil
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
HTTP_TIMEOUT = 60  # seconds for one API call: a loaded 2-core machine can stall the SQLite-backed server for a while
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
CUSTOM_TOP_K = 2  # the setting the custom runs change (the tiny settings' default is 3)

pytestmark = pytest.mark.slow


@dataclass
class Servers:
    root: Path
    env: dict[str, str]
    prefect_url: str
    mlflow_url: str
    startup_seconds: float  # from `scripts/servers start` until both health endpoints answer
    start_seconds: float  # the whole start command (pool, deploy, worker)
    credentials: dict[str, str]  # .prefect/auth/credentials, as scripts/servers made them

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)

    def log(self, name: str) -> str:
        path = self.root / ".prefect" / "run" / f"{name}.log"
        return path.read_text()[-4000:] if path.is_file() else f"(no {name} log)"


LOGINS: dict[str, dict[str, str]] = {}  # server address -> the headers that log in (filled by the fixture)


def _login_headers(method: str, url: str) -> dict[str, str]:
    """The credentials of the server ``url`` belongs to; for Prefect's state-changing methods also a CSRF
    token (fetched once per server, as Prefect's client and UI do)."""
    import httpx

    for base, login in LOGINS.items():
        if url.startswith(base):
            headers = {"Authorization": login["Authorization"]}
            if login.get("kind") == "prefect" and method.upper() not in ("GET", "HEAD", "OPTIONS"):
                if "csrf" not in login:
                    login["csrf"] = httpx.get(f"{base}/api/csrf-token", params={"client": "tests"}, headers=headers,
                                              timeout=HTTP_TIMEOUT).raise_for_status().json()["token"]
                headers.update({"Prefect-Csrf-Token": login["csrf"], "Prefect-Csrf-Client": "tests"})
            return headers
    return {}


def _api(method: str, url: str, within: float = 120.0, login: bool = True, **kwargs):
    """One HTTP call to a server under test (logged in unless ``login=False``), repeated while it answers
    503: the SQLite-backed Prefect server answers that when its database is busy on a loaded 2-core
    machine (Prefect's own client retries 503 too)."""
    import httpx

    if login:
        kwargs["headers"] = {**_login_headers(method, url), **kwargs.get("headers", {})}
    deadline = time.monotonic() + within
    while True:
        response = httpx.request(method, url, **kwargs)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    import httpx

    try:
        return _api("GET", url, within=0, login=False, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def servers(tmp_path_factory, raw_wheels, request) -> Servers:
    base = tmp_path_factory.mktemp("servers")
    root = make_project(
        base / "project", base / "remote", raw_wheels,
        extra=("scripts", "prefect.yaml", "requirements.lock", "pyproject.toml", "infra"),
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
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # this process's MlflowClient logs in too
        request.addfinalizer(lambda key=key, old=os.environ.get(key): os.environ.pop(key) if old is None else os.environ.update({key: old}))
    servers = Servers(root, env, prefect_url, mlflow_url, startup, total, {})
    _log_in(servers)
    return servers


def _credentials(root: Path) -> dict[str, str]:
    """.prefect/auth/credentials, as scripts/servers made them"""
    return dict(line.split("=", 1) for line in (root / ".prefect" / "auth" / "credentials").read_text().split())


def _log_in(servers: Servers) -> None:
    """The test's clients (its commands, this process's MlflowClient, ``_api``) log in with the credentials file's
    Prefect auth string and MLflow admin: read again after a rotation."""
    credentials = servers.credentials = _credentials(servers.root)
    servers.env.update(PREFECT_API_AUTH_STRING=credentials["PREFECT_AUTH_STRING"],
                       MLFLOW_TRACKING_USERNAME=credentials["MLFLOW_USERNAME"], MLFLOW_TRACKING_PASSWORD=credentials["MLFLOW_PASSWORD"])
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ[key] = servers.env[key]
    LOGINS[servers.prefect_url] = {"kind": "prefect", "Authorization": _basic(credentials["PREFECT_AUTH_STRING"])}
    LOGINS[servers.mlflow_url] = {"kind": "mlflow",
                                  "Authorization": _basic(f"{credentials['MLFLOW_USERNAME']}:{credentials['MLFLOW_PASSWORD']}")}


def _basic(user_colon_password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(user_colon_password.encode()).decode()


def test_both_servers_answer_within_a_minute(servers: Servers):
    print(f"both UIs answered {servers.startup_seconds:.1f} s after `scripts/servers start`")
    assert servers.startup_seconds < STARTUP_BAR_SECONDS
    status = servers.run(str(servers.root / "scripts" / "servers"), "status")
    assert status.returncode == 0 and servers.prefect_url in status.stdout and servers.mlflow_url in status.stdout


def test_servers_are_closed_without_credentials(servers: Servers):
    """Either server refuses a request without its credentials (401) or with wrong ones; only the health checks
    are open. Prefect also wants a CSRF token for a change and allows cross-origin calls from its own UI
    only; the credentials file is the owner's alone; the pools' job template cannot be given another command."""
    import stat

    prefect, mlflow = servers.prefect_url, servers.mlflow_url
    deployment = _deployment(servers)
    before = _run_count(servers, deployment["id"])
    wrong = {"Authorization": _basic("admin:not-the-password")}
    csrf = {k: v for k, v in _login_headers("POST", f"{prefect}/api/").items() if k.startswith("Prefect-Csrf")}
    for headers in ({}, wrong):
        assert _api("GET", f"{prefect}/api/deployments/{deployment['id']}", login=False, headers=headers).status_code == 401
        created = _api("POST", f"{prefect}/api/deployments/{deployment['id']}/create_flow_run", login=False, json={},
                       headers={**headers, **csrf})  # a valid CSRF token does not stand in for the credentials
        assert created.status_code == 401, created.text
        created = _api("POST", f"{prefect}/api/deployments/{deployment['id']}/create_flow_run", login=False, json={},
                       headers=headers)  # without a token the CSRF check refuses it first
        assert created.status_code in (401, 403), created.text
        assert _api("GET", f"{mlflow}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, login=False,
                    headers=headers).status_code == 401
        assert _api("GET", f"{mlflow}/", login=False, headers=headers).status_code == 401
    assert _run_count(servers, deployment["id"]) == before
    assert _api("GET", f"{prefect}/api/health", login=False).status_code == 200
    assert _api("GET", f"{mlflow}/health", login=False).status_code == 200
    assert _api("GET", f"{mlflow}/api/2.0/mlflow/experiments/search", params={"max_results": 1}).status_code == 200
    no_csrf = _api("POST", f"{prefect}/api/flow_runs/filter", login=False, json={},
                   headers={"Authorization": LOGINS[prefect]["Authorization"]})
    assert no_csrf.status_code == 403, no_csrf.text
    assert _api("POST", f"{prefect}/api/flow_runs/filter", json={}).status_code == 200
    for origin, allowed in (("http://evil.example", False), (prefect, True)):
        preflight = _api("OPTIONS", f"{prefect}/api/flow_runs/filter", login=False,
                         headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert (preflight.headers.get("access-control-allow-origin") == origin) is allowed, preflight.headers
    folder = servers.root / ".prefect" / "auth"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE((folder / "credentials").stat().st_mode) == 0o600
    # the stores and logs are the owner's alone (umask 077)
    stores = [servers.root / ".prefect" / "prefect.db", servers.root / "mlruns.db", folder / "mlflow-auth.db", folder / "mlflow-auth.ini"]
    assert all(path.is_file() for path in stores)
    shared = {str(path.relative_to(servers.root)): oct(path.stat().st_mode) for path in
              [*stores, *(servers.root / ".prefect" / "run").iterdir()] if path.stat().st_mode & 0o077}
    assert shared == {}
    for pool in ("cpu", "gpu"):
        template = _api("GET", f"{prefect}/api/work_pools/{pool}").json()["base_job_template"]
        assert set(template["variables"]["properties"]) == {"name", "labels"}
        assert template["job_configuration"]["command"] is None and template["job_configuration"]["env"] == {}


def _session_environments(servers: Servers, name: str) -> list[dict[str, str]]:
    """The environments of the processes of the session scripts/servers started as ``name``."""
    session = (servers.root / ".prefect" / "run" / f"{name}.pid").read_text().strip()
    found = []
    for pid in subprocess.run(["ps", "-o", "pid=", "-s", session], capture_output=True, text=True).stdout.split():
        try:
            found.append(dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v))
        except OSError:  # ended meanwhile
            continue
    assert found, f"no process of {name}"
    return found


def test_workers_log_to_mlflow_as_their_own_user(servers: Servers):
    """The workers hold an MLflow user of their own, no admin, and not the admin's password: it makes experiments
    and logs to them (the admin reads them); it cannot read an experiment it was not given, nor make users."""
    mlflow, credentials = servers.mlflow_url, servers.credentials
    worker = (credentials["MLFLOW_WORKER_USERNAME"], credentials["MLFLOW_WORKER_PASSWORD"])
    assert worker[0] != credentials["MLFLOW_USERNAME"]
    for name in ("worker", "gpu-worker"):
        for environment in _session_environments(servers, name):
            assert (environment["MLFLOW_TRACKING_USERNAME"], environment["MLFLOW_TRACKING_PASSWORD"]) == worker
            assert not {credentials["MLFLOW_PASSWORD"], credentials["POSTGRES_PASSWORD"]} & set(environment.values())
    user = _api("GET", f"{mlflow}/api/2.0/mlflow/users/get", params={"username": worker[0]}, timeout=HTTP_TIMEOUT)
    assert user.json()["user"]["is_admin"] is False, user.text
    made = _api("POST", f"{mlflow}/api/2.0/mlflow/experiments/create", login=False, auth=worker, json={"name": "by-the-worker"})
    assert made.status_code == 200, made.text
    run = _api("POST", f"{mlflow}/api/2.0/mlflow/runs/create", login=False, auth=worker,
               json={"experiment_id": made.json()["experiment_id"], "run_name": "logged-by-the-worker"})
    assert run.status_code == 200, run.text
    read = _api("GET", f"{mlflow}/api/2.0/mlflow/runs/get", params={"run_id": run.json()["run"]["info"]["run_id"]})
    assert read.status_code == 200 and read.json()["run"]["info"]["run_name"] == "logged-by-the-worker"
    admins = _api("POST", f"{mlflow}/api/2.0/mlflow/experiments/create", json={"name": "by-the-admin"}).json()["experiment_id"]
    assert _api("GET", f"{mlflow}/api/2.0/mlflow/experiments/get", login=False, auth=worker,
                params={"experiment_id": admins}).status_code == 403
    assert _api("POST", f"{mlflow}/api/2.0/mlflow/users/create", login=False, auth=worker,
                json={"username": "someone", "password": "a-password-long-enough"}).status_code == 403


def _deployment(servers: Servers, name: str = "pipeline/on-demand") -> dict:

    response = _api("GET", f"{servers.prefect_url}/api/deployments/name/{name}", timeout=HTTP_TIMEOUT)
    response.raise_for_status()
    return response.json()


def _run_count(servers: Servers, deployment_id: str) -> int:

    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    response = _api("POST", f"{servers.prefect_url}/api/flow_runs/count", json=body, timeout=HTTP_TIMEOUT)
    response.raise_for_status()
    return response.json()


def test_deployment_form_defaults_come_from_params_yaml(servers: Servers):
    from flows.definition.settings import load_settings

    deployment = _deployment(servers)
    assert deployment["work_pool_name"] == "cpu"
    assert deployment["parameters"]["gpu_deployment"] == "attribution/gpu" and deployment["parameters"]["data_rev"] == ""
    gpu = _deployment(servers, "attribution/gpu")
    assert gpu["work_pool_name"] == "gpu"

    pool = _api("GET", f"{servers.prefect_url}/api/work_pools/gpu", timeout=HTTP_TIMEOUT).json()
    assert pool["concurrency_limit"] == 1  # one run per GPU
    assert deployment["parameters"]["settings"] == load_settings(servers.root / "params.yaml").model_dump(mode="json")
    assert Path(deployment["parameters"]["project_dir"]) == servers.root
    schema = deployment["parameter_openapi_schema"]
    queries = schema["definitions"]["AttributionSettings"]["properties"]["queries"]
    assert queries["title"] == "Queries" and queries["description"] and queries["minimum"] == 1
    assert schema["definitions"]["AttributionSettings"]["properties"]["measurement"]["enum"] == ["loss", "margin"]
    profile = schema["properties"]["profile"]  # a field of the form: none by default
    assert deployment["parameters"]["profile"] == "" and profile["type"] == "string" and "profiles/" in profile["description"]


def _trigger_and_wait(servers: Servers, parameters: dict, expected: str = "COMPLETED") -> str:
    """Create a run of pipeline/on-demand as the UI's Run button does; wait until it ends ``expected``."""

    deployment = _deployment(servers)
    response = _api("POST", 
        f"{servers.prefect_url}/api/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": parameters}, timeout=30,
    )
    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]
    began, state = time.monotonic(), None
    while time.monotonic() - began < RUN_TIMEOUT_SECONDS:
        state = _api("GET", f"{servers.prefect_url}/api/flow_runs/{flow_run_id}", timeout=HTTP_TIMEOUT).json()["state_type"]
        if state in TERMINAL:
            break
        time.sleep(2)
    print(f"flow run {flow_run_id}: {state} after {time.monotonic() - began:.1f} s")
    assert state == expected, (
        f"flow run ended {state}; worker log:\n{servers.log('worker')}\ngpu worker log:\n{servers.log('gpu-worker')}"
    )
    return flow_run_id


def _custom_parameters(servers: Servers) -> dict:
    parameters = json.loads(json.dumps(_deployment(servers)["parameters"]))
    parameters["settings"]["attribution"]["top_k"] = CUSTOM_TOP_K  # a custom run: one setting changed in the form
    return parameters


def _children(servers: Servers, flow_run_id: str) -> list[dict]:

    body = {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}}
    response = _api("POST", f"{servers.prefect_url}/api/flow_runs/filter", json=body, timeout=HTTP_TIMEOUT)
    response.raise_for_status()
    return response.json()


def _task_states(servers: Servers, flow_run_ids: list[str]) -> dict[str, str]:

    body = {"flow_runs": {"id": {"any_": flow_run_ids}}}
    response = _api("POST", f"{servers.prefect_url}/api/task_runs/filter", json=body, timeout=HTTP_TIMEOUT)
    response.raise_for_status()
    return {r["name"]: r["state"]["name"] for r in response.json()}


def test_run_button_run_completes_and_logs_the_report_to_mlflow(servers: Servers):
    from mlflow.tracking import MlflowClient

    flow_run_id = _trigger_and_wait(servers, _custom_parameters(servers))

    # the GPU stages ran as attribution/gpu on the gpu pool, falling back to the CPU here
    children = _children(servers, flow_run_id)
    gpu_runs = [c for c in children if c["work_pool_name"] == "gpu"]
    assert len(gpu_runs) == 1 and gpu_runs[0]["state_type"] == "COMPLETED", children
    assert {"gradients", "influence", "multistage", "tracin_we"} <= set(_task_states(servers, [gpu_runs[0]["id"]]))
    import torch

    if not torch.cuda.is_available():
        assert "fall back to the CPU" in servers.log("gpu-worker")

    # Prefect artifacts: the link to the MLflow run, the markdown summary, the table
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    artifacts = {a["key"]: a for a in _api("POST", f"{servers.prefect_url}/api/artifacts/filter", json=body, timeout=HTTP_TIMEOUT).json()}
    assert {"mlflow-run", "attribution-summary", "attributions"} <= set(artifacts)
    assert servers.mlflow_url in artifacts["mlflow-run"]["data"]
    assert "Case-deletion check" in artifacts["attribution-summary"]["data"]

    client = MlflowClient(tracking_uri=servers.mlflow_url)
    experiment = client.get_experiment_by_name("influence-pipeline")
    tagged = client.search_runs([experiment.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    runs = [r for r in tagged if "mlflow.parentRunId" not in r.data.tags]  # the parent; the rest are its stages
    assert len(runs) == 1, f"expected one parent MLflow run tagged with flow run {flow_run_id}, found {len(runs)}"
    assert len(tagged) > 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["attribution.top_k"] == str(CUSTOM_TOP_K)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # stored by the server
    assert {"report/report.html", "report/attributions.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    page = _api("GET", 
        f"{servers.mlflow_url}/get-artifact", params={"path": "report/report.html", "run_uuid": run.info.run_id}, timeout=30,
    )
    assert page.status_code == 200 and "Case-deletion check" in page.text
    assert run.info.run_id in artifacts["mlflow-run"]["data"]


def _check_computing_stages_skipped(servers: Servers, flow_run_id: str) -> None:
    """A run whose settings change only what the report reads: every computing stage is skipped (its outputs
    are current), the report makes its own MLflow run, which records what was skipped."""
    from mlflow.tracking import MlflowClient

    from flows.definition.stage_table import NAMES

    computing = tuple(s for s in NAMES if s != "report")
    began = time.monotonic()
    while True:  # task-run states reach the API as events, a moment after the flow run ends
        states = _task_states(servers, [flow_run_id] + [c["id"] for c in _children(servers, flow_run_id)])
        if all(states.get(stage) == "Skipped" for stage in computing) or time.monotonic() - began > 30:
            break
        time.sleep(1)
    print(states)
    assert {stage: states.get(stage) for stage in computing} == dict.fromkeys(computing, "Skipped")
    assert [state for name, state in states.items() if name.startswith("report")] == ["Completed"]  # its own MLflow run
    client = MlflowClient(tracking_uri=servers.mlflow_url)
    experiment = client.get_experiment_by_name(BROWSER_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]
    assert parent.data.tags["stages_skipped"] == ",".join(computing)


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [  # headless on a machine whose only network is loopback
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-output" / "browser"
BROWSER_EXPERIMENT = "browser-check"  # a setting the test changes in the form: read by the report alone


# Before its login, the Prefect UI asks for these without the credentials it does not have yet: the server answers
# 401 and the UI shows an "Oops. Something went wrong." toast over its login page until the next page load (Prefect's
# open issue #18518). After the login no request of the UI may be refused.
BEFORE_LOGIN = ("/api/admin/version", "/api/admin/settings", "/api/csrf-token")
ERROR_TOAST = "Something went wrong"


class Browser:
    """One headless Chromium page (Playwright driving Debian's chromium) that saves numbered screenshots and
    records the Prefect API's answers to the UI that were not a success."""

    def __init__(self, playwright, mlflow_login: dict[str, str] | None = None, prefix: str = ""):
        if not Path(CHROMIUM).is_file():
            pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser (scripts/run-tests does)")
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page(viewport={"width": 1400, "height": 1000}, http_credentials=mlflow_login)
        self.page.set_default_timeout(60_000)
        self.prefix = prefix
        self.shots: list[Path] = []
        self.ui = ""  # the Prefect UI's address, as the browser opened it
        self.logged_in = False
        self.before_login: list[str] = []  # "STATUS METHOD URL" of the Prefect API's answers >= 400
        self.refused: list[str] = []  # the same after the login
        self.page.on("response", self._record)
        self.page.on("pageerror", lambda error: self.logged_in and self.refused.append(f"page error: {error}"))

    def _record(self, response) -> None:
        if self.ui and response.url.startswith(f"{self.ui}/api/") and response.status >= 400:
            answer = f"{response.status} {response.request.method} {response.url}"
            (self.refused if self.logged_in else self.before_login).append(answer)

    def log_in_to_prefect(self, servers: Servers, ui: str | None = None) -> None:
        """Open the Prefect UI (at ``ui``, by default the server's address): it asks for the auth string on its login
        page; type it in, as a user does. Only the login page's known requests may have been refused."""
        self.ui = ui or servers.prefect_url
        self.page.goto(f"{self.ui}/dashboard")
        self.page.wait_for_url("**/login**")
        self.page.locator("input[type=password]").fill(servers.credentials["PREFECT_AUTH_STRING"])
        self.shot("prefect-login")
        self.page.get_by_role("button", name="Login").click()
        self.page.wait_for_url(lambda url: "/login" not in url)
        unknown = [r for r in self.before_login if not (r.startswith("401 GET") and any(p in r for p in BEFORE_LOGIN))]
        assert unknown == [], f"the login page's requests were refused beyond Prefect's issue #18518: {unknown}"
        self.logged_in = True

    def check(self) -> None:
        """After the login: no request of the UI was refused and no error toast is shown. A 503 (the answer of a
        SQLite-backed server busy on a loaded machine, which the UI does not retry) is only reported, and the toast
        it brings is closed, as a user would."""
        busy = [r for r in self.refused if r.startswith("503 ")]
        refused = [r for r in self.refused if r not in busy]
        assert refused == [], f"the Prefect UI's requests were refused after the login: {refused}"
        toast = self.page.locator(".p-toast__card", has_text=ERROR_TOAST)
        if busy and toast.count():
            print(f"the server answered the UI busy (503): {busy}; closing the error toast")
            toast.first.locator(".p-toast__close-btn").click()
            toast.first.wait_for(state="detached")
        self.refused.clear()
        assert toast.count() == 0, "the Prefect UI shows an error toast"

    def shot(self, name: str, element=None) -> Path:
        """Screenshot of the page, or of one element (scrolled into view, inside frames too); a Prefect page after
        the login is checked first (:meth:`check`)."""
        if self.logged_in and self.page.url.startswith(f"{self.ui}/"):
            self.check()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.prefix}{len(self.shots) + 1:02d}-{name}.png"
        (element or self.page).screenshot(path=str(path))
        self.shots.append(path)
        return path


def _form_input(page, label: str):
    """The input of the custom-run form's field titled ``label`` (the settings model's field title)."""
    title = page.locator("span.schema-form-property__label", has_text=f"{label} (Optional)")
    return page.locator("div.p-label", has=page.locator("label.p-label__label", has=title)).last.locator("input, textarea")


def _flow_runs_named(servers: Servers, name: str) -> list[dict]:
    body = {"flow_runs": {"name": {"any_": [name]}}}
    response = _api("POST", f"{servers.prefect_url}/api/flow_runs/filter", json=body, timeout=HTTP_TIMEOUT)
    response.raise_for_status()
    return response.json()


def _submit(page, servers: Servers) -> tuple[str, str]:
    """Submit the custom-run form and open the new flow run's page: ``(run name, flow-run id)``.

    As a user would, Submit is pressed again when no run was created: the SQLite-backed server of a loaded
    2-core machine can answer the UI's request with 503 (busy), which the UI shows as a toast and does not
    retry. The run is looked up by its name through the API and opened from the deployment's Runs tab.
    """
    run_name = page.locator("input").first.input_value()
    for attempt in range(3):
        page.get_by_role("button", name="Submit", exact=True).click()
        began = time.monotonic()
        while time.monotonic() - began < 60:
            if "tab=Runs" in page.url or _flow_runs_named(servers, run_name):
                break
            page.wait_for_timeout(1000)
        if "tab=Runs" in page.url or _flow_runs_named(servers, run_name):
            break
        print(f"Submit press {attempt + 1} created no flow run named {run_name}; pressing it again")
    runs = _flow_runs_named(servers, run_name)
    assert runs, f"no flow run named {run_name} after three presses of Submit"
    try:
        page.wait_for_url("**tab=Runs**", timeout=60_000)
        page.get_by_role("link", name=run_name).first.click()
    except Exception:  # the run exists but the UI did not move on: open it directly
        print(f"the UI did not open the Runs tab after creating {run_name}; opening the run's page")
        page.goto(f"{'/'.join(page.url.split('/')[:3])}/runs/flow-run/{runs[0]['id']}")
    page.wait_for_url("**/runs/flow-run/**")
    return run_name, runs[0]["id"]


def _wait_for_state(page, wanted: str) -> None:
    """Wait until the flow-run page's state badge reads ``wanted``; fail at once on another final state."""
    heading = page.locator(".page-heading-flow-run__meta .state-badge")
    heading.first.wait_for()
    began = time.monotonic()
    while time.monotonic() - began < RUN_TIMEOUT_SECONDS:
        classes = heading.first.get_attribute("class") or ""
        if f"state--{wanted}" in classes:
            return
        final = [s for s in ("completed", "failed", "crashed", "cancelled") if f"state--{s}" in classes]
        assert not final, f"the flow run ended {final[0]}, not {wanted}"
        page.wait_for_timeout(2000)
        if time.monotonic() - began > 60 and int(time.monotonic() - began) % 30 < 2:
            page.reload()  # in case the page stopped polling
            heading.first.wait_for()
    raise AssertionError(f"the flow run did not reach {wanted} within {RUN_TIMEOUT_SECONDS} s")


def _check_finished_run_page(page, flow: str, pool: str, log_line: str) -> None:
    """The page of a finished flow run, once loaded, shows its flow, its work pool and its logs (``log_line``, a
    line the run logs): nothing reads "No access" or "Waiting for logs". The UI reads a run's logs every 5 s
    until 30 s after its end, and its last lines reach the server a moment after its state: a user would reload."""
    page.locator(".flow-icon-text", has_text=flow).first.wait_for()
    page.locator(".work-pool-icon-text", has_text=pool).first.wait_for()
    began = time.monotonic()
    while not page.get_by_text(log_line).count():
        assert time.monotonic() - began < 120, f"the run's page shows no log line {log_line!r}"
        page.wait_for_timeout(2000)
        if int(time.monotonic() - began) % 30 < 2:
            page.reload()
            page.locator(".work-pool-icon-text", has_text=pool).first.wait_for()
    assert page.get_by_text("No access").count() == 0 and page.get_by_text("Waiting for logs").count() == 0
    page.locator(".page-heading-flow-run__meta").first.scroll_into_view_if_needed()  # the screenshot's top: flow, pool


def test_browser_custom_run_from_the_prefect_ui_then_its_report_in_the_mlflow_ui(servers: Servers):
    """What a user does: Prefect UI → deployment → Custom run → change a setting → Submit → Completed (a
    setting that only the report reads: every computing stage is skipped, the earlier run's outputs reused);
    then MLflow UI → the experiment → the run → Artifacts → report/report.html. Screenshots of every
    step are left in test-output/browser/."""
    from playwright.sync_api import sync_playwright

    from flows.definition.settings import load_settings

    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    with sync_playwright() as playwright:
        browser = Browser(playwright, {"username": servers.credentials["MLFLOW_USERNAME"], "password": servers.credentials["MLFLOW_PASSWORD"]})
        page = browser.page
        try:
            browser.log_in_to_prefect(servers)
            page.goto(f"{servers.prefect_url}/deployments")
            page.get_by_role("link", name="on-demand").click()
            page.wait_for_url("**/deployments/deployment/**")
            page.get_by_text("pipeline", exact=True).first.wait_for()
            browser.shot("prefect-deployment")
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").first.click()
            page.wait_for_url("**/run?**")
            experiment = _form_input(page, "MLflow experiment")
            assert experiment.input_value() == "influence-pipeline"  # the default comes from params.yaml
            top_k = _form_input(page, "Top k")
            assert top_k.input_value() == str(load_settings(servers.root / "params.yaml").attribution.top_k)
            top_k.fill(str(CUSTOM_TOP_K))  # as the run-button run: its outputs are current for this run
            experiment.fill(BROWSER_EXPERIMENT)
            experiment.scroll_into_view_if_needed()
            browser.shot("prefect-custom-run-form")
            run_name, flow_run_id = _submit(page, servers)
            browser.shot("prefect-flow-run-started")
            _wait_for_state(page, "completed")
            _check_finished_run_page(page, flow="pipeline", pool="cpu", log_line="report logged to MLflow run")
            browser.shot("prefect-flow-run-completed")

            run = _api("GET", f"{servers.prefect_url}/api/flow_runs/{flow_run_id}", timeout=HTTP_TIMEOUT).json()
            assert run["name"] == run_name and run["state_type"] == "COMPLETED"
            assert run["parameters"]["settings"]["tracking"]["experiment"] == BROWSER_EXPERIMENT
            assert run["parameters"]["settings"]["attribution"]["top_k"] == CUSTOM_TOP_K
            _check_computing_stages_skipped(servers, flow_run_id)  # the earlier run's outputs are reused

            page.goto(f"{servers.mlflow_url}/")
            page.get_by_text("Model training", exact=True).first.click()
            page.get_by_text(BROWSER_EXPERIMENT, exact=True).first.click()
            page.get_by_text(run_name, exact=True).first.click()
            page.get_by_role("tab", name="Artifacts").click()
            assistant = page.get_by_role("button", name="Close", exact=True)
            if assistant.count():  # MLflow's assistant side panel: out of the way of the report
                assistant.first.click()
            browser.shot("mlflow-run")
            page.get_by_text("report", exact=True).first.click()
            page.get_by_text("report.html", exact=True).first.click()
            report = page.frame_locator("iframe").first
            report.get_by_text("Case-deletion check").first.wait_for()
            browser.shot("mlflow-report")
            queries = report.locator("h2", has_text="Query ")
            assert queries.count() == 3  # every query of the tiny settings has its section
            assert report.locator("img[src^='data:image/png']").count() >= 3  # the figures, inside the page
            for name, part in (("deletion-table", report.locator("h2", has_text="Case-deletion check")),
                               ("figure", report.locator("figure").first),
                               ("query", report.locator("div.query").first)):
                part.evaluate("e => e.scrollIntoView()")  # scrolls the artifact viewer around the page's frame
                browser.shot(f"mlflow-report-{name}")
        except Exception:
            browser.shot("failure")
            raise
        finally:
            browser.browser.close()
    print("screenshots:", *browser.shots, sep="\n  ")
    assert all(path.stat().st_size > 10_000 for path in browser.shots)


def test_browser_explain_a_sentence_from_the_prefect_ui(servers: Servers):
    """What a user does to explain a new sentence: Prefect UI → explain/text → Custom run → type the
    sentence → Submit → Completed → the run's Artifacts → the explanation table (its proponents and
    opponents from both the finetuning and the pretraining data). Runs after a pipeline run, whose
    models and indexes it uses."""
    import re

    from playwright.sync_api import sync_playwright

    sentence = "a gripping, beautifully acted film"
    deployment = _deployment(servers, "explain/text")
    assert deployment["work_pool_name"] == "cpu" and deployment["parameters"]["model"] == "latest"
    # the UI opened by the name localhost: it reaches the API at its own address whatever the name (PREFECT_UI_API_URL)
    ui = servers.prefect_url.replace("127.0.0.1", "localhost")
    with sync_playwright() as playwright:
        browser = Browser(playwright, prefix="explain-")
        page = browser.page
        try:
            browser.log_in_to_prefect(servers, ui)
            page.goto(f"{ui}/deployments/deployment/{deployment['id']}")
            page.get_by_text("explain", exact=True).first.wait_for()
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").first.click()
            page.wait_for_url("**/run?**")
            label = page.locator("span.schema-form-property__label", has_text=re.compile(r"^\s*texts\s*$"))
            field = page.locator("div.p-label", has=page.locator("label.p-label__label", has=label)).last.locator("textarea, input")
            field.fill(sentence)
            browser.shot("explain-form")
            _, flow_run_id = _submit(page, servers)
            _wait_for_state(page, "completed")
            _check_finished_run_page(page, flow="explain", pool="cpu", log_line="explained 1 sentence(s)")
            browser.shot("explain-run")
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("explanation", exact=True).first.click()
            page.get_by_text(sentence).first.wait_for()
            browser.shot("explain-table")
            cells = page.locator("td")
            texts = [cells.nth(i).inner_text() for i in range(min(cells.count(), 400))]
            assert {"finetuning", "pretraining"} <= set(texts) and {"proponent", "opponent"} <= set(texts)
        except Exception:
            browser.shot("failure")
            raise
        finally:
            browser.browser.close()
    run = _api("GET", f"{servers.prefect_url}/api/flow_runs/{flow_run_id}", timeout=HTTP_TIMEOUT).json()
    assert run["state_type"] == "COMPLETED" and run["parameters"]["texts"] == sentence


def test_nightly_schedule_creates_runs(servers: Servers):

    response = _api("GET", f"{servers.prefect_url}/api/deployments/name/pipeline/nightly", timeout=HTTP_TIMEOUT)
    response.raise_for_status()
    nightly = response.json()
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert "settings" not in nightly["parameters"]  # read from params.yaml when the run starts
    began, scheduled = time.monotonic(), []
    while not scheduled and time.monotonic() - began < 60:
        body = {"flow_runs": {"deployment_id": {"any_": [nightly["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}
        scheduled = _api("POST", f"{servers.prefect_url}/api/flow_runs/filter", json=body, timeout=HTTP_TIMEOUT).json()
        time.sleep(1)
    print(f"{len(scheduled)} nightly runs scheduled after {time.monotonic() - began:.1f} s")
    assert scheduled and all(r["expected_start_time"].endswith(("T02:00:00Z", "T02:00:00+00:00")) for r in scheduled)


def test_bad_parameter_is_refused_before_any_run(servers: Servers):

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
    response = _api("POST", 
        f"{servers.prefect_url}/api/deployments/{deployment['id']}/create_flow_run",
        json={"parameters": {"settings": settings}}, timeout=30,
    )
    print(response.text)
    assert response.status_code == 409 and "measurement" in response.text and "median" in response.text
    assert _run_count(servers, deployment["id"]) == before


def _flow_run_logs(servers: Servers, flow_run_id: str) -> str:
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
    return "\n".join(r["message"] for r in _api("POST", f"{servers.prefect_url}/api/logs/filter", json=body,
                                                 timeout=HTTP_TIMEOUT).json())


def test_run_form_cannot_reach_another_folder_or_flow(servers: Servers, tmp_path):
    """The form's free-text fields are checked against what the operator fixed: another project folder, another
    flow as the GPU deployment, an unlisted tracking server, a readable table outside data/user (by absolute path
    and by ../), a working factory outside data/user, an object store and a scheduler the operator did not list:
    each run fails at once, naming the field, starts nothing and leaves params.yaml as it was."""
    outside = tmp_path / "outside"
    outside.mkdir()
    table = tmp_path / "table.csv"
    table.write_text("text,label,movie\n" + "".join(f"sentence {i},{'ab'[i % 2]},m{i % 7}\n" for i in range(60)))
    params = (servers.root / "params.yaml").read_bytes()
    file_source = {"finetune_source": "file"}
    for field, value, said in (
            ("project_dir", str(outside), "not this worker's project folder"),
            ("gpu_deployment", "pipeline/nightly", "not a deployment of the attribution flow"),
            ("tracking.tracking_uri", "http://evil.example:5000", "is not allowed here"),
            ("data.finetune_file", str(table), "data.finetune_file="),
            ("data.finetune_file", os.path.relpath(table, servers.root), "data.finetune_file="),
            ("model.factory", "tests.families.hashed_words:make", "model.factory="),
            ("cluster.store", "file:///srv/elsewhere", "cluster.store="),
            ("cluster.dask_address", "tcp://10.0.0.1:8786", "cluster.dask_address=")):
        parameters = _custom_parameters(servers)
        if "." in field:
            section, name = field.split(".")
            parameters["settings"][section][name] = value
            if field == "data.finetune_file":
                parameters["settings"]["data"].update(file_source)
            if field == "model.factory":
                parameters["settings"]["model"]["family"] = "custom"
            if field == "cluster.dask_address":
                parameters["settings"]["cluster"]["runner"] = "dask"
        else:
            parameters[field] = value
        began = time.monotonic()
        flow_run_id = _trigger_and_wait(servers, parameters, expected="FAILED")
        took = time.monotonic() - began
        logs = ""
        while said not in logs and time.monotonic() - began < 90:  # the run's last logs reach the server after its state
            logs = _flow_run_logs(servers, flow_run_id)
            time.sleep(1)
        assert said in logs, logs
        assert _children(servers, flow_run_id) == []
        print(f"{field}={value!r}: refused after {took:.1f} s")
    assert list(outside.iterdir()) == []
    assert (servers.root / "params.yaml").read_bytes() == params


def _flow_run_process(flow_run_id: str) -> int | None:
    """The process id of the flow run a process worker started (its environment names the flow run)."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
            except OSError:
                continue
    return None


def test_gpu_stages_stop_when_their_pipeline_is_killed(servers: Servers):
    """The pipeline runs its GPU stages as attribution/gpu (another flow run, on the gpu pool's worker); killed with
    SIGKILL while they run (the kernel frees its hold of the workspace, no clean-up runs), the GPU stages stop before
    their next stage or before saving the one they are in, instead of writing on in a workspace no run holds."""
    import signal

    from flows.guards.workspace_lock import is_held

    parameters = {**_custom_parameters(servers), "force": True}  # every stage computes again: the child runs a while
    deployment = _deployment(servers)
    response = _api("POST", f"{servers.prefect_url}/api/deployments/{deployment['id']}/create_flow_run",
                    json={"parameters": parameters}, timeout=30)
    assert response.status_code == 201, response.text
    parent = response.json()["id"]
    began, child = time.monotonic(), None
    while time.monotonic() - began < RUN_TIMEOUT_SECONDS:
        running = [c for c in _children(servers, parent) if c["state_type"] == "RUNNING"]
        if running:
            child = running[0]
            break
        state = _api("GET", f"{servers.prefect_url}/api/flow_runs/{parent}", timeout=HTTP_TIMEOUT).json()["state_type"]
        assert state not in TERMINAL, f"the pipeline ended {state} before its GPU stages ran:\n{servers.log('worker')}"
        time.sleep(0.5)
    assert child is not None, "the GPU stages never ran"
    pid = _flow_run_process(parent)
    assert pid is not None, "the pipeline's process was not found"
    os.kill(pid, signal.SIGKILL)
    began, state = time.monotonic(), None
    while time.monotonic() - began < 600:
        state = _api("GET", f"{servers.prefect_url}/api/flow_runs/{child['id']}", timeout=HTTP_TIMEOUT).json()["state_type"]
        if state in TERMINAL:
            break
        time.sleep(1)
    logs = _flow_run_logs(servers, child["id"])
    print(f"GPU stages after their pipeline was killed: {state} after {time.monotonic() - began:.1f} s")
    assert state in ("FAILED", "CRASHED", "CANCELLED"), f"{state}:\n{logs[-3000:]}"
    deadline = time.monotonic() + 60
    while "no longer holds the workspace" not in logs and time.monotonic() < deadline:
        time.sleep(1)
        logs = _flow_run_logs(servers, child["id"])
    assert "no longer holds the workspace" in logs, logs[-3000:]
    assert not is_held(servers.root)


def test_restart_skips_nightly_runs_missed_while_stopped(servers: Servers):

    nightly = _api("GET", f"{servers.prefect_url}/api/deployments/name/pipeline/nightly", timeout=HTTP_TIMEOUT).json()
    # no worker may take the overdue run before the servers stop: that is what "missed while stopped" means
    pool = f"{servers.prefect_url}/api/work_pools/cpu"
    assert _api("PATCH", pool, json={"is_paused": True}, timeout=HTTP_TIMEOUT).status_code == 204
    past = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=3)).isoformat()
    response = _api("POST", 
        f"{servers.prefect_url}/api/deployments/{nightly['id']}/create_flow_run", timeout=30,
        json={"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": past}}},
    )
    assert response.status_code == 201, response.text
    missed = response.json()["id"]
    script = str(servers.root / "scripts" / "servers")
    began = time.monotonic()
    stopped = servers.run(script, "stop", timeout=180)
    print(f"stop took {time.monotonic() - began:.1f} s\n{stopped.stdout}{stopped.stderr}")
    assert stopped.returncode == 0
    began = time.monotonic()
    restarted = servers.run(script, "start", timeout=300)
    print(f"restart took {time.monotonic() - began:.1f} s\n{restarted.stdout}")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "skipped nightly run" in restarted.stdout
    state = _api("GET", f"{servers.prefect_url}/api/flow_runs/{missed}", timeout=HTTP_TIMEOUT).json()["state"]
    assert (state["type"], state["name"]) == ("CANCELLED", "Skipped")
    assert _patch_answered(pool, {"is_paused": False}) == 204


def _patch_answered(url: str, body: dict, within: float = 120.0) -> int:
    """PATCH ``url``; a server that has just restarted may answer 503 while its services start: retry those."""

    deadline = time.monotonic() + within
    while True:
        status = _api("PATCH", url, json=body, timeout=HTTP_TIMEOUT).status_code
        if status != 503 or time.monotonic() > deadline:
            return status
        time.sleep(2)


def _refused_then_accepted(servers: Servers, old: dict[str, str], new: dict[str, str]) -> None:
    """Both servers refuse the credentials ``old`` and accept ``new``: Prefect's auth string, MLflow's admin and the
    workers' MLflow user."""
    for credentials, status in ((old, 401), (new, 200)):
        prefect = _api("GET", f"{servers.prefect_url}/api/work_pools/cpu", login=False, timeout=HTTP_TIMEOUT,
                       headers={"Authorization": _basic(credentials["PREFECT_AUTH_STRING"])})
        assert prefect.status_code == status, prefect.text
        for user in ("MLFLOW", "MLFLOW_WORKER"):
            login = (credentials[f"{user}_USERNAME"], credentials[f"{user}_PASSWORD"])
            mlflow = _api("GET", f"{servers.mlflow_url}/api/2.0/mlflow/experiments/search", login=False, auth=login,
                          params={"max_results": 1}, timeout=HTTP_TIMEOUT)
            assert mlflow.status_code == status, (user, mlflow.text)


def test_rotate_changes_every_password(servers: Servers):
    """`scripts/servers rotate` with the servers running: new credentials, MLflow's set through its API with the old
    ones; the servers and workers restart with them, and the old ones are refused."""
    import stat

    old = dict(servers.credentials)
    began = time.monotonic()
    rotated = servers.run(str(servers.root / "scripts" / "servers"), "rotate", timeout=400)
    print(f"rotate took {time.monotonic() - began:.1f} s\n{rotated.stdout}{rotated.stderr}")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    new = _credentials(servers.root)
    assert {key for key in new if new[key] != old[key]} == {
        "PREFECT_AUTH_STRING", "MLFLOW_PASSWORD", "MLFLOW_SECRET_KEY", "POSTGRES_PASSWORD", "MLFLOW_WORKER_PASSWORD"}
    auth = servers.root / ".prefect" / "auth"
    assert stat.S_IMODE((auth / "credentials").stat().st_mode) == 0o600 and not (auth / "credentials.new").exists()
    _log_in(servers)
    _refused_then_accepted(servers, old, new)
    assert {e["MLFLOW_TRACKING_PASSWORD"] for e in _session_environments(servers, "worker")} == {new["MLFLOW_WORKER_PASSWORD"]}


def test_credentials_regeneration_is_refused(servers: Servers):
    """An emptied credentials file while MLflow's user store exists: `start` stops, saying how to recover, and makes
    no new credentials (they would not open the store). `rotate` with the servers stopped then sets new passwords in
    the store, and `start` works with them."""
    script = str(servers.root / "scripts" / "servers")
    old = dict(servers.credentials)
    assert servers.run(script, "stop", timeout=180).returncode == 0
    file = servers.root / ".prefect" / "auth" / "credentials"
    file.write_text("")
    refused = servers.run(script, "start", timeout=300)
    message = refused.stdout + refused.stderr
    print(message)
    assert refused.returncode != 0 and ".prefect/auth/mlflow-auth.db" in message, message
    assert "Restore the file" in message and "scripts/servers rotate" in message
    assert file.read_text() == "" and not _answers(f"{servers.prefect_url}/api/health")
    rotated = servers.run(script, "rotate", timeout=300)
    print(rotated.stdout + rotated.stderr)
    assert rotated.returncode == 0 and "mlflow-auth.db" in rotated.stdout, rotated.stdout + rotated.stderr
    started = servers.run(script, "start", timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    new = _credentials(servers.root)
    _log_in(servers)
    _refused_then_accepted(servers, old, new)


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
    sessions = [(run_dir / f"{name}.pid").read_text().strip() for name in ("worker", "gpu-worker", "prefect", "mlflow")]
    began = time.monotonic()
    stopped = servers.run(str(servers.root / "scripts" / "servers"), "stop", timeout=180)
    print(f"stop took {time.monotonic() - began:.1f} s\n{stopped.stdout}{stopped.stderr}")
    assert stopped.returncode == 0, stopped.stderr
    left = subprocess.run(["ps", "-o", "pid=,args=", "-s", ",".join(sessions)], capture_output=True, text=True)
    assert left.stdout.strip() == "", f"processes left after stop:\n{left.stdout}"
    assert _processes_with_home(servers.env["PREFECT_HOME"]) == []
    assert not _answers(f"{servers.prefect_url}/api/health") and not _answers(f"{servers.mlflow_url}/health")
