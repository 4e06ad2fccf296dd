"""Stage outputs handed between machines through an object store, addressed by content.

With ``cluster.store`` set (``s3://bucket/prefix`` on any S3-compatible server: its endpoint from
``$AWS_ENDPOINT_URL``, its keys from ``$AWS_ACCESS_KEY_ID`` / ``$AWS_SECRET_ACCESS_KEY``; or
``file:///folder`` for a shared file system), every completed stage (but ``data``, whose versions DVC
keeps, and ``report``) is pushed as

- ``objects/<sha256[:2]>/<sha256>``: each of its files, once per content (a file already there is not sent again);
- ``stages/<stage>/<fingerprint>.json``: its ``result.json`` and ``{relative path: [size, mtime_ns, sha256]}``;

and a machine whose workspace lacks a stage with that fingerprint pulls it into its kept versions
(``artifacts/.stages/<stage>/<fp>/``, the local cache) and links it into place, checking every file's
sha256. The fingerprint names the inputs (settings, code, data, upstream fingerprints), never a folder,
so two machines with the same code, settings and data meet on the same names. The retrainings of the
evidence stages are records ``retrainings/<context>/<key>.json`` (:mod:`flows.retraining`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from influence.storage import atomic_write, file_digest, sha256_bytes

STORE_SCHEMES = ("s3", "file")


def check_url(url: str) -> str:
    """``url`` when it names a store (``s3://bucket[/prefix]`` or ``file:///absolute/folder``); a ValueError naming it otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "s3" and parts.netloc and not parts.query:
        return url
    if parts.scheme == "file" and parts.path.startswith("/") and parts.netloc in ("", "localhost"):
        return url
    raise ValueError(f"store={url!r}: an object store is s3://bucket/prefix (an S3-compatible server; its endpoint "
                     f"from $AWS_ENDPOINT_URL) or file:///absolute/folder; empty for none")


class _Folder:
    """A store on a file system (``file:///folder``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def put_file(self, key: str, path: Path) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        shutil.copyfile(path, partial)
        partial.rename(target)

    def put_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self.root / key, data)

    def get_file(self, key: str, path: Path) -> bool:
        if not (self.root / key).is_file():
            return False
        shutil.copyfile(self.root / key, path)
        return True

    def get_bytes(self, key: str) -> bytes | None:
        source = self.root / key
        return source.read_bytes() if source.is_file() else None


class _S3:
    """A store in an S3 bucket (boto3; endpoint and keys from the environment)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                                   config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, path: Path) -> bool:
        if not self.exists(key):
            return False
        self.client.download_file(self.bucket, self._key(key), str(path))
        return True

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise


@dataclass
class ObjectStore:
    """Content-addressed files and stage manifests in a store (see the module docstring).

    Attributes:
        url: ``s3://bucket/prefix`` or ``file:///folder``.
    """

    url: str

    def __post_init__(self) -> None:
        parts = urlsplit(check_url(self.url))
        self._backend: Any = _S3(parts.netloc, parts.path) if parts.scheme == "s3" else _Folder(Path(parts.path))

    @staticmethod
    def object_key(sha256: str) -> str:
        return f"objects/{sha256[:2]}/{sha256}"

    @staticmethod
    def stage_key(stage: str, fingerprint: str) -> str:
        return f"stages/{stage}/{fingerprint}.json"

    def put_object(self, path: Path, sha256: str | None = None) -> str:
        """Send the file ``path`` unless its content is there already; its sha256."""
        sha256 = sha256 or file_digest(path)
        if not self._backend.exists(self.object_key(sha256)):
            self._backend.put_file(self.object_key(sha256), path)
        return sha256

    def get_object(self, sha256: str, path: Path) -> None:
        """Write the object ``sha256`` to ``path`` (atomically), checking its content.

        Raises:
            FileNotFoundError: the store has no such object.
            ValueError: what came back has another sha256.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        if not self._backend.get_file(self.object_key(sha256), partial):
            raise FileNotFoundError(f"{self.url}: no object {sha256}")
        got = file_digest(partial)
        if got != sha256:
            partial.unlink()
            raise ValueError(f"{self.url}: object {sha256} came back with sha256 {got}")
        partial.rename(path)

    def put_object_bytes(self, data: bytes) -> str:
        """Send ``data`` as an object unless its content is there already; its sha256."""
        sha256 = sha256_bytes(data)
        if not self._backend.exists(self.object_key(sha256)):
            self._backend.put_bytes(self.object_key(sha256), data)
        return sha256

    def get_object_bytes(self, sha256: str) -> bytes:
        """The bytes of the object ``sha256``, their content checked.

        Raises:
            FileNotFoundError: the store has no such object.
            ValueError: what came back has another sha256.
        """
        data = self._backend.get_bytes(self.object_key(sha256))
        if data is None:
            raise FileNotFoundError(f"{self.url}: no object {sha256}")
        if sha256_bytes(data) != sha256:
            raise ValueError(f"{self.url}: object {sha256} came back with sha256 {sha256_bytes(data)}")
        return data

    def put_json(self, key: str, value: Any) -> None:
        self._backend.put_bytes(key, json.dumps(value, sort_keys=True).encode())

    def get_json(self, key: str) -> Any | None:
        data = self._backend.get_bytes(key)
        return None if data is None else json.loads(data)

    def has_stage(self, stage: str, fingerprint: str) -> bool:
        return bool(fingerprint) and self._backend.exists(self.stage_key(stage, fingerprint))

    def push_stage(self, stage: str, fingerprint: str, folder: Path, files: dict[str, list]) -> int:
        """Send the completed stage in ``folder`` (its manifest ``files``: ``{path: [size, mtime_ns, sha256]}``) and
        its ``result.json``, the manifest last (a reader never sees a stage whose objects are not all there).
        Returns how many files it holds."""
        for name, (_, _, sha256) in files.items():
            self.put_object(folder / name, sha256)
        self.put_json(self.stage_key(stage, fingerprint),
                      {"result": json.loads((folder / "result.json").read_text()), "files": files})
        return len(files)

    def pull_stage(self, stage: str, fingerprint: str, folder: Path) -> bool:
        """Write the stage of ``fingerprint`` into the empty or missing ``folder`` (files with their recorded
        modification times, and ``result.json``); False when the store has no such stage."""
        entry = self.get_json(self.stage_key(stage, fingerprint)) if fingerprint else None
        if entry is None:
            return False
        for name, (_, mtime_ns, sha256) in entry["files"].items():
            self.get_object(sha256, folder / name)
            os.utime(folder / name, ns=(mtime_ns, mtime_ns))
        atomic_write(folder / "result.json", json.dumps(entry["result"], indent=2, sort_keys=True))
        return True


def store_of(settings: Any) -> ObjectStore | None:
    """The object store of ``settings.cluster.store``, or None when it is empty."""
    url = settings.cluster.store
    return ObjectStore(url) if url else None


__all__ = ["ObjectStore", "check_url", "store_of"]
