"""The operator's files of ``infra/`` pass the linters that install here: hadolint (the Dockerfile), the
compose specification's schema (check-jsonschema), Kubernetes 1.33's schemas (kubernetes-validate), and the
Prefect server's own check of the work pools' job templates; each linter is shown to refuse a broken file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
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
    python = re.search(r"^ARG PYTHON_IMAGE=python:(3\.\d+)\.\d+-slim", text, flags=re.M)
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
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "PREFECT_AUTH_STRING", "MLFLOW_ADMIN_PASSWORD"} <= required
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
