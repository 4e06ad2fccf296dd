"""One run at a time in a workspace: an exclusive lock held for the whole run.

Every run of a project shares its workspace (``artifacts/``, the prepared data, DVC), so two runs
at once would overwrite each other's stage outputs and temporary files. The pipeline takes
``artifacts/.workspace.lock`` when it starts and keeps it until it ends; a second run waits for it
(``$INFLUENCE_WORKSPACE_WAIT_SECONDS``, default 600) and then refuses, naming the run that holds it.

The lock is an ``fcntl.flock`` on an open file: the kernel releases it when the holder's process
ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock. The holder
writes a token, its process id, its name and the time into the file. The GPU stages, which the
pipeline starts as another flow run in another process, receive that token and run under their
parent's lock (the file still holds it); started on their own, they take the lock themselves.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows import waits

LOCK_NAME = ".workspace.lock"


class WorkspaceBusyError(RuntimeError):
    """Another run holds the workspace."""


def lock_path(root: Path) -> Path:
    """``<root>/artifacts/.workspace.lock``."""
    return Path(root) / "artifacts" / LOCK_NAME


def holder(root: Path) -> dict:
    """What the lock file says about its last holder (``{}`` when there is none or it cannot be read)."""
    try:
        return json.loads(lock_path(root).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


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


@contextmanager
def hold_workspace(root: Path, name: str, wait: float | None = None, parent_token: str = "",
                   say=print) -> Iterator[str]:
    """Hold the workspace of ``root`` for the block; yields the token children pass as ``parent_token``.

    Args:
        root: the project folder.
        name: who holds it (the flow run's name), shown to a run that has to wait.
        wait: seconds to wait for a busy workspace before :class:`WorkspaceBusyError`; default
            ``$INFLUENCE_WORKSPACE_WAIT_SECONDS`` (:mod:`flows.waits`).
        parent_token: the token of the run that started this one (the GPU stages): when the lock is
            held under that token, the block runs under it without taking it again.
        say: where the one line "waiting for ..." goes.
    """
    if parent_token and is_held(root) and holder(root).get("token") == parent_token:
        yield parent_token
        return
    wait = waits.seconds(waits.WORKSPACE_ENV, waits.WORKSPACE_SECONDS) if wait is None else wait
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
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
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"token": token, "pid": os.getpid(), "host": socket.gethostname(), "name": name,
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        handle.flush()
        try:
            yield token
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
