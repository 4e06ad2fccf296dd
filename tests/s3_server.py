"""An S3-compatible server on loopback for the tests: moto's server mode (``moto_server``).

Why moto: it installs from PyPI (pinned in requirements.lock, the dev extra), is pure Python, and speaks the
S3 API that boto3, DVC (s3fs) and MLflow use; MinIO, what the deployment files run, is a Go binary that no
package registry here carries. Its objects live in the server's memory, gone when it stops.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.hosts import wait_for_port

KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def s3_server(buckets: tuple[str, ...] = ("stages",), host: str = "127.0.0.1") -> Iterator[dict[str, str]]:
    """A moto S3 server on ``host`` with ``buckets``; yields the environment a client needs (endpoint and keys)."""
    import boto3

    port = free_port(host)
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {**KEYS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    try:
        wait_for_port(host, port, server, "moto_server", timeout=60)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"], region_name=KEYS["AWS_DEFAULT_REGION"])
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield env
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
