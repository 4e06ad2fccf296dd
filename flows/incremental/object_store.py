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
evidence stages are records ``retrainings/<context>/<key>.json`` (:mod:`flows.experiment.retraining`).

Nothing read from the store is trusted for a name: whoever can write to the bucket could otherwise write
or delete files on every machine that pulls. So

- every JSON document (stage manifests, retraining records, hand-overs) is signed with an HMAC-SHA256 over
  its key and its canonical JSON, with the operator's key ``$INFLUENCE_STORE_KEY`` (or the file
  ``$INFLUENCE_STORE_KEY_FILE``), which the platform's processes hold and the store does not; a document
  whose signature is missing or wrong is refused (:class:`StoreIntegrityError`);
- a stage name is a lower-case identifier and a fingerprint 64 hex digits (:func:`check_stage_key`);
- a manifest's file name is a relative path without ``..`` that resolves inside the target folder
  (:func:`member_path`), checked for every entry before the first file is written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flows.definition.settings import check_url
from influence.storage import atomic_write, file_digest, fsync_folder, sha256_bytes

KEY_ENV, KEY_FILE_ENV = "INFLUENCE_STORE_KEY", "INFLUENCE_STORE_KEY_FILE"
MIN_KEY_CHARS = 32
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
STAGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
RECORD_NAME = re.compile(r"[0-9a-f]{16}")  # retraining contexts and keys (flows.experiment.retraining)


class StoreIntegrityError(ValueError):
    """Something read from the object store is not what the platform wrote: a bad signature, name or digest."""


def store_key() -> bytes:
    """The operator's signing key of the store's documents: ``$INFLUENCE_STORE_KEY``, else the content of the
    file ``$INFLUENCE_STORE_KEY_FILE``.

    Raises:
        StoreIntegrityError: neither is set, or the key is shorter than :data:`MIN_KEY_CHARS` characters.
    """
    key = os.environ.get(KEY_ENV, "")
    if not key and os.environ.get(KEY_FILE_ENV):
        try:
            key = Path(os.environ[KEY_FILE_ENV]).read_text().strip()
        except OSError as error:
            raise StoreIntegrityError(f"${KEY_FILE_ENV}={os.environ[KEY_FILE_ENV]!r} cannot be read: {error}") from None
    if len(key) < MIN_KEY_CHARS:
        raise StoreIntegrityError(
            f"cluster.store is set but ${KEY_ENV} (or the file ${KEY_FILE_ENV}) holds "
            f"{'no key' if not key else f'a key of {len(key)} characters'}: every machine that uses the store needs the "
            f"same secret of at least {MIN_KEY_CHARS} characters (e.g. `python -c 'import secrets; "
            f"print(secrets.token_hex(32))'`), so that what it reads back is known to come from the platform")
    return key.encode()


def check_stage_key(stage: str, fingerprint: str) -> None:
    """Refuse a stage name or fingerprint that could name something else than one stage's entry.

    Raises:
        StoreIntegrityError: ``stage`` is not a lower-case identifier, or ``fingerprint`` not 64 hex digits.
    """
    if not isinstance(stage, str) or not STAGE_NAME.fullmatch(stage):
        raise StoreIntegrityError(f"stage {stage!r} is not a stage name (lower-case letters, digits and '_')")
    if not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint):
        raise StoreIntegrityError(f"fingerprint {fingerprint!r} of stage {stage!r} is not 64 hex digits")


