"""One run at a time in a workspace: an exclusive lock held for the whole run.

Every run of a project shares its workspace (``artifacts/``, the prepared data, DVC), so two runs
at once would overwrite each other's stage outputs and temporary files. The pipeline takes
``artifacts/.workspace.lock`` when it starts and keeps it until it ends; a second run waits for it
(``$INFLUENCE_WORKSPACE_WAIT_SECONDS``, default 600) and then refuses, naming the run that holds it.

The lock is an ``fcntl.flock`` on an open file: the kernel releases it when the holder's process
ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock on a local file
system (on a network file system ``flock`` holds across hosts only on NFSv4 or NFSv3 with lockd: a mount with
``nolock`` or ``local_lock`` makes it host-local, and is refused: :func:`check_lock_filesystem`). The holder writes into the file (mode 600) its
process id, its name, its flow run's id, the time and the sha256 of a random token, never the token.

Who runs under a holder's lock without taking it again:

- code of the same process that holds it (the ``attribution`` flow run as a subflow of the pipeline): it
  finds the hold in a context variable;
- a caller that presents the token (:func:`hold_workspace`'s ``parent_token``; a library call, never a
  form field);
- the GPU stages started as a deployment: the pipeline admits that one child flow run by its id
  (:meth:`Hold.admit`) while it waits for it, and the child, which reads its parent's id from the Prefect
  API (never from its parameters), runs under the hold only while the lock is held by that parent
  and names it; :meth:`Hold.check` asks again before each stage and before a stage's outputs are saved,
  so a child whose parent was killed stops there. A retried old child, or a run started from the form,
  finds no admission and takes the lock itself (so waits for the pipeline, then refuses).
"""

from __future__ import annotations

import contextvars
import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flows.guards import waits

LOCK_NAME = ".workspace.lock"
ADMISSION_WAIT_SECONDS = 60.0  # a child started just before its parent recorded its id waits this long for it
_HELD: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("influence_workspace_holds", default={})


class WorkspaceBusyError(RuntimeError):
    """Another run holds the workspace."""


class ParentGoneError(RuntimeError):
    """The run whose hold a child ran under no longer holds the workspace: the child stops."""


def lock_path(root: Path) -> Path:
    """``<root>/artifacts/.workspace.lock``."""
    return Path(root) / "artifacts" / LOCK_NAME


def token_digest(token: str) -> str:
    """The sha256 of a hold's token: what the lock file records of it."""
    return hashlib.sha256(token.encode()).hexdigest()


def holder(root: Path) -> dict:
    """What the lock file says about its last holder (``{}`` when there is none or it cannot be read)."""
    try:
        found = json.loads(lock_path(root).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def _describe(found: dict) -> str:
    if not found:
        return "another run"
    return (f"{found.get('name', 'a run')} (process {found.get('pid')} on {found.get('host')}, "
            f"since {found.get('since')})")


def is_held(root: Path) -> bool:
    """Whether some process holds the workspace now."""
    path = lock_path(root)
    if not path.is_file():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@dataclass
class Hold:
    """A run's hold of a workspace (what :func:`hold_workspace` yields).

    Attributes:
        root: the project folder.
        token: the hold's secret (empty for a child that runs under its parent's hold by flow run id).
        record: what the lock file says (the holder's own record, or the parent's).
        parent_flow_run_id: for a child under its parent's hold: the parent's flow run id.
        flow_run_id: for such a child: its own flow run id.
    """

    root: Path
    token: str
    record: dict
    handle: IO[str] | None = field(default=None, repr=False)
    parent_flow_run_id: str = ""
    flow_run_id: str = ""

    def _write(self) -> None:
        if self.handle is None:
            raise RuntimeError("only the holder of a workspace writes its lock file")
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps(self.record))
        self.handle.flush()

    def admit(self, child_flow_run_id: str) -> None:
        """Let the flow run ``child_flow_run_id`` (the GPU stages this run started) run under this hold."""
        self.record["child"] = str(child_flow_run_id)
        self._write()

    def dismiss(self) -> None:
        """End the admission of :meth:`admit`."""
        self.record["child"] = ""
        self._write()

    def check(self, before: str = "") -> None:
        """For a child under its parent's hold: raise :class:`ParentGoneError` unless the parent still holds the
        workspace and admits this child (a no-op for a holder of its own).

        Args:
            before: what the child was about to do (named in the error).
        """
        if not self.parent_flow_run_id:
            return
        found = holder(self.root)
        if (not is_held(self.root) or found.get("flow_run_id") != self.parent_flow_run_id
                or found.get("child") != self.flow_run_id):
            raise ParentGoneError(
                f"the pipeline run {self.parent_flow_run_id} that started these GPU stages no longer holds the workspace "
                f"{self.root} (it ended, was cancelled or was killed){' ' + before if before else ''}: stopping; "
                f"the next pipeline run starts them again")


LOCAL_LOCK_ENV = "INFLUENCE_ALLOW_HOST_LOCAL_LOCK"


class UnsafeLockError(RuntimeError):
    """The workspace's file system makes ``flock`` hold on one host only, while other hosts may share the folder."""


