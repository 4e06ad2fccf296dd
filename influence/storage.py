"""Files on disk that survive a crash: one atomic writer and one resumable, checksummed run folder.

:func:`atomic_write` writes to a temporary file beside the target, flushes it to disk (``fsync``),
then renames it into place, so a killed process leaves either the old file or the new one, never
a torn one; a temporary left by a kill is named ``.<name>.tmp-<pid>`` and is never read.

:class:`RunFolder` is the folder of one long computation that is built piece by piece (a gradient
cache's shards, a training run's checkpoints): ``manifest.json`` records the arguments that made
it and every file's sha256, and is rewritten (atomically) after each file. Opening the folder again
with the same arguments resumes it (the files listed are kept, leftovers of a kill are deleted);
with other arguments it is refused with :class:`~influence.exceptions.CacheMismatchError` naming
each differing field, unless ``overwrite``. Reading a file checks its sha256
(:class:`~influence.exceptions.CorruptedArtifactError` names the file otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from influence.exceptions import CacheMismatchError, CorruptedArtifactError

MANIFEST_NAME = "manifest.json"
TEMPORARY_PATTERN = ".*.tmp-*"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest (``sha256``, ``md5``, ...) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file, ``fsync`` and rename (parents created).

    Args:
        path: the file to write.
        data: bytes, or text (written as UTF-8).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:  # a full disk (ENOSPC), say: no partial file, and the error names the file
        tmp.unlink(missing_ok=True)
        if error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    except BaseException:  # interrupted (KeyboardInterrupt included): leave no partial file
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)  # make the rename itself durable
    return path


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries to disk (after a rename into it or out of it); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON (sorted keys) with :func:`atomic_write`."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True))


def read_json(path: str | os.PathLike[str]) -> Any:
    """The parsed JSON file at ``path``.

    Raises:
        CorruptedArtifactError: the file is missing or is not JSON.
    """
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CorruptedArtifactError(f"{path} is not a readable JSON file: {error}") from error


def differences(recorded: Any, given: Any, prefix: str = "") -> list[str]:
    """``["field (recorded X, given Y)", ...]`` for every nested field where two values differ."""
    if isinstance(recorded, dict) and isinstance(given, dict):
        out = []
        for key in sorted(set(recorded) | set(given)):
            out += differences(recorded.get(key), given.get(key), f"{prefix}{key}.")
        return out
    if recorded != given:
        return [f"{prefix.rstrip('.')} (recorded {recorded!r}, given {given!r})"]
    return []


class RunFolder:
    """The folder of one resumable computation: its files and a manifest with their checksums.

    Args:
        directory: the folder (created by :meth:`open`).
        kind: what it holds, for messages (``"gradient cache"``, ``"training run"``).
        format_version: the layout version written to and required of the manifest.

    Attributes:
        manifest: the manifest after :meth:`open` (``fields``, ``"files"``, ``"complete"``).
    """

    def __init__(self, directory: str | os.PathLike[str], *, kind: str, format_version: int) -> None:
        self.directory = Path(directory)
        self.kind = kind
        self.format_version = format_version
        self.manifest: dict[str, Any] = {}

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    def read_manifest(self) -> dict[str, Any]:
        """The manifest on disk.

        Raises:
            CorruptedArtifactError: it is missing, not JSON, or of another format version.
        """
        if not self.manifest_path.is_file():
            raise CorruptedArtifactError(f"no {self.kind} at {self.directory}: {MANIFEST_NAME} is missing")
        document = read_json(self.manifest_path)
        if not isinstance(document, dict) or document.get("format") != self.format_version:
            found = document.get("format") if isinstance(document, dict) else type(document).__name__
            raise CorruptedArtifactError(
                f"{self.manifest_path} is of format {found!r}, not {self.format_version}: made by another "
                f"version of this library; delete the folder or pass overwrite=True"
            )
        return document

    def open(self, fields: Mapping[str, Any], *, overwrite: bool = False) -> dict[str, Any]:
        """Start the computation, or resume the one made with the same ``fields``.

        Args:
            fields: JSON-serialisable values that define what the folder holds (the arguments,
                fingerprints of the inputs); compared field by field with those recorded.
            overwrite: start afresh, deleting what the folder holds (instead of resuming it, or of
                refusing one made with other fields or by another format version).

        Returns:
            The manifest (also :attr:`manifest`): the recorded one when resuming, else a new one.

        Raises:
            CacheMismatchError: the folder was made with other fields (each is named, with both values).
        """
        fields = json.loads(json.dumps(dict(fields)))
        if self.manifest_path.is_file():
            try:
                recorded = read_json(self.manifest_path)
            except CorruptedArtifactError:
                if not overwrite:
                    raise
                recorded = {}
            if not isinstance(recorded, dict):
                if not overwrite:
                    raise CorruptedArtifactError(f"{self.manifest_path} does not hold a manifest (a JSON object)")
                recorded = {}
            if not overwrite:
                keys = ["format", *fields]
                found = differences({k: recorded.get(k) for k in keys}, {"format": self.format_version, **fields})
                if found:
                    raise CacheMismatchError(
                        f"the {self.kind} at {self.directory} was made with other arguments: " + "; ".join(found)
                        + ". Use another directory, or overwrite=True to replace it"
                    )
                self.remove_temporaries()
                self.manifest = recorded
                return recorded
            self.clear(recorded)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.remove_temporaries()
        self.manifest = {"format": self.format_version, **fields, "files": {}, "complete": False}
        self.save()
        return self.manifest

    def clear(self, recorded: Mapping[str, Any] | None = None) -> None:
        """Delete the manifest, every file it lists and the temporaries (nothing else in the folder)."""
        for name in (recorded or {}).get("files", {}):
            (self.directory / name).unlink(missing_ok=True)
        self.manifest_path.unlink(missing_ok=True)
        self.remove_temporaries()

    def remove_temporaries(self) -> None:
        """Delete the temporary files a killed writer left behind (never part of the folder's content)."""
        if self.directory.is_dir():
            for path in self.directory.glob(TEMPORARY_PATTERN):
                path.unlink(missing_ok=True)

    def save(self) -> None:
        """Write :attr:`manifest` (atomically)."""
        atomic_write(self.manifest_path, json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")

    def has(self, name: str) -> bool:
        """Whether the manifest lists the file ``name``."""
        return name in self.manifest.get("files", {})

    def put(self, name: str, payload: bytes, **extra: Any) -> dict[str, Any]:
        """Write the file ``name`` atomically, list it with its sha256 (and ``extra``), save the manifest.

        Returns:
            The file's entry ``{"sha256", "bytes", **extra}``.
        """
        atomic_write(self.directory / name, payload)
        entry = {"sha256": sha256_bytes(payload), "bytes": len(payload), **extra}
        self.manifest.setdefault("files", {})[name] = entry
        self.save()
        return entry

    def get(self, name: str) -> bytes:
        """The bytes of the listed file ``name``, checked against its sha256.

        Raises:
            CorruptedArtifactError: the file is not listed, cannot be read, or fails its checksum.
        """
        entry = self.manifest.get("files", {}).get(name)
        path = self.directory / name
        if entry is None:
            raise CorruptedArtifactError(
                f"{path} is not listed in the manifest of the {self.kind} at {self.directory}: it is "
                "incomplete; run the computation again to finish it"
            )
        try:
            payload = path.read_bytes()
        except OSError as error:
            raise CorruptedArtifactError(f"{path} cannot be read: {error}") from error
        if sha256_bytes(payload) != entry["sha256"]:
            raise CorruptedArtifactError(
                f"{path} fails its sha256 checksum (expected {entry['sha256']}); delete it and run the "
                "computation again to recompute it"
            )
        return payload

    def finish(self, **entries: Any) -> None:
        """Mark the computation complete (with more manifest ``entries``) and save."""
        self.manifest.update(entries)
        self.manifest["complete"] = True
        self.save()


__all__ = [
    "MANIFEST_NAME",
    "RunFolder",
    "atomic_write",
    "differences",
    "file_digest",
    "fsync_folder",
    "read_json",
    "sha256_bytes",
    "write_json",
]
