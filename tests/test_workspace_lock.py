"""One run at a time per workspace: a second run waits or refuses, a killed holder frees the workspace at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.guards import waits
from flows.guards.workspace_lock import ParentGoneError, WorkspaceBusyError, hold_workspace, holder, is_held, lock_path, token_digest

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from pathlib import Path
from flows.guards.workspace_lock import hold_workspace
with hold_workspace(Path(sys.argv[1]), "holder-run", wait=0):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(root: Path, seconds: float) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(seconds)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO)
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_holder_is_refused_naming_the_first_and_a_killed_holder_frees_it(tmp_path):
    process = _hold(tmp_path, 60)
    try:
        assert is_held(tmp_path) and holder(tmp_path)["pid"] == process.pid
        began = time.monotonic()
        with pytest.raises(WorkspaceBusyError, match=rf"held by holder-run \(process {process.pid} .*waited 1 s"):
            with hold_workspace(tmp_path, "second", wait=1.0):
                pytest.fail("entered a held workspace")
        assert 0.9 < time.monotonic() - began < 10
    finally:
        os.kill(process.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops the lock with the process
        process.wait()
    assert not is_held(tmp_path)
    with hold_workspace(tmp_path, "third", wait=0) as hold:
        assert holder(tmp_path)["token_sha256"] == token_digest(hold.token) and holder(tmp_path)["name"] == "third"
        assert hold.token not in lock_path(tmp_path).read_text()  # a bearer secret: only its hash is on disk
        assert lock_path(tmp_path).stat().st_mode & 0o077 == 0
    assert holder(tmp_path) == {} and not is_held(tmp_path)


def test_a_run_waits_for_the_holder_then_proceeds(tmp_path):
    process = _hold(tmp_path, 2)
    said = []
    began = time.monotonic()
    with hold_workspace(tmp_path, "waiter", wait=60, say=said.append):
        waited = time.monotonic() - began
        assert holder(tmp_path)["name"] == "waiter"
    process.wait()
    assert 0.5 < waited < 30
    assert len(said) == 1 and "held by holder-run" in said[0]


def test_children_run_under_their_parents_token_only(tmp_path):
    with hold_workspace(tmp_path, "parent", wait=0) as hold:
        token = hold.token
        with hold_workspace(tmp_path, "same process", wait=0) as nested:  # code of the holding process (a subflow)
            assert nested.token == token
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from flows.guards.workspace_lock import hold_workspace\n"
             "with hold_workspace(Path(sys.argv[1]), 'child', wait=0, parent_token=sys.argv[2]): print('ran')",
             str(tmp_path), token], capture_output=True, text=True, cwd=REPO)
        assert child.returncode == 0 and child.stdout.strip() == "ran", child.stderr
        stranger = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from flows.guards.workspace_lock import hold_workspace\n"
             "with hold_workspace(Path(sys.argv[1]), 'stranger', wait=0, parent_token='not-the-token'): print('ran')",
             str(tmp_path), token], capture_output=True, text=True, cwd=REPO)
        assert stranger.returncode != 0 and "WorkspaceBusyError" in stranger.stderr and "held by parent" in stranger.stderr
        assert holder(tmp_path)["name"] == "parent"  # the child did not take it over
    assert json.loads(lock_path(tmp_path).read_text() or "{}") == {}


CHILD = """
import sys, time
from pathlib import Path
from flows.guards import workspace_lock
workspace_lock.ADMISSION_WAIT_SECONDS = 2.0
from flows.guards.workspace_lock import hold_workspace
with hold_workspace(Path(sys.argv[1]), "child", wait=0, flow_run_id=sys.argv[2], parent_flow_run_id=sys.argv[3]) as hold:
    print("ran under", "parent" if hold.parent_flow_run_id else "its own hold", flush=True)
    for _ in range(200):
        hold.check("before the next stage")
        time.sleep(0.05)
"""


PARENT = """
import sys, time
from pathlib import Path
from flows.guards.workspace_lock import hold_workspace
with hold_workspace(Path(sys.argv[1]), "parent-run", wait=0, flow_run_id=sys.argv[2]) as hold:
    hold.admit(sys.argv[3])
    print("held", flush=True)
    time.sleep(60)
