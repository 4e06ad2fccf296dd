"""What a run's parameters may reach: the project folder, the GPU deployment, the MLflow store.

Anyone who can open the run form can type into it, so the form's free-text fields are checked when
the run starts, against what the operator fixed outside the form:

- ``project_dir``: on a worker started by ``scripts/servers`` the project folder is fixed at deploy
  time (``$INFLUENCE_PROJECT_DIR``); a run naming another folder is refused. Without the variable
  (a run from the command line) any folder is accepted: the caller owns the machine.
- ``gpu_deployment``: empty, or a deployment of this project's ``attribution`` flow
  (``attribution/<name>``): never another flow.
- ``tracking.tracking_uri``: empty (``$MLFLOW_TRACKING_URI``, else the project's SQLite store), a
  SQLite file inside the project folder, ``$MLFLOW_TRACKING_URI`` itself, or one listed in
  ``$INFLUENCE_TRACKING_URIS`` (comma-separated). Credentials never go in a URI of the settings
  (MLflow reads ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``), and :func:`redact`
  strips any ``user:password@`` from a URI before it is logged or shown.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from flows.settings import SettingsError

PROJECT_DIR_ENV = "INFLUENCE_PROJECT_DIR"
TRACKING_URIS_ENV = "INFLUENCE_TRACKING_URIS"
GPU_DEPLOYMENT = re.compile(r"attribution/[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class ReachError(SettingsError):
    """A run parameter reaches outside what the operator allowed."""


def redact(uri: str) -> str:
    """``uri`` without the credentials of its network location (``http://user:pw@host/`` -> ``http://host/``)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable URI>"
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries a ``user[:password]@`` part."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return parts.username is not None or parts.password is not None


def project_root(project_dir: str) -> Path:
    """``project_dir`` resolved; refused when it is not the folder ``$INFLUENCE_PROJECT_DIR`` fixes (when set)."""
    root = Path(project_dir).resolve()
    fixed = os.environ.get(PROJECT_DIR_ENV, "")
    if fixed and root != Path(fixed).resolve():
        raise ReachError(f"project_dir={project_dir!r} is not this worker's project folder: its deployments run in "
                         f"{fixed} only (fixed at deploy time by ${PROJECT_DIR_ENV}); leave the field as it is")
    return root


def check_gpu_deployment(name: str) -> str:
    """``name`` if it is empty or a deployment of this project's ``attribution`` flow, else raise."""
    if name and not GPU_DEPLOYMENT.fullmatch(name):
        raise ReachError(f"gpu_deployment={name!r} is not a deployment of the attribution flow: "
                         "accepted are '' (run the GPU stages in this run) or 'attribution/<deployment>', e.g. 'attribution/gpu'")
    return name


def allowed_tracking_uris() -> list[str]:
    """The tracking URIs a run may name besides the defaults: ``$MLFLOW_TRACKING_URI`` and ``$INFLUENCE_TRACKING_URIS``."""
    listed = [u.strip() for u in os.environ.get(TRACKING_URIS_ENV, "").split(",") if u.strip()]
    own = os.environ.get("MLFLOW_TRACKING_URI", "")
    return ([own] if own else []) + listed


def check_tracking_uri(uri: str, root: Path) -> str:
    """``uri`` if a run may log there (see the module's docstring), else raise naming what is accepted."""
    if not uri or uri in allowed_tracking_uris():
        return uri
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path = path if path.is_absolute() else Path("/") / path
        if path.resolve().is_relative_to(root.resolve()):
            return uri
    allowed = [redact(u) for u in allowed_tracking_uris()]
    raise ReachError(f"tracking.tracking_uri={redact(uri)!r} is not allowed here: accepted are '' (the default store), "
                     f"a SQLite file inside {root} (sqlite:///{root}/<name>.db), or one of {allowed or 'none yet'} "
                     f"(${TRACKING_URIS_ENV}, comma-separated, set by the operator where the worker runs)")
