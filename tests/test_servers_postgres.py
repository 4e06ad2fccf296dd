"""Local server mode on PostgreSQL (``SERVERS_DATABASE=postgresql scripts/servers start``): Debian's PostgreSQL
with its data folder inside the project holds the Prefect server's and MLflow's stores, and stops with the
servers, its data kept; nothing is written to the SQLite stores. `rotate` changes its role's password, through the
running server or, stopped, in its data folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_project
from tests.test_servers import _free_port

# the nightly checks (scripts/run-tests -m nightly): PostgreSQL under the Prefect and MLflow servers is in the test
# command's multi-host test; this one checks the local scripts' PostgreSQL mode
pytestmark = [pytest.mark.slow, pytest.mark.nightly]
PSQL = sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))


def _credentials(root: Path) -> dict[str, str]:
    lines = (root / ".prefect" / "auth" / "credentials").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _psql(port: str, database: str, query: str, password: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PSQL[-1]), "-h", "127.0.0.1", "-p", port, "-U", "influence", "-d", database, "-tAc", query],
                          env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True, timeout=60)


def _sql(root: Path, port: str, database: str, query: str) -> list[str]:
    done = _psql(port, database, query, _credentials(root)["POSTGRES_PASSWORD"])
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _mlflow_answers(mlflow_url: str, credentials: dict[str, str]) -> dict[str, int]:
    """The status of one MLflow call as its admin and as the workers' user, with ``credentials``."""
    import httpx

    return {user: httpx.get(f"{mlflow_url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=60,
                            auth=(credentials[f"{user}_USERNAME"], credentials[f"{user}_PASSWORD"])).status_code
            for user in ("MLFLOW", "MLFLOW_WORKER")}


@pytest.mark.skipif(not PSQL, reason="Debian's postgresql package is not installed")
def test_servers_keep_their_stores_in_postgresql(tmp_path, raw_wheels):
    for parent in [tmp_path, *tmp_path.parents]:  # run as root, PostgreSQL's user must pass through the test's folders
        if os.geteuid() == 0 and parent != Path("/"):
            os.chmod(parent, os.stat(parent).st_mode | 0o001)
    root = make_project(tmp_path / "project", tmp_path / "remote", raw_wheels,
                        extra=("scripts", "prefect.yaml", "requirements.lock", "pyproject.toml", "infra"))
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_"))}
    env.update(PREFECT_PORT=str(_free_port()), MLFLOW_PORT=str(_free_port()), POSTGRES_PORT=str(_free_port()),
               PREFECT_HOME=str(root / ".prefect"), SERVERS_DATABASE="postgresql")
    script = [str(root / "scripts" / "servers")]
    pg = env["POSTGRES_PORT"]

    def servers(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(script + [command], cwd=root, env=env, capture_output=True, text=True, timeout=400)

    try:
        started = servers("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"PostgreSQL answers on 127.0.0.1:{pg}" in started.stdout
        assert _sql(root, pg, "prefect", "SELECT name FROM deployment ORDER BY name") == ["gpu", "nightly", "on-demand", "text"]
        credentials = _credentials(root)
        # a flow run and an MLflow run through the servers, as a worker makes them (as the workers' MLflow user)
        client_env = {"PREFECT_API_URL": f"http://127.0.0.1:{env['PREFECT_PORT']}/api",
                      "PREFECT_API_AUTH_STRING": credentials["PREFECT_AUTH_STRING"],
                      "MLFLOW_TRACKING_USERNAME": credentials["MLFLOW_WORKER_USERNAME"],
                      "MLFLOW_TRACKING_PASSWORD": credentials["MLFLOW_WORKER_PASSWORD"]}
        script_text = (
            "import mlflow\nfrom prefect import flow\n"
            "@flow(name='stored-in-postgres')\ndef hello():\n    return 1\n"
            "hello()\n"
            f"mlflow.set_tracking_uri('http://127.0.0.1:{env['MLFLOW_PORT']}')\n"
            "mlflow.set_experiment('postgres-check')\n"
            "with mlflow.start_run(run_name='stored'):\n    mlflow.log_metric('m', 1.5)\n")
        done = subprocess.run([sys.executable, "-c", script_text], cwd=root, env={**env, **client_env},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert _sql(root, pg, "prefect", "SELECT name FROM flow WHERE name = 'stored-in-postgres'") == ["stored-in-postgres"]
        assert _sql(root, pg, "mlflow", "SELECT name FROM runs WHERE name = 'stored'") == ["stored"]
        assert _sql(root, pg, "mlflow_auth", "SELECT username FROM users ORDER BY username") == [
            credentials["MLFLOW_USERNAME"], credentials["MLFLOW_WORKER_USERNAME"]]
        assert not (root / ".prefect" / "prefect.db").exists() and not (root / "mlruns.db").exists()
        mlflow_url = f"http://127.0.0.1:{env['MLFLOW_PORT']}"

        # rotate through the running servers: PostgreSQL's role by ALTER ROLE with the old password, MLflow's users
        # through its API; the servers restart with the new ones
        rotated = servers("rotate")
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        new = _credentials(root)
        assert new["POSTGRES_PASSWORD"] != credentials["POSTGRES_PASSWORD"]
        assert _psql(pg, "prefect", "SELECT 1", credentials["POSTGRES_PASSWORD"]).returncode != 0
        assert _sql(root, pg, "mlflow", "SELECT name FROM runs WHERE name = 'stored'") == ["stored"]
        assert _mlflow_answers(mlflow_url, credentials) == {"MLFLOW": 401, "MLFLOW_WORKER": 401}
        assert _mlflow_answers(mlflow_url, new) == {"MLFLOW": 200, "MLFLOW_WORKER": 200}

        stopped = servers("stop")
        assert stopped.returncode == 0 and "postgres stopped" in stopped.stdout, stopped.stdout + stopped.stderr
        assert subprocess.run(["pgrep", "-f", f"-p {pg}"], capture_output=True).returncode != 0  # no PostgreSQL left
        # the stores stay in the project for the next start (which finds the data folder and does not initialise it)
        assert (root / ".prefect" / "postgres" / "data" / "PG_VERSION").is_file()

        # rotate with the servers stopped (as when the credentials file is lost): set in the stores as their owner
        rotated = servers("rotate")
        assert rotated.returncode == 0 and ".prefect/postgres/" in rotated.stdout, rotated.stdout + rotated.stderr
        assert subprocess.run(["pgrep", "-f", f"-p {pg}"], capture_output=True).returncode != 0
        newest = _credentials(root)
        started = servers("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert _psql(pg, "prefect", "SELECT 1", new["POSTGRES_PASSWORD"]).returncode != 0
        assert _sql(root, pg, "mlflow", "SELECT name FROM runs WHERE name = 'stored'") == ["stored"]
        assert _mlflow_answers(mlflow_url, new) == {"MLFLOW": 401, "MLFLOW_WORKER": 401}
        assert _mlflow_answers(mlflow_url, newest) == {"MLFLOW": 200, "MLFLOW_WORKER": 200}
        assert servers("stop").returncode == 0
    finally:
        servers("stop")
