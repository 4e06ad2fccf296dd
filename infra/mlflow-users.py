"""MLflow's user for the flow runs: ``pipeline`` (or ``$MLFLOW_PIPELINE_USER``), not an admin, with EDIT on the
pipeline's experiment (``tracking.experiment`` of params.yaml) and, the server's default permission being
NO_PERMISSIONS, nothing else. Made through MLflow's auth REST API by the admin; run it again with a new
``$MLFLOW_PIPELINE_PASSWORD`` to rotate that password.

    MLFLOW_TRACKING_URI=http://mlflow:5000 MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... \\
    MLFLOW_PIPELINE_PASSWORD=... python infra/mlflow-users.py [params.yaml]

compose's setup service runs it (infra/compose/setup.sh); on Kubernetes run it through a port-forward
(infra/kubernetes/README.md). Every credential comes from the environment, none from the command line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

MIN_PASSWORD_CHARS = 12


def experiment_name(params_file: Path) -> str:
    if not params_file.is_file():
        raise SystemExit(f"mlflow-users: {params_file} does not exist (pass the project's params.yaml)")
    tracking = (yaml.safe_load(params_file.read_text()) or {}).get("tracking") or {}
    return tracking.get("experiment") or "influence-pipeline"


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SystemExit(f"mlflow-users: set {name}")
    return value


def main(argv: list[str]) -> None:
    from mlflow.exceptions import RestException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    uri = required("MLFLOW_TRACKING_URI")
    required("MLFLOW_TRACKING_USERNAME")
    required("MLFLOW_TRACKING_PASSWORD")
    username = os.environ.get("MLFLOW_PIPELINE_USER", "pipeline")
    password = required("MLFLOW_PIPELINE_PASSWORD")
    if len(password) < MIN_PASSWORD_CHARS:
        raise SystemExit(f"mlflow-users: MLFLOW_PIPELINE_PASSWORD needs {MIN_PASSWORD_CHARS} characters or more")
    name = experiment_name(Path(argv[0]) if argv else Path("params.yaml"))

    auth = get_app_client("basic-auth", tracking_uri=uri)
    try:
        auth.get_user(username)
    except RestException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
    else:
        auth.update_user_password(username, password)
    auth.update_user_admin(username, False)

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    try:
        auth.grant_user_permission(username, "experiment", experiment_id, "EDIT")
    except RestException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, "experiment", experiment_id)  # whatever it was: EDIT from now on
        auth.grant_user_permission(username, "experiment", experiment_id, "EDIT")
    print(f"mlflow-users: {username} may edit the experiment {name!r} (id {experiment_id}) and nothing else")


if __name__ == "__main__":
    main(sys.argv[1:])
