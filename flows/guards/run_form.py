"""What a run's parameters may reach: one rule for every value that becomes a path, a module, an address or a URL.

Anyone who can open the run form can type into it, so every value of the settings or of a flow
parameter that names something outside the settings themselves is checked when the run starts,
against what the operator fixed outside the form (environment variables of the worker), before any
work and before anything is written. The same checks hold on the command line: the operator sets the
variables there too. :func:`check_reach` checks a whole settings object.

- ``project_dir``: on a worker started by ``scripts/servers`` the project folder is fixed at deploy
  time (``$INFLUENCE_PROJECT_DIR``); a run naming another folder is refused. Without the variable
  (a run from the command line) any folder is accepted: the caller owns the machine.
- ``data.finetune_file`` / ``data.pretrain_file`` (with the source ``file``): resolved (links
  followed), they must lie in the project's ``data/user/`` (which ``dvc.yaml`` watches) or in a folder
  listed in ``$INFLUENCE_DATA_DIRS`` (absolute paths separated by ``:``).
- ``model.factory`` (family ``custom``): its module must be a file under ``data/user/``
  (``data/user/<package>/<module>.py``) or be listed, as ``module`` or ``module:function``, in
  ``$INFLUENCE_FACTORIES`` (comma-separated); checked without importing anything.
- ``cluster.dask_address``: empty, ``$DASK_SCHEDULER_ADDRESS``, or one listed in
  ``$INFLUENCE_DASK_ADDRESSES``; ``cluster.store``: empty or one listed in ``$INFLUENCE_STORES``
  (comma-separated). Never an address a form user chooses.
- ``gpu_deployment``: empty, or a deployment of this project's ``attribution`` flow
  (``attribution/<name>``): never another flow.
- ``tracking.tracking_uri``: empty (``$MLFLOW_TRACKING_URI``, else the project's SQLite store), a
  SQLite file inside the project folder that no server uses (never under ``.prefect/``, never a
  ``prefect.db`` or ``mlflow-auth.db``, and not ``mlruns.db`` while ``$MLFLOW_TRACKING_URI`` names the
  MLflow server that keeps its runs there), ``$MLFLOW_TRACKING_URI`` itself, or one listed in
  ``$INFLUENCE_TRACKING_URIS`` (comma-separated). Credentials never go in a URI of the settings
  (MLflow reads ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``), and :func:`redact`
  strips any ``user:password@`` from a URI before it is logged or shown.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from flows.definition.settings import SettingsError
from flows.definition.stage_table import USER_DATA

PROJECT_DIR_ENV = "INFLUENCE_PROJECT_DIR"
TRACKING_URIS_ENV = "INFLUENCE_TRACKING_URIS"
DATA_DIRS_ENV = "INFLUENCE_DATA_DIRS"
FACTORIES_ENV = "INFLUENCE_FACTORIES"
DASK_ADDRESSES_ENV = "INFLUENCE_DASK_ADDRESSES"
STORES_ENV = "INFLUENCE_STORES"
SERVER_STORE_NAMES = ("prefect.db", "mlflow-auth.db")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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


def _server_store(path: Path, root: Path) -> bool:
    """Whether the SQLite file ``path`` is (or could be) a store of the local servers (``scripts/servers``)."""
    root = root.resolve()
    if path.is_relative_to(root / ".prefect") or path.name in SERVER_STORE_NAMES:
        return True
    # the MLflow server of scripts/servers keeps its runs in <root>/mlruns.db: while the worker logs to it
    # ($MLFLOW_TRACKING_URI), writing that file directly would go round its permissions
    return bool(os.environ.get("MLFLOW_TRACKING_URI", "")) and path == root / "mlruns.db"


def check_tracking_uri(uri: str, root: Path) -> str:
    """``uri`` if a run may log there (see the module's docstring), else raise naming what is accepted."""
    if not uri or uri in allowed_tracking_uris():
        return uri
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path = (path if path.is_absolute() else Path("/") / path).resolve()
        if path.is_relative_to(root.resolve()) and not _server_store(path, root):
            return uri
    allowed = [redact(u) for u in allowed_tracking_uris()]
    raise ReachError(f"tracking.tracking_uri={redact(uri)!r} is not allowed here: accepted are '' (the default store), "
                     f"a SQLite file inside {root} that no server uses (sqlite:///{root}/<name>.db; never under .prefect/, "
                     f"nor the servers' own stores), or one of {allowed or 'none yet'} "
                     f"(${TRACKING_URIS_ENV}, comma-separated, set by the operator where the worker runs)")


def _listed(variable: str, separator: str = ",") -> list[str]:
    return [v.strip() for v in os.environ.get(variable, "").split(separator) if v.strip()]


def data_dirs(root: Path) -> list[Path]:
    """The folders user files may lie in: ``<root>/data/user`` and those of ``$INFLUENCE_DATA_DIRS``, resolved."""
    listed = [Path(d) for d in _listed(DATA_DIRS_ENV, ":")]
    return [(Path(root) / USER_DATA).resolve()] + [d.resolve() for d in listed if d.is_absolute()]


def check_user_file(field: str, value: str, root: Path) -> Path:
    """The user's file ``value`` (relative to the project folder, or absolute), resolved; refused unless it lies in
    one of :func:`data_dirs` (see the module's docstring).

    Raises:
        ReachError: naming the field, the value and the folders accepted.
    """
    path = Path(value)
    resolved = (path if path.is_absolute() else Path(root) / path).resolve()
    allowed = data_dirs(root)
    if not any(resolved.is_relative_to(folder) for folder in allowed):
        raise ReachError(f"{field}={value!r} lies outside the folders user files are read from: {USER_DATA}/ of the "
                         f"project ({allowed[0]}) or a folder the operator lists in ${DATA_DIRS_ENV} "
                         f"({[str(d) for d in allowed[1:]] or 'none'}); copy the file into {USER_DATA}/ and name it "
                         f"{USER_DATA}/<file>")
    return resolved


def factory_module_file(module: str, root: Path) -> Path | None:
    """The file of the module ``module`` (``a.b``) under ``<root>/data/user`` (``a/b.py`` or ``a/b/__init__.py``), or
    None; found on disk without importing anything."""
    parts = module.split(".")
    if not all(IDENTIFIER.fullmatch(p) for p in parts):
        return None
    base = (Path(root) / USER_DATA).resolve()
    for candidate in (base.joinpath(*parts[:-1], parts[-1] + ".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.is_file() and candidate.resolve().is_relative_to(base):
            return candidate.resolve()
    return None


def check_factory(spec: str, root: Path) -> Path | None:
    """Refuse a ``model.factory`` (``module:function``) whose module is neither a file under ``data/user`` nor
    listed by the operator in ``$INFLUENCE_FACTORIES``; nothing is imported.

    Returns:
        the module's file under ``data/user``, or None for a module the operator listed (imported from the environment).

    Raises:
        ReachError: naming the value and what is accepted.
    """
    module, _, function = str(spec).partition(":")
    listed = _listed(FACTORIES_ENV)
    if spec in listed or module in listed:
        return None
    found = factory_module_file(module, root) if function and IDENTIFIER.fullmatch(function) else None
    top = module.split(".")[0]
    if found is not None and top not in sys.stdlib_module_names and top not in sys.builtin_module_names:
        return found
    clash = " (its name is that of a module of Python's standard library: rename it)" if found is not None else ""
    raise ReachError(f"model.factory={spec!r}: a factory's module must be a file under {USER_DATA}/ of the project "
                     f"({USER_DATA}/{module.replace('.', '/')}.py){clash}, or be listed by the operator in "
                     f"${FACTORIES_ENV} (comma-separated module or module:function; listed: {listed or 'none'})")


def check_dask_address(address: str) -> str:
    """``address`` if it is empty, ``$DASK_SCHEDULER_ADDRESS`` or listed in ``$INFLUENCE_DASK_ADDRESSES``, else raise."""
    allowed = ([os.environ["DASK_SCHEDULER_ADDRESS"]] if os.environ.get("DASK_SCHEDULER_ADDRESS") else []) + _listed(DASK_ADDRESSES_ENV)
    if address and address not in allowed:
        raise ReachError(f"cluster.dask_address={address!r} is not a scheduler the operator allows: accepted are '' "
                         f"($DASK_SCHEDULER_ADDRESS, else a LocalCluster on this machine) or one of {allowed or 'none'} "
                         f"($DASK_SCHEDULER_ADDRESS and ${DASK_ADDRESSES_ENV}, set where the worker runs)")
    return address


def check_store(url: str) -> str:
    """``url`` if it is empty or listed in ``$INFLUENCE_STORES``, else raise."""
    allowed = _listed(STORES_ENV)
    if url and url not in allowed:
        raise ReachError(f"cluster.store={url!r} is not an object store the operator allows: accepted are '' (none) or "
                         f"one of {allowed or 'none'} (${STORES_ENV}, comma-separated, set where the worker runs)")
    return url


def check_reach(settings: Any, root: Path) -> Any:
    """Check every value of ``settings`` that names something outside them (see the module's docstring); the
    settings unchanged.

    Raises:
        ReachError: the first value that reaches outside what the operator allowed, named with its field.
    """
    d = settings.data
    if d.finetune_source == "file":
        check_user_file("data.finetune_file", d.finetune_file, root)
    if d.pretrain_source == "file":
        check_user_file("data.pretrain_file", d.pretrain_file, root)
    if settings.model.family == "custom":
        check_factory(settings.model.factory, root)
    check_dask_address(settings.cluster.dask_address)
    check_store(settings.cluster.store)
    check_tracking_uri(settings.tracking.tracking_uri, root)
    return settings
