"""The operator's files of ``infra/`` pass the linters that install here: hadolint (the Dockerfile), the
compose specification's schema (check-jsonschema), Kubernetes 1.33's schemas (kubernetes-validate), and the
Prefect server's own check of the work pools' job templates; each linter is shown to refuse a broken file.

And they are closed by default: no secret in the build context or in git, job templates that fix everything
but a run's name and labels, hardened pods behind NetworkPolicies, images pinned by digest, no password on a
command line, MLflow answering its service name only among the hosts it lists, a scoped MLflow user for the
flow runs, and a Dask scheduler that admits only certificates of the operator's CA."""

from __future__ import annotations

import base64
import http.client
import json
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
BIN = Path(sys.executable).parent
KUBERNETES_VERSION = "1.33.0"


def tool(name: str) -> str:
    found = BIN / name
    if not found.exists():
        found = shutil.which(name)
    assert found, f"{name} is not installed (the dev extra of pyproject.toml installs it)"
    return str(found)


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_dockerfile_passes_hadolint_and_a_broken_one_does_not(tmp_path):
    done = run(tool("hadolint"), "--failure-threshold", "info", str(INFRA / "docker" / "Dockerfile"))
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y git\n")  # unpinned, lists kept
    assert run(tool("hadolint"), str(broken)).returncode != 0


def test_the_image_installs_the_lock_hash_checked():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert "--require-hashes -r /tmp/no-torch.lock" in text and "--require-hashes --no-deps" in text
    assert {"cpu", "cuda"} <= set(re.findall(r"^FROM \S+ AS (\w+)$", text, flags=re.M))
    python = re.search(r"^ARG PYTHON_IMAGE=docker\.io/library/python:(3\.\d+)\.\d+-slim\S*@sha256:[0-9a-f]{64}$", text,
                       flags=re.M)
    assert python and python.group(1) == "3.11"  # requires-python of pyproject.toml


def test_compose_file_passes_the_compose_schema_and_a_broken_one_does_not(tmp_path):
    compose = INFRA / "compose.yaml"
    done = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose))
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(compose.read_text().replace("    restart: unless-stopped\n", "    restart_policy: always\n", 1))
    assert run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)).returncode != 0