def member_path(folder: Path, name: str) -> Path:
    """``folder / name`` for a file name read from a manifest, refused unless it stays inside ``folder``.

    Raises:
        StoreIntegrityError: ``name`` is empty, absolute, holds ``..``, a backslash or a NUL, or resolves outside.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name
            or "\0" in name):
        raise StoreIntegrityError(f"file name {name!r} of a manifest is not a relative path inside its stage folder")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise StoreIntegrityError(f"file name {name!r} of a manifest resolves outside {folder}")
    return path


def _signature(key: bytes, name: str, body: bytes) -> str:
    return hmac.new(key, name.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _copy_durably(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary file beside it, fsynced, renamed, the folder fsynced; a
    failure (ENOSPC, a kill by an exception) leaves no partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with open(source, "rb") as reader, open(partial, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)


class _Folder:
    """A store on a file system (``file:///folder``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def put_file(self, key: str, path: Path) -> None:
        _copy_durably(path, self.root / key)

    def put_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self.root / key, data)

    def get_file(self, key: str, path: Path) -> bool:
        if not (self.root / key).is_file():
            return False
        _copy_durably(self.root / key, path)
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
        self._key = store_key()
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
        if not FINGERPRINT.fullmatch(sha256):
            raise StoreIntegrityError(f"{self.url}: object name {sha256!r} is not a sha256")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            if not self._backend.get_file(self.object_key(sha256), partial):
                raise FileNotFoundError(f"{self.url}: no object {sha256}")
            got = file_digest(partial)
            if got != sha256:
                raise StoreIntegrityError(f"{self.url}: object {sha256} came back with sha256 {got}")
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

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
        """Write ``value`` under ``key``, signed (see the module docstring)."""
        body = _canonical(value)
        self._backend.put_bytes(key, _canonical({"value": value, "hmac": _signature(self._key, key, body)}))

    def get_json(self, key: str) -> Any | None:
        """The value under ``key`` (None when there is none), its signature checked.

        Raises:
            StoreIntegrityError: the document is not JSON, is unsigned, or its signature is not the platform's.
        """
        data = self._backend.get_bytes(key)
        if data is None:
            return None
        try:
            envelope = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreIntegrityError(f"{self.url}: {key} is not JSON") from None
        if not isinstance(envelope, dict) or set(envelope) != {"value", "hmac"} or not isinstance(envelope["hmac"], str):
            raise StoreIntegrityError(f"{self.url}: {key} is not a signed document of the platform")
        expected = _signature(self._key, key, _canonical(envelope["value"]))
        if not hmac.compare_digest(expected, envelope["hmac"]):
            raise StoreIntegrityError(f"{self.url}: {key} has a wrong signature: it was not written by a machine holding "
                                      f"this platform's ${KEY_ENV} (or was changed since)")
        return envelope["value"]

    def has_stage(self, stage: str, fingerprint: str) -> bool:
        if not fingerprint:
            return False
        check_stage_key(stage, fingerprint)
        return self._backend.exists(self.stage_key(stage, fingerprint))

    def push_stage(self, stage: str, fingerprint: str, folder: Path, files: dict[str, list]) -> int:
        """Send the completed stage in ``folder`` (its manifest ``files``: ``{path: [size, mtime_ns, sha256]}``) and
        its ``result.json``, the manifest last (a reader never sees a stage whose objects are not all there).
        Returns how many files it holds."""
        check_stage_key(stage, fingerprint)
        for name, (_, _, sha256) in files.items():
            self.put_object(folder / name, sha256)
        self.put_json(self.stage_key(stage, fingerprint),
                      {"result": json.loads((folder / "result.json").read_text()), "files": files})
        return len(files)

    def pull_stage(self, stage: str, fingerprint: str, folder: Path) -> bool:
        """Write the stage of ``fingerprint`` into the empty or missing ``folder`` (files with their recorded
        modification times, and ``result.json``); False when the store has no such stage.

        Raises:
            StoreIntegrityError: a bad stage name or fingerprint, a manifest that is unsigned or signed by another
                key, or a file name that is not a relative path inside ``folder`` (checked before anything is written).
        """
        if not fingerprint:
            return False
        check_stage_key(stage, fingerprint)
        entry = self.get_json(self.stage_key(stage, fingerprint))
        if entry is None:
            return False
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict) or not isinstance(entry.get("result"), dict):
            raise StoreIntegrityError(f"{self.url}: the manifest of {stage}/{fingerprint[:12]} is malformed")
        targets = {}
        for name, record in files.items():
            if (not isinstance(record, list) or len(record) != 3 or not isinstance(record[1], int)
                    or not isinstance(record[2], str) or not FINGERPRINT.fullmatch(record[2])):
                raise StoreIntegrityError(f"{self.url}: the manifest of {stage}/{fingerprint[:12]} has a malformed entry "
                                          f"for {name!r}")
            targets[name] = member_path(folder, name)
        if "result.json" in targets:
            raise StoreIntegrityError(f"{self.url}: the manifest of {stage}/{fingerprint[:12]} lists result.json as a file")
        for name, (_, mtime_ns, sha256) in files.items():
            self.get_object(sha256, targets[name])
            os.utime(targets[name], ns=(mtime_ns, mtime_ns))
        atomic_write(folder / "metrics.json", json.dumps(entry["result"].get("metrics", {}), indent=1, sort_keys=True))
        atomic_write(folder / "result.json", json.dumps(entry["result"], indent=2, sort_keys=True))
        return True


def store_of(settings: Any) -> ObjectStore | None:
    """The object store of ``settings.cluster.store``, or None when it is empty."""
    url = settings.cluster.store
    return ObjectStore(url) if url else None


__all__ = ["ObjectStore", "StoreIntegrityError", "check_stage_key", "check_url", "member_path", "store_key", "store_of"]