"""


def _child(root: Path, own: str, parent: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-c", CHILD, str(root), own, parent]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_a_child_runs_under_its_parent_only_while_admitted_and_stops_when_the_parent_is_gone(tmp_path):
    """The GPU stages started as a deployment: admitted by id while the parent waits for them; a child not admitted
    (a retried old child, a run from the form) takes the lock itself and so is refused; a child whose parent was killed
    stops at its next check."""
    parent_id, child_id, other_id = "p" * 8, "c" * 8, "o" * 8
    with hold_workspace(tmp_path, "parent", wait=0, flow_run_id=parent_id) as hold:
        assert holder(tmp_path)["flow_run_id"] == parent_id
        stranger = _child(tmp_path, other_id, parent_id)  # never admitted
        assert stranger.returncode != 0 and "WorkspaceBusyError" in stranger.stderr, stranger.stderr
        hold.admit(child_id)
        admitted = _child(tmp_path, child_id, parent_id)
        assert admitted.returncode == 0 and admitted.stdout.startswith("ran under parent"), admitted.stderr
        forged = _child(tmp_path, child_id, other_id)  # claims another parent: not the holder
        assert forged.returncode != 0 and "WorkspaceBusyError" in forged.stderr
        hold.dismiss()
        late = _child(tmp_path, child_id, parent_id)  # its parent no longer waits for it (a retry of an old child)
        assert late.returncode != 0 and "WorkspaceBusyError" in late.stderr
    # the parent is killed while its child runs: the child stops at its next check
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), parent_id, child_id], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    assert parent.stdout.readline().strip() == "held"
    child = _child(tmp_path, child_id, parent_id, wait=False)
    try:
        assert child.stdout.readline().startswith("ran under parent")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        _, err = child.communicate(timeout=60)
        assert child.returncode != 0 and "ParentGoneError" in err and "before the next stage" in err
    finally:
        for process in (parent, child):
            if process.poll() is None:
                process.kill()
    assert issubclass(ParentGoneError, RuntimeError)


def test_wait_limits_are_named_when_bad(monkeypatch):
    monkeypatch.setenv(waits.WORKSPACE_ENV, "soon")
    with pytest.raises(ValueError, match="INFLUENCE_WORKSPACE_WAIT_SECONDS='soon'"):
        waits.seconds(waits.WORKSPACE_ENV, waits.WORKSPACE_SECONDS)
    monkeypatch.setenv(waits.WORKSPACE_ENV, "-1")
    with pytest.raises(ValueError, match="at least 0"):
        waits.seconds(waits.WORKSPACE_ENV, waits.WORKSPACE_SECONDS)
    monkeypatch.setenv(waits.WORKSPACE_ENV, "inf")
    with pytest.raises(ValueError, match="finite"):
        waits.seconds(waits.WORKSPACE_ENV, waits.WORKSPACE_SECONDS)
    monkeypatch.setenv(waits.WORKSPACE_ENV, "5")
    assert waits.seconds(waits.WORKSPACE_ENV, waits.WORKSPACE_SECONDS) == 5.0
    monkeypatch.delenv(waits.WORKSPACE_ENV)
    assert waits.seconds(waits.WORKSPACE_ENV, waits.WORKSPACE_SECONDS) == 600.0


@pytest.mark.slow
def test_a_pipeline_run_refuses_a_workspace_another_run_holds(project: Path):
    """Two real pipeline runs (``flows.cli run``, each its own process) in one project: the second, started while
    the first runs, refuses at once (wait 0), naming the first, and leaves no MLflow run; the first completes.
    (Waiting for a real holder process is tested above.)"""
    params = str(project / "params.yaml")
    quick = ["--set", "evaluation.enabled=false", "--set", "evaluation.mislabel_fraction=0.0"]
    env = {**os.environ, "PYTHONPATH": str(project)}
    command = [sys.executable, "-m", "flows.cli", "run", "--params", params, *quick]
    first = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    began = time.monotonic()
    while not is_held(project):
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() - began < 300, "the first run never took the workspace"
        time.sleep(0.2)
    holder_pid = holder(project)["pid"]
    refused = subprocess.run(command, cwd=project, env={**env, waits.WORKSPACE_ENV: "0"}, capture_output=True, text=True,
                             timeout=600)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "WorkspaceBusyError" in said
    assert f"(process {holder_pid} " in said  # it met the first run's hold, whatever the machine's speed
    out_first, _ = first.communicate(timeout=1200)
    assert first.returncode == 0, out_first[-3000:]
    finished = re.compile(r"^MLflow run \w+; report ", re.MULTILINE)
    assert len(finished.findall(out_first)) == 1 and not finished.findall(said)
    assert not is_held(project)


def test_lock_on_a_host_local_nfs_mount_is_refused(tmp_path, monkeypatch):
    """flock on NFS holds across hosts only with real locking: a workspace on a ``nolock`` or ``local_lock`` mount is
    refused (unless the operator says one host uses it); local file systems and locking NFS mounts are fine."""
    from flows.guards.workspace_lock import LOCAL_LOCK_ENV, UnsafeLockError, check_lock_filesystem, host_local_lock

    mounts = "\n".join([
        "/dev/sda1 / ext4 rw,relatime 0 0",
        "server:/export /mnt/shared nfs rw,vers=3,nolock,proto=tcp 0 0",
        "server:/export2 /mnt/four nfs4 rw,vers=4.2,local_lock=none 0 0",
        "server:/export3 /mnt/flock nfs4 rw,vers=4.2,local_lock=flock 0 0",
        "tmpfs /mnt/shared/tmp tmpfs rw 0 0",
    ])
    assert host_local_lock(Path("/mnt/shared/project"), mounts) == "/mnt/shared is an nfs mount with nolock"
    assert host_local_lock(Path("/mnt/flock/p"), mounts) == "/mnt/flock is an nfs4 mount with local_lock=flock"
    assert host_local_lock(Path("/mnt/four/p"), mounts) == "" and host_local_lock(Path("/home/u/p"), mounts) == ""
    assert host_local_lock(Path("/mnt/shared/tmp/p"), mounts) == ""  # the longest mount point decides
    monkeypatch.delenv(LOCAL_LOCK_ENV, raising=False)
    with pytest.raises(UnsafeLockError, match=r"nolock.*INFLUENCE_ALLOW_HOST_LOCAL_LOCK=1"):
        check_lock_filesystem(Path("/mnt/shared/project"), mounts)
    monkeypatch.setenv(LOCAL_LOCK_ENV, "1")
    check_lock_filesystem(Path("/mnt/shared/project"), mounts)
    check_lock_filesystem(tmp_path)  # this machine's own mounts, as a real run checks them
