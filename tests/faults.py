"""``python -m tests.faults POINT [ARGS...]``: ``python -m flows.cli ARGS`` with one fault injected at ``POINT``.

A helper of ``tests/test_kills.py``: the pipeline's own code runs unchanged, and the fault comes from the outside, where
the machine would put it: a SIGKILL of the whole process group (as the OOM killer or ``kill -9``) at a moment too short
to hit by timing, or a full disk (``ENOSPC`` from the kernel) when a chosen file is flushed. The points:

- ``kill:dvc-slot``: inside ``dvc commit`` of the flow's bookkeeping, while the run holds its DVC slot;
- ``kill:keep:<stage>``: inside :func:`flows.incremental.stage_cache.keep` of ``<stage>``, after its first file is linked;
- ``kill:push:<stage>``: inside the object-store push of ``<stage>``, after its first object is sent;
- ``kill:mlflow``: inside the report's MLflow logging, once its run exists;
- ``kill:move:<stage>``: inside :func:`flows.incremental.stage_cache._move_into_place` of ``<stage>``, between its two renames;
- ``enospc:<glob>``: the disk is full when a file whose path matches ``<glob>`` is flushed (``os.fsync``);
- ``enospc:mlflow``: the disk is full when the report's MLflow run stores its artifacts.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _full(what: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


def install(point: str) -> None:
    """Patch the process so that the fault ``point`` happens (see the module docstring)."""
    kind, _, where = point.partition(":")
    if point == "kill:dvc-slot":
        from flows.versioning import dvc

        dvc.commit_stages = lambda *args, **kwargs: _die()
    elif kind == "kill" and where.startswith("keep:"):
        from flows.incremental import stage_cache

        stage, link = where.removeprefix("keep:"), os.link
        marker = f"/.stages/{stage}/."

        def link_then_die(source, target, *args, **kwargs):
            link(source, target, *args, **kwargs)
            if marker in str(target):
                _die()

        stage_cache.os.link = link_then_die
    elif kind == "kill" and where.startswith("push:"):
        from flows.incremental.object_store import ObjectStore

        stage, push = where.removeprefix("push:"), ObjectStore.push_stage

        def push_then_die(self, name, fingerprint, folder, files):
            if name == stage:
                put = self.put_object
                self.put_object = lambda path, sha256=None: (put(path, sha256), _die())[0]
            return push(self, name, fingerprint, folder, files)

        ObjectStore.push_stage = push_then_die
    elif point == "kill:mlflow":
        from mlflow.tracking import MlflowClient

        MlflowClient.log_artifacts = lambda *args, **kwargs: _die()
    elif kind == "kill" and where.startswith("move:"):
        import pathlib

        stage, rename = where.removeprefix("move:"), pathlib.Path.rename

        def rename_then_die(self, target):
            moved = rename(self, target)
            if f"/.{stage}.replaced-" in str(target):
                _die()
            return moved

        pathlib.Path.rename = rename_then_die
    elif point == "enospc:mlflow":
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        def full(self, local_dir, artifact_path=None):  # the disk of the artifact store is full: its folder is named
            raise _full(os.path.join(self.artifact_dir, artifact_path or ""))

        LocalArtifactRepository.log_artifacts = full
    elif kind == "enospc":
        fsync = os.fsync

        def fsync_or_full(fd):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if fnmatch.fnmatch(path, where):
                raise _full(path)
            return fsync(fd)

        os.fsync = fsync_or_full
    else:
        raise SystemExit(f"tests.faults: unknown point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from flows.cli import main

    sys.exit(main(sys.argv[2:]))
