"""Separate hosts on this machine for the multi-host test: Linux network namespaces joined by a bridge.

Each host is a network namespace with its own loopback and one address on a private bridge
(``10.213.<n>.<i>/24``; the machine itself is ``.254`` on it, so the test can watch); a host reaches
another only through that bridge, and nothing on the bridge reaches beyond the machine. A host's
processes get their own working folder (no folder is shared between hosts: what one host hands another
goes through the services): with ``folders``, each host's processes run in a mount namespace of their own
where the other hosts' folders are hidden under an empty tmpfs. Needs root (``ip netns``, ``unshare``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def wait_for_port(host: str, port: int, process: subprocess.Popen, what: str, log: Path | None = None,
                  timeout: float = 180) -> None:
    """Return once ``host:port`` accepts a connection; raise naming ``what`` (and the end of ``log``) if ``process``
    exits or ``timeout`` passes first."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
                raise AssertionError(f"{what} did not listen on {host}:{port}\n{tail}") from None
            time.sleep(0.2)


def can_make_hosts() -> bool:
    """Whether this process may create network namespaces (root, with ``ip``)."""
    return os.geteuid() == 0 and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Hosts:
    """Hosts named ``names`` (addresses ``10.213.<net>.1``, ``.2``, ... in that order) and their processes."""

    names: tuple[str, ...]
    folders: dict[str, Path] = field(default_factory=dict)  # each host's own folder, all in one parent: the others hidden
    net: int = field(default_factory=lambda: 20 + os.getpid() % 200)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bridge = f"infbr{self.net}"
        self.address = {name: f"10.213.{self.net}.{i}" for i, name in enumerate(self.names, 1)}
        self.namespace = {name: f"inf{self.net}{name}" for name in self.names}
        try:
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            _ip("addr", "add", f"10.213.{self.net}.254/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names, 1):
                ns, outer, inner = self.namespace[name], f"vi{self.net}h{i}", f"vi{self.net}n{i}"
                _ip("netns", "add", ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("link", "set", inner, "netns", ns)
                _ip("netns", "exec", ns, "ip", "addr", "add", f"{self.address[name]}/24", "dev", inner)
                _ip("netns", "exec", ns, "ip", "link", "set", inner, "up")
                _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    def _command(self, host: str, argv: list[str], user: str | None) -> list[str]:
        """``argv`` on ``host``: in its network namespace and, with ``folders``, in a mount namespace where the
        folder of every host but its own is hidden (an empty tmpfs over their parent, its own bound back)."""
        command = (["runuser", "-u", user, "--"] if user else []) + argv
        if self.folders:
            parent, own = Path(self.folders[host]).parent, Path(self.folders[host])
            stash = Path(f"/tmp/.host-{self.namespace[host]}")
            stash.mkdir(exist_ok=True)
            script = ('mount --bind "$1" "$2" && mount -t tmpfs -o mode=0755 hosts "$3" && mkdir -p "$1" '
                      '&& mount --move "$2" "$1" && shift 3 && cd "$1" 2>/dev/null; exec "$@"')
            command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                       str(own), str(stash), str(parent), *command]
        return ["ip", "netns", "exec", self.namespace[host], *command]

    def start(self, host: str, argv: list[str], cwd: Path, env: dict[str, str], log: Path,
              user: str | None = None) -> subprocess.Popen:
        """Start ``argv`` on ``host`` in its own session (as ``user`` when given), output to ``log``."""
        with open(log, "ab") as out:
            process = subprocess.Popen(self._command(host, argv, user), cwd=cwd, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process

    def run(self, host: str, argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300,
            user: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self._command(host, argv, user), cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)

    @staticmethod
    def kill(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal ``process``'s whole session (the process and what it started)."""
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after 20 s) and remove the namespaces and the bridge."""
        for process in reversed(self.processes):
            self.kill(process, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(process)
                process.wait(timeout=10)
        for ns in getattr(self, "namespace", {}).values():
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:  # anything left inside (a daemon's own children)
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            Path(f"/tmp/.host-{ns}").rmdir() if Path(f"/tmp/.host-{ns}").is_dir() else None
        subprocess.run(["ip", "link", "del", getattr(self, "bridge", "none")], capture_output=True)