def test_compose_file_asks_for_every_secret_and_binds_its_ports_to_loopback():
    import yaml

    text = (INFRA / "compose.yaml").read_text()
    data = yaml.safe_load(text)
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "MINIO_ROOT_PASSWORD", "S3_MLFLOW_SECRET",
            "S3_PIPELINE_SECRET", "S3_DASK_SECRET", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD",
            "MLFLOW_PIPELINE_PASSWORD", "INFLUENCE_STORE_KEY"} <= required
    readme = (INFRA / "README.md").read_text()
    assert not [name for name in required if name not in readme], "infra/README.md lists every variable compose asks for"
    assert {"postgres", "minio", "prefect-server", "mlflow", "dask-scheduler", "dask-worker", "worker-cpu", "worker-gpu"} <= set(data["services"])
    for name, service in data["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
    assert "--app-name" in data["services"]["mlflow"]["command"]  # MLflow's basic-auth app
    assert data["services"]["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]


def test_kubernetes_manifests_pass_the_schemas_and_a_broken_one_does_not(tmp_path):
    manifests = sorted((INFRA / "kubernetes").glob("*.yaml"))
    assert len(manifests) >= 5
    done = run(tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", *map(str, manifests))
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "dask.yaml"
    broken.write_text((INFRA / "kubernetes" / "dask.yaml").read_text().replace("replicas: 2", "replica: 2"))
    assert run(tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", str(broken)).returncode != 0


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.parametrize("kind, path", [("process", "process-job-template.json"), ("docker", "work-pools/docker.json"),
                                        ("kubernetes", "work-pools/kubernetes.json")])
def test_work_pools_are_created_from_the_job_templates(kind, path, prefect_server):
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((INFRA / path).read_text())
    with get_client(sync_client=True) as client:
        pool = client.create_work_pool(WorkPoolCreate(name=f"check-{kind}", type=kind, base_job_template=template))
        assert pool.base_job_template == template
        broken = json.loads(json.dumps(template))
        broken["job_configuration"]["command"] = "{{ no_such_variable }}"
        with pytest.raises(Exception, match="no_such_variable"):
            client.create_work_pool(WorkPoolCreate(name=f"broken-{kind}", type=kind, base_job_template=broken))


# --- closed by default ------------------------------------------------------------------------------------------

TEMPLATE_VARIABLES = {"name", "labels"}  # all a flow run may choose, as infra/process-job-template.json


def _placeholders(value: object) -> set[str]:
    return set(re.findall(r"\{\{\s*([^}\s]+)\s*\}\}", json.dumps(value)))


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_server_templates_closed(kind, prefect_server):
    import asyncio
    import uuid

    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import FlowRun

    template = json.loads((INFRA / "work-pools" / f"{kind}.json").read_text())
    variables, job = template["variables"], template["job_configuration"]
    assert set(variables["properties"]) == TEMPLATE_VARIABLES and variables.get("additionalProperties") is False
    assert _placeholders(job) <= TEMPLATE_VARIABLES, "only name and labels are filled in from a run"
    if kind == "docker":
        assert job["privileged"] is False and job["command"] is None and job["image"] == "influence-platform:cpu"
        assert job["image_pull_policy"] == "Never"  # the image built here, never a namesake pulled from a registry
        assert job["networks"] == ["influence_default"] and job["network_mode"] is None
        assert all(not volume.startswith(("/", ".", "~")) for volume in job["volumes"]), "named volumes, no host path"
        assert job["container_create_kwargs"]["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in job["container_create_kwargs"]["security_opt"]
        assert not [name for name in job["env"] if re.search(r"PASSWORD|SECRET|AUTH|TOKEN|KEY$", name)]
    else:
        manifest = job["job_manifest"]
        pod = manifest["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert job["namespace"] == manifest["metadata"]["namespace"] == "influence" and job["env"] == {}
        assert pod["serviceAccountName"] == "prefect-flow-run" and pod["automountServiceAccountToken"] is False
        assert "args" not in container and "command" not in container  # the worker's own flow-run command
        assert _pod_problems(pod) == []

    bad_variables = [{"privileged": True}, {"env": {"X": "1"}}, {"image": "evil:latest"}, {"command": "sh"},
                     {"volumes": ["/:/host"]}, {"service_account_name": "prefect-worker"}, {"namespace": "default"}]
    if kind == "kubernetes":  # a run must not pose as another pod for the NetworkPolicies
        bad_variables.append({"labels": {"app.kubernetes.io/name": "dask-worker"}})
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=f"closed-{kind}", type=kind, base_job_template=template))
        flow_id = client.create_flow_from_name(f"closed-{kind}")
        for values in bad_variables:
            with pytest.raises(Exception, match="422"):
                client.create_deployment(flow_id=flow_id, name=f"bad-{uuid.uuid4().hex[:8]}",
                                         work_pool_name=f"closed-{kind}", job_variables=values)
        deployment = client.create_deployment(flow_id=flow_id, name="labelled", work_pool_name=f"closed-{kind}",
                                              job_variables={"labels": {"team": "a"}})
        with pytest.raises(Exception, match="422"):
            client.create_flow_run_from_deployment(deployment, job_variables={"env": {"X": "1"}})

    # what the worker itself makes of the template for a run
    if kind == "docker":
        from prefect_docker.worker import DockerWorkerJobConfiguration as Configuration
    else:
        from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration as Configuration
    configuration = asyncio.run(Configuration.from_template_and_values(template, {"labels": {"team": "a"}}))
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="a-run"))
    if kind == "docker":
        assert configuration.privileged is False and configuration.volumes == job["volumes"]
        assert configuration.image == job["image"] and configuration.labels["team"] == "a"
    else:
        pod_template = configuration.job_manifest["spec"]["template"]
        assert pod_template["metadata"]["labels"]["app.kubernetes.io/name"] == "flow-run"
        assert pod_template["spec"]["serviceAccountName"] == "prefect-flow-run"
        assert _pod_problems(pod_template["spec"]) == []


def _dockerignore(text: str) -> list[tuple[bool, re.Pattern]]:
    """The rules of a .dockerignore as Docker reads them (moby/patternmatcher): ``(exception, regex)`` in order,
    patterns relative to the context's root, ``**`` any number of folders, ``*`` and ``?`` within one name."""
    rules = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        pattern = line.strip()
        exception = pattern.startswith("!")
        pattern = posixpath.normpath(pattern[1:].strip() if exception else pattern)
        pattern = pattern[1:] if len(pattern) > 1 and pattern.startswith("/") else pattern
        regex, i = "^", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                i += 2 + (pattern[i + 2:i + 3] == "/")
                regex += ".*" if i >= len(pattern) else "(.*/)?"
                continue
            regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
        rules.append((exception, re.compile(regex + "$")))
    return rules


def _docker_excludes(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last rule that matches it or a folder above
    it decides (moby's MatchesOrParentMatches)."""
    parents = path.split("/")[:-1]
    excluded = False
    for exception, regex in rules:
        if exception != excluded:
            continue
        if regex.match(path) or any(regex.match("/".join(parents[:i + 1])) for i in range(len(parents))):
            excluded = not exception
    return excluded


SECRETS = ["infra/.env", ".env", "infra/kubernetes/job.env", "infra/kubernetes/prefect-server.env",
           "infra/kubernetes/mlflow-auth.ini", "infra/certs/dask/client.key", "infra/certs/dask/ca.pem",
           "flows/.env", "profiles/local.env", "influence/mlflow-auth.ini", "infra/compose/certs/a.crt",
           "flows/tls.key", "infra/compose/server.pem"]


def test_build_context_has_no_secrets(tmp_path):
    # the matcher follows Docker on the cases this repository's rules rely on
    rules = _dockerignore("*\n!keep\n!data/user/README.md\n**/*.env\n**/certs\n")
    assert _docker_excludes("a.py", rules) and _docker_excludes("data/user/x.csv", rules)
    assert not _docker_excludes("keep/x.py", rules) and not _docker_excludes("data/user/README.md", rules)
    assert _docker_excludes("keep/a/.env", rules) and _docker_excludes("keep/b.env", rules)
    assert _docker_excludes("keep/certs/x", rules) and not _docker_excludes("keep/env.sh", rules)

    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    rules = _dockerignore((REPO / ".dockerignore").read_text())
    context = {path for path in tracked + SECRETS if not _docker_excludes(path, rules)}
    assert not context & set(SECRETS), "secrets in the build context"
    assert not [path for path in context if path.startswith(("tests/", ".git/", "bench/", "docs/", "infra/work-pools"))]

    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    copies = re.findall(r"^(?:COPY|ADD)\s+(?!--from)(.+)$", dockerfile, flags=re.M)
    assert copies
    for line in copies:
        *sources, _ = line.split()
        for source in sources:
            assert source.rstrip("/") not in (".", "*", ""), f"the Dockerfile copies the whole context: {line}"
            assert source in context or any(path.startswith(source.rstrip("/") + "/") for path in context), \
                f"{source} (COPY) is not in the build context"

    # git ignores them too, and not the repository's own files
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    ordinary = ["scripts/env.sh", "flows/definition/settings.py", "infra/compose/make-certs.sh", "infra/kubernetes/dask.yaml"]
    for path in SECRETS + ordinary:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("x\n")
    done = subprocess.run(["git", "check-ignore", *SECRETS, *ordinary], cwd=repo, capture_output=True, text=True)
    assert set(done.stdout.split()) == set(SECRETS), done.stdout + done.stderr


# the platform's own image: built and pushed by the operator, who pins the digest the push gives
# (infra/kubernetes/README.md); every other image carries a digest
IMAGE_EXCEPTIONS = {"registry.example.com/influence/influence-platform:cpu"}
DIGEST = re.compile(r"^[a-z0-9.-]+(:\d+)?/[^@\s]+@sha256:[0-9a-f]{64}$")  # a registry host, a path, a digest


def _pod_problems(pod: dict) -> list[str]:
    """What keeps ``pod`` (a PodSpec) from the restricted profile and a pinned image."""
    problems, pod_context = [], pod.get("securityContext", {})
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("shares a host namespace")
    problems += [f"volume {v['name']} is a host path" for v in pod.get("volumes", []) if "hostPath" in v]
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = {**pod_context, **container.get("securityContext", {})}
        name = container["name"]
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []) or context.get("capabilities", {}).get("add"):
            problems.append(f"{name}: capabilities not dropped")
        if context.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: no seccomp profile")
        if context.get("runAsNonRoot") is not True or context.get("privileged"):
            problems.append(f"{name}: may run as root or privileged")
        if not (DIGEST.match(container["image"]) or container["image"] in IMAGE_EXCEPTIONS):
            problems.append(f"{name}: image {container['image']} is not qualified and pinned by digest")
    return problems


def _kubernetes_documents() -> list[dict]:
    import yaml

    return [doc for path in sorted((INFRA / "kubernetes").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_k8s_hardening():
    documents = _kubernetes_documents()
    pods = {doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for doc in documents
            if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")}
    job = json.loads((INFRA / "work-pools" / "kubernetes.json").read_text())["job_configuration"]["job_manifest"]
    pods["flow-run (work pool)"] = job["spec"]["template"]["spec"]
    assert {"prefect-server", "mlflow", "dask-scheduler", "dask-worker", "prefect-worker"} <= set(pods)
    assert {name: _pod_problems(pod) for name, pod in pods.items() if _pod_problems(pod)} == {}
    # only the worker talks to the Kubernetes API
    with_token = [name for name, pod in pods.items() if pod.get("automountServiceAccountToken") is not False]
    assert with_token == ["prefect-worker"]

    namespace = next(doc for doc in documents if doc["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"

    policies = [doc for doc in documents if doc["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in policies), "no default deny of ingress"
    selected = {}
    for policy in policies:
        name = policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']} admits every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"} and peer["podSelector"], f"{policy['metadata']['name']}: {peer}"
                labels = peer["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
                expressions = peer["podSelector"].get("matchExpressions", [])
                selected.setdefault(name, set()).update([labels] if labels else expressions[0]["values"])
    assert selected["dask-scheduler"] == {"flow-run", "dask-worker"}
    assert selected["postgres"] == {"prefect-server", "mlflow"}
    assert selected["mlflow"] == {"flow-run"}


def test_third_party_images_are_pinned_by_digest():
    import yaml

    services = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    pulled = {name: service["image"] for name, service in services.items() if "build" not in service}
    assert {"postgres", "minio", "buckets"} <= set(pulled)
    assert {name: image for name, image in pulled.items() if not DIGEST.match(image)} == {}
    built = {service["image"] for service in services.values() if "build" in service}
    assert built == {"influence-platform:cpu", "influence-platform:cuda"}  # made by `docker compose build`


SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH|TOKEN|KEY|_URL|_URI|DATABASE")


def _command_problems(where: str, argv: object, secret_env: set[str]) -> list[str]:
    text = " ".join(argv) if isinstance(argv, list) else str(argv or "")
    problems = [f"{where}: expands {name}" for name in re.findall(r"\$\{?\(?([A-Za-z_][A-Za-z0-9_]*)", text)
                if SECRET_NAME.search(name) or name in secret_env]
    if re.search(r"://[^/\s@]*:[^/\s@]*@", text):
        problems.append(f"{where}: a URL with credentials")
    return problems


def test_no_secrets_on_command_lines(tmp_path):
    import yaml

    problems = []
    services = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        for key in ("command", "entrypoint"):
            problems += _command_problems(f"compose {name} {key}", service.get(key), set())
        problems += _command_problems(f"compose {name} healthcheck", service.get("healthcheck", {}).get("test"), set())
    for doc in _kubernetes_documents():
        if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            env = container.get("env", [])
            from_secrets = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
            problems += _command_problems(f"{doc['metadata']['name']} command", container.get("command"), from_secrets)
            problems += _command_problems(f"{doc['metadata']['name']} args", container.get("args"), from_secrets)
            problems += [f"{doc['metadata']['name']}: {e['name']} in plain text" for e in env
                         if re.search(r"://[^/\s@]*:[^/\s@]*@", str(e.get("value", "")))]
    assert problems == []

    # the buckets service hands the MinIO users' secrets to mc on its standard input
    bin_dir, log = tmp_path / "bin", tmp_path / "mc.log"
    bin_dir.mkdir()
    (bin_dir / "mc").write_text(f'#!/bin/sh\necho "argv: $*" >>{log}\n'
                                f'case "$*" in "admin user add"*) echo "stdin: $(cat)" >>{log} ;; esac\n')
    (bin_dir / "mc").chmod(0o755)
    secrets = {"S3_MLFLOW_SECRET": "mlflow-secret-1", "S3_PIPELINE_SECRET": "pipeline-secret-2",
               "S3_DASK_SECRET": "dask-secret-3"}
    done = subprocess.run(["sh", str(INFRA / "compose" / "buckets.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", **secrets})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = log.read_text().splitlines()
    argv, stdin = [l for l in lines if l.startswith("argv:")], [l for l in lines if l.startswith("stdin:")]
    assert not [l for l in argv if any(secret in l for secret in secrets.values())]
    assert sorted(stdin) == sorted(f"stdin: {secret}" for secret in secrets.values())
    assert any("admin user add store dask" in l for l in argv)


def test_compose_credentials_are_scoped(tmp_path):
    import yaml

    text = (INFRA / "compose.yaml").read_text()
    services = yaml.safe_load(text)["services"]

    def holders(variable: str) -> set[str]:
        found = set()
        for name, service in services.items():
            environment = service.get("environment", {})
            values = environment.values() if isinstance(environment, dict) else environment
            if any(re.search(r"\$\{" + variable + r"\b", str(value)) for value in values):
                found.add(name)
        return found

    assert holders("MINIO_ROOT_PASSWORD") == {"minio", "buckets"}
    assert holders("MLFLOW_ADMIN_PASSWORD") == {"setup"}  # and the MLflow server's auth file
    assert holders("PREFECT_AUTH_STRING") == {"prefect-server", "worker-cpu", "worker-gpu", "setup"}
    assert holders("POSTGRES_PASSWORD") == {"postgres"}
    assert holders("PREFECT_DB_PASSWORD") == {"postgres", "prefect-server"}
    assert holders("MLFLOW_DB_PASSWORD") == {"postgres", "mlflow"}
    dask = services["dask-worker"]["environment"]
    assert dask["AWS_ACCESS_KEY_ID"] == "dask" and not [k for k in dask if k.startswith(("PREFECT", "MLFLOW"))]
    for worker in ("worker-cpu", "worker-gpu"):
        environment = services[worker]["environment"]
        assert environment["MLFLOW_TRACKING_USERNAME"] == "pipeline" and environment["AWS_ACCESS_KEY_ID"] == "pipeline"
        assert environment["DASK_SCHEDULER_ADDRESS"].startswith("tls://")
    assert services["mlflow"]["environment"]["AWS_ACCESS_KEY_ID"] == "mlflow"
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] not in ("", "*")
    for name in ("MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"):
        assert "*" not in services["mlflow"]["environment"][name]

    # make-env.sh writes every credential compose asks for, readable by its owner only
    env_file = tmp_path / ".env"
    subprocess.run(["bash", str(INFRA / "compose" / "make-env.sh"), str(env_file)], check=True, capture_output=True)
    written = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert set(re.findall(r"\$\{(\w+):\?", text)) <= set(written) and oct(env_file.stat().st_mode & 0o777) == "0o600"
    assert subprocess.run(["bash", str(INFRA / "compose" / "make-env.sh"), str(env_file)],
                          capture_output=True).returncode != 0, "make-env.sh overwrote an existing file"


# --- the servers, started for real ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen, first: signal.Signals = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, first)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def _http(port: int, method: str, path: str, headers: dict[str, str], body: str | None = None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


ADMIN_PASSWORD = "admin-password-for-tests"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _start_mlflow(folder: Path, port: int, environment: dict[str, str]) -> subprocess.Popen:
    """An MLflow server with the basic-auth app on loopback ``port``, its stores in ``folder``."""
    (folder / "auth.ini").write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                                     f"database_uri = sqlite:///{folder}/auth.db\nadmin_username = admin\n"
                                     f"admin_password = {ADMIN_PASSWORD}\n"
                                     "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(folder / "auth.ini"), MLFLOW_FLASK_SERVER_SECRET_KEY="x" * 32,
               MLFLOW_BACKEND_STORE_URI=f"sqlite:///{folder}/mlflow.db",
               MLFLOW_ARTIFACTS_DESTINATION=str(folder / "artifacts"),
               MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **environment)
    with open(folder / "server.log", "wb") as log:
        return subprocess.Popen([tool("mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_mlflow(process: subprocess.Popen, port: int, folder: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, (folder / "server.log").read_text()[-3000:]
        try:
            if _http(port, "GET", "/health", {})[0] == 200:  # /health is exempt from the host check
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("MLflow did not start: " + (folder / "server.log").read_text()[-3000:])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """An MLflow server (basic-auth app, as compose runs it) with compose's allowed hosts and CORS origins, plus its
    own loopback address, which infra/mlflow-users.py and MLflow's client use here (they cannot send the Host
    header ``mlflow:5000``); the host checks below send that header themselves."""
    import yaml

    environment = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]["mlflow"]["environment"]
    compose = {name: environment[name]
               for name in ("MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS")}
    folder, port = tmp_path_factory.mktemp("mlflow"), _free_port()
    process = _start_mlflow(folder, port, {**compose, "MLFLOW_SERVER_ALLOWED_HOSTS":
                                           f"{compose['MLFLOW_SERVER_ALLOWED_HOSTS']},127.0.0.1:{port}"})
    try:
        import mlflow.server  # noqa: F401  (imported while the server starts: both take a while)
        import mlflow.tracking  # noqa: F401

        _wait_for_mlflow(process, port, folder)
        yield {"port": port, "compose": compose}
    finally:
        _stop(process)


def test_mlflow_allowed_hosts_by_service_name(mlflow_server):
    port, settings = mlflow_server["port"], mlflow_server["compose"]
    assert "mlflow:5000" in settings["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    admin = {"Authorization": _basic("admin", ADMIN_PASSWORD)}
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _http(port, "GET", search, {"Host": "mlflow:5000", **admin})[0] == 200
    status, body = _http(port, "GET", search, {"Host": "evil.example", **admin})
    assert status == 403 and "Host" in body
    assert _http(port, "GET", search, {"Host": "evil.example:5000", **admin})[0] == 403
    assert _http(port, "GET", search, {"Host": "mlflow:5000"})[0] == 401  # the service name does not replace auth
    create = "/api/2.0/mlflow/experiments/create"
    json_body = {"Content-Type": "application/json", "Host": "mlflow:5000", **admin}
    origin = settings["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"].split(",")[0]
    evil = {**json_body, "Origin": "http://evil.example"}
    assert _http(port, "POST", create, evil, '{"name": "from-evil"}')[0] == 403
    assert _http(port, "POST", create, {**json_body, "Origin": origin}, '{"name": "from-the-ui"}')[0] == 200


def test_scoped_mlflow_user_edits_the_pipeline_experiment_only(mlflow_server, tmp_path, monkeypatch):
    import runpy

    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    uri = f"http://127.0.0.1:{mlflow_server['port']}"
    params = tmp_path / "params.yaml"
    params.write_text("tracking:\n  experiment: the-pipeline\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def as_user(user: str, password: str) -> MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        return MlflowClient(tracking_uri=uri)

    def users(password: str) -> None:  # infra/mlflow-users.py as setup runs it, its credentials in the environment
        as_user("admin", ADMIN_PASSWORD)
        monkeypatch.setenv("MLFLOW_PIPELINE_PASSWORD", password)
        monkeypatch.setattr(sys, "argv", ["mlflow-users.py", str(params)])
        runpy.run_path(str(INFRA / "mlflow-users.py"), run_name="__main__")

    with pytest.raises(SystemExit, match="12 characters"):
        users("short")
    users("first-pipeline-password")
    other = as_user("admin", ADMIN_PASSWORD).create_experiment("someone-else")
    assert get_app_client("basic-auth", tracking_uri=uri).get_user("pipeline").is_admin is False
    pipeline = as_user("pipeline", "first-pipeline-password")
    experiment = pipeline.get_experiment_by_name("the-pipeline").experiment_id
    run = pipeline.create_run(experiment).info.run_id
    pipeline.log_metric(run, "accuracy", 0.5)
    with pytest.raises(MlflowException, match="403|PERMISSION_DENIED"):
        pipeline.create_run(other)

    users("second-pipeline-password")  # a rotation: the old password stops working
    with pytest.raises(MlflowException, match="401|nauthenticated|nauthorized"):
        as_user("pipeline", "first-pipeline-password").search_experiments()
    assert as_user("pipeline", "second-pipeline-password").get_run(run).data.metrics == {"accuracy": 0.5}


def test_dask_scheduler_admits_only_certificates_of_make_certs(tmp_path):
    import yaml

    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    certs, rogue = tmp_path / "certs", tmp_path / "rogue"
    for folder in (certs, rogue):
        done = subprocess.run(["bash", str(INFRA / "compose" / "make-certs.sh")], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "DASK_CERTS_DIR": str(folder)})
        assert done.returncode == 0, done.stdout + done.stderr
    assert oct((certs / "ca.key").stat().st_mode & 0o777) == "0o600" and oct(certs.stat().st_mode & 0o777) == "0o700"

    def environment(service: str, folder: Path) -> dict[str, str]:
        """The service's Dask settings from compose.yaml, its /run/secrets/ files taken from ``folder``."""
        files = {name: Path(secret["file"]).name for name, secret in compose["secrets"].items()}
        env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
        for name, value in compose["services"][service]["environment"].items():
            if name.startswith("DASK_DISTRIBUTED__"):
                secret = str(value).removeprefix("/run/secrets/")
                env[name] = str(folder / files[secret]) if secret in files else str(value)
        return env

    scheduler_command = compose["services"]["dask-scheduler"]["command"]
    assert scheduler_command[:4] == ["dask", "scheduler", "--protocol", "tls"]
    port = _free_port()
    log = tmp_path / "scheduler.log"
    with open(log, "wb") as out:
        scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--protocol", "tls", "--host", "127.0.0.1",
                                      "--port", str(port), "--no-dashboard"], env=environment("dask-scheduler", certs),
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    connect = ("import sys\nfrom distributed import Client\nwith Client(sys.argv[1], timeout=20) as client:\n"
               "    print('connected', client.scheduler_info()['id'])\n")
    try:
        deadline = time.monotonic() + 60
        while b"Scheduler at:" not in log.read_bytes():
            assert scheduler.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        address = f"tls://127.0.0.1:{port}"

        def client(env: dict[str, str], target: str = address) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", connect, target], env=env, capture_output=True, text=True,
                                  timeout=60)

        done = client(environment("worker-cpu", certs))
        assert done.returncode == 0 and "connected" in done.stdout, done.stdout + done.stderr
        assert client(environment("worker-cpu", rogue)).returncode != 0  # a certificate of another CA
        plain = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
        assert client(plain, f"tcp://127.0.0.1:{port}").returncode != 0  # no TLS at all
    finally:
        _stop(scheduler, signal.SIGKILL)  # nothing of it to keep
    assert "TLS handshake failed" in log.read_text() or "unknown ca" in log.read_text().lower()