def host_local_lock(path: Path, mounts: str | None = None) -> str:
    """Why ``flock`` on ``path`` would hold on this host only (its mount is NFS with ``nolock`` or ``local_lock=flock``
    or ``=all``), or ``""`` when it holds wherever the folder is mounted.

    Args:
        path: a file or folder.
        mounts: the text of ``/proc/mounts`` (default: read it; ``""`` where there is none).
    """
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target, best = str(Path(path).resolve()), None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and (best is None or len(point) > len(best[1])):
            best = fields[:4]
    if best is None or not best[2].startswith("nfs"):
        return ""
    options = best[3].split(",")
    local = [o for o in options if o == "nolock" or o in ("local_lock=flock", "local_lock=all")]
    return f"{best[1]} is an {best[2]} mount with {','.join(local)}" if local else ""


def check_lock_filesystem(root: Path, mounts: str | None = None) -> None:
    """Refuse a workspace whose lock would hold on this host only (:func:`host_local_lock`), unless the operator says
    that one host uses it (``$INFLUENCE_ALLOW_HOST_LOCAL_LOCK=1``).

    Raises:
        UnsafeLockError: naming the mount and what to do.
    """
    why = host_local_lock(Path(root), mounts)
    if why and os.environ.get(LOCAL_LOCK_ENV, "") != "1":
        raise UnsafeLockError(f"the workspace {root} lies where a lock holds on this host only ({why}): two hosts could "
                              f"run in it at once. Mount it with locking (NFSv4, or NFSv3 with lockd, without nolock or "
                              f"local_lock), or, when only this host uses the folder, set ${LOCAL_LOCK_ENV}=1")


def _admitted(root: Path, parent_flow_run_id: str, flow_run_id: str, wait: float) -> dict | None:
    """The parent's record when the lock is held by the flow run ``parent_flow_run_id`` and admits ``flow_run_id``
    (waiting up to ``wait`` seconds for the admission while that parent holds it), else None."""
    deadline = time.monotonic() + wait
    while True:
        found = holder(root)
        if not is_held(root) or found.get("flow_run_id") != parent_flow_run_id:
            return None
        if found.get("child") == flow_run_id:
            return found
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


@contextmanager
def hold_workspace(root: Path, name: str, wait: float | None = None, parent_token: str = "", say: Callable[[str], Any] = print,
                   flow_run_id: str = "", parent_flow_run_id: str = "") -> Iterator[Hold]:
    """Hold the workspace of ``root`` for the block; yields the :class:`Hold`.

    Args:
        root: the project folder.
        name: who holds it (the flow run's name), shown to a run that has to wait.
        wait: seconds to wait for a busy workspace before :class:`WorkspaceBusyError`; default
            ``$INFLUENCE_WORKSPACE_WAIT_SECONDS`` (:mod:`flows.guards.waits`).
        parent_token: the token of a hold of another process: when the lock is held under it, the block runs
            under that hold without taking it again.
        say: where the one line "waiting for ..." goes.
        flow_run_id: the id of this run's flow run (recorded; a child's own id, which its parent admits).
        parent_flow_run_id: for the GPU stages started as a deployment, the id of the flow run that started
            them (from the Prefect API): when that run holds the workspace and admits ``flow_run_id``, the block
            runs under its hold.
    """
    key = str(Path(root).resolve())
    current = holder(root)
    nested = _HELD.get().get(key)
    if nested and is_held(root) and current.get("token_sha256") == token_digest(nested):
        yield Hold(Path(root), nested, current)
        return
    if parent_token and is_held(root) and current.get("token_sha256") == token_digest(parent_token):
        yield Hold(Path(root), parent_token, current)
        return
    if parent_flow_run_id and flow_run_id:
        found = _admitted(root, parent_flow_run_id, flow_run_id, ADMISSION_WAIT_SECONDS)
        if found is not None:
            yield Hold(Path(root), "", found, parent_flow_run_id=parent_flow_run_id, flow_run_id=flow_run_id)
            return
    wait = waits.seconds(waits.WORKSPACE_ENV, waits.WORKSPACE_SECONDS) if wait is None else wait
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_lock_filesystem(path.parent)
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+")
    try:
        deadline, told = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                found = holder(root)
                if time.monotonic() >= deadline:
                    raise WorkspaceBusyError(
                        f"the workspace {root} is held by {_describe(found)}; waited {wait:.0f} s. Runs of one project "
                        f"share its workspace: start this one when that run ends (or set ${waits.WORKSPACE_ENV} to wait longer)"
                    ) from None
                if not told:
                    say(f"waiting up to {wait:.0f} s for the workspace, held by {_describe(found)}")
                    told = True
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        token = uuid.uuid4().hex
        record = {"token_sha256": token_digest(token), "flow_run_id": str(flow_run_id or ""), "child": "",
                  "pid": os.getpid(), "host": socket.gethostname(), "name": name,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        hold = Hold(Path(root), token, record, handle)
        hold._write()
        reset = _HELD.set({**_HELD.get(), key: token})
        try:
            yield hold
        finally:
            _HELD.reset(reset)
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


__all__ = ["Hold", "LOCK_NAME", "ParentGoneError", "UnsafeLockError", "WorkspaceBusyError", "check_lock_filesystem", "host_local_lock", "hold_workspace", "holder", "is_held", "lock_path",
           "token_digest"]
