"""SIGTERM (and SIGINT) for a run from the command line: one line, then gone within seconds.

``timeout``, systemd and Kubernetes send SIGTERM first. Python runs a signal handler only when the
main thread next executes Python code, which a long torch call can postpone for minutes, and the
flow engine turns the signal into an exception while the retraining threads and the temporary
Prefect server go on. So the run takes the signal itself:

- the C-level handler writes the signal number to a pipe (``signal.set_wakeup_fd``), and a watcher
  thread blocked on that pipe wakes at once, whatever the main thread is doing;
- the watcher prints one line, gives the main thread ``grace`` seconds to unwind by itself (the
  Python handler raises :class:`RunStopped`; the flow engine may raise its own termination signal
  instead), then ends the process's children (the temporary Prefect server) and the process, with
  exit status 128 + the signal number.

Stopping anywhere is safe because a killed run is (and its kill tests check it): every file is
written atomically, a stage's result is written last, the workspace lock is released by the kernel,
and the next run resumes from what is on disk. A second signal ends the process at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

GRACE_SECONDS = 5.0
_state: dict = {}


class RunStopped(BaseException):
    """The run received SIGTERM or SIGINT (a BaseException, as KeyboardInterrupt: not caught by ``except Exception``)."""


def requested() -> int:
    """The signal that asked the run to stop, or 0."""
    return int(_state.get("signal", 0))


def message(signum: int) -> str:
    """The one line a stopped run prints."""
    return (f"stopping: received {signal.Signals(signum).name}; finished stages are kept and the next run resumes "
            "from them (the stage that was running starts again from its last checkpoint)")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, and theirs (Linux ``/proc``)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def end_now(signum: int) -> None:
    """End this process's children (SIGTERM, then SIGKILL after two seconds), then the process itself."""
    children = _children(os.getpid())
    for child in children:
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{c}") and _alive(c) for c in children):
        time.sleep(0.05)
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _raise(signum: int, frame) -> None:
    if _state.get("raised"):
        return
    _state["raised"] = True
    raise RunStopped(message(signum))


def _watch(read_fd: int, grace: float, say: Callable[[str], None]) -> None:
    while True:
        data = os.read(read_fd, 1)
        if not data:
            return
        signum = data[0]
        if signum not in (signal.SIGTERM, signal.SIGINT):
            continue
        if requested():  # a second signal: at once
            end_now(signum)
        _state["signal"] = signum
        logging.getLogger("prefect").setLevel(logging.CRITICAL)  # no "crash detected" lines for a requested stop
        say(message(signum))
        time.sleep(grace)  # the main thread ends the process itself if it unwinds in time
        end_now(signum)


def install(grace: float = GRACE_SECONDS, say: Callable[[str], None] | None = None) -> None:
    """Take SIGTERM and SIGINT for this process (call once, from the main thread, before the run starts)."""
    if _state.get("installed"):
        return
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise)
    threading.Thread(target=_watch, args=(read_fd, grace, say), name="stop-watcher", daemon=True).start()
    _state["installed"] = True


def finish_if_stopped() -> None:
    """Called by the command line when the run ended (normally or by an exception): when a signal asked it
    to stop, end the process now with 128 + the signal number (no tracebacks of threads still running)."""
    if requested():
        end_now(requested())
