"""Stage outputs through an object store (moto's S3 server on loopback, and a folder): sent once per content, fetched
with their bytes checked, restored by a pipeline in another folder instead of recomputed, and read by a retraining
on a machine that does not see the flow's folder. The pipeline's gradient caches and index rows computed on a local
Dask cluster equal those of one process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from flows.definition.settings import load_settings, with_overrides
from tests.s3_server import s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server(buckets=("stages",)) as env:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


STORE_KEY = "k" * 16 + "test-signing-key-of-the-store" + "k" * 16
FP = "ab" * 32  # a fingerprint: 64 hex digits


@pytest.fixture(autouse=True)
def store_key(monkeypatch):
    """The operator's signing key of the store's documents, as every machine that uses the store has it."""
    monkeypatch.setenv("INFLUENCE_STORE_KEY", STORE_KEY)


def _stage_folder(folder: Path, files: dict[str, bytes]) -> dict[str, list]:
    from flows.incremental.stage_cache import manifest

    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "result.json").write_text(json.dumps({"stage": "x", "outputs": {}, "info": {"fingerprint": "f"}}))
    return manifest(folder)


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_a_stage_goes_there_and_back_once_per_content(kind, s3, tmp_path):
    from flows.incremental.object_store import ObjectStore

    url = "s3://stages/team-a" if kind == "s3" else f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    first = _stage_folder(tmp_path / "one", {"model.safetensors": b"weights" * 1000, "sub/ids.json": b"[1, 2]"})
    assert not store.has_stage("finetune", FP)
    assert store.push_stage("finetune", FP, tmp_path / "one", first) == 2
    assert store.has_stage("finetune", FP)
    back = tmp_path / "back"
    assert store.pull_stage("finetune", FP, back)
    for name, (size, mtime_ns, _) in first.items():
        assert (back / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
        assert (back / name).stat().st_mtime_ns == mtime_ns and (back / name).stat().st_size == size
    assert json.loads((back / "result.json").read_text()) == json.loads((tmp_path / "one" / "result.json").read_text())
    assert not store.pull_stage("finetune", "cd" * 32, tmp_path / "none") and not (tmp_path / "none").exists()

    # a second stage sharing a file sends only its new content
    sent = []
    put = store._backend.put_file
    store._backend.put_file = lambda key, path: (sent.append(key), put(key, path))
    second = _stage_folder(tmp_path / "two", {"model.safetensors": b"weights" * 1000, "new.json": b"{}"})
    store.push_stage("finetune", "ef" * 32, tmp_path / "two", second)
    assert sent == [ObjectStore.object_key(second["new.json"][2])]


def test_an_object_with_other_bytes_is_refused(tmp_path):
    from flows.incremental.object_store import ObjectStore

    store = ObjectStore(f"file://{tmp_path / 'store'}")
    files = _stage_folder(tmp_path / "one", {"a.bin": b"right"})
    store.push_stage("pretrain", FP, tmp_path / "one", files)
    (tmp_path / "store" / ObjectStore.object_key(files["a.bin"][2])).write_bytes(b"wrong")
    with pytest.raises(ValueError, match="came back with sha256"):
        store.pull_stage("pretrain", FP, tmp_path / "back")
    assert not any(p.name.startswith(".") for p in (tmp_path / "back").iterdir())  # no partial file left


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_object_store_refuses_escaping_names(tmp_path, monkeypatch):
    """Whoever writes to the bucket writes manifests: an entry named /abs/x, ../x, a/../../x or one under a linked
    parent, and a stage or fingerprint such as ../x or /x, are refused by every pull path (pull_stage, fetch, restore,
    fetch_into, workspace_for), and nothing outside the target changes. A manifest the platform did not sign is
    refused too, so a forged one never gets that far."""
    from flows.incremental import stage_cache
    from flows.cluster.worker_workspace import fetch_into, workspace_for
    from flows.incremental.object_store import ObjectStore, StoreIntegrityError
    from flows.definition.settings import PipelineSettings
    from flows.experiment.workspace import Workspace

    root = tmp_path / "store"
    store = ObjectStore(f"file://{root}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    ws = Workspace(tmp_path / "project")
    (ws.artifacts / "features").mkdir(parents=True)
    (ws.artifacts / "features" / "own.txt").write_text("mine")
    sha = store.put_object_bytes(b"planted")
    target = ws.artifacts / ".stages" / "features" / "target"
    target.mkdir(parents=True)
    (target / "link").symlink_to(outside)
    before = _tree(tmp_path)
    bad_names = [str(outside / "x"), "../x", "a/../../x", "../../outside/x", "./x", "", "a//b", "link/x", "..", "a\\..\\x",
                 "result.json"]
    key = ObjectStore.stage_key("features", FP)
    for name in bad_names:
        store.put_json(key, {"result": {"stage": "features", "outputs": {}, "info": {"fingerprint": FP}},
                             "files": {"fine.bin": [7, 0, sha], name: [7, 0, sha]}})
        with pytest.raises(StoreIntegrityError, match="manifest"):
            store.pull_stage("features", FP, target)
        if name != "link/x":  # restore pulls into a fresh folder of its own, where no link lies
            with pytest.raises(StoreIntegrityError, match="manifest"):
                stage_cache.restore(ws, "features", FP, store)
        assert not (target / "fine.bin").exists()  # every name is checked before the first file is written
    settings = PipelineSettings()
    monkeypatch.setattr("flows.cluster.worker_workspace.store_of", lambda _: store)
    for stage, fp in (("../flows", FP), ("/x", FP), ("features/../../x", FP), ("no_such_stage", FP), ("features", "../x"),
                      ("features", "/x"), ("features", "ab" * 31 + "/."), ("features", FP.upper())):
        if stage != "no_such_stage":  # the store checks the form of a name; the stage table, its stage
            with pytest.raises(StoreIntegrityError):
                store.pull_stage(stage, fp, tmp_path / "project" / "pulled")
        with pytest.raises(StoreIntegrityError):
            stage_cache.fetch(ws, stage, fp, store)
        with pytest.raises(StoreIntegrityError):
            stage_cache.restore(ws, stage, fp, store)
        with pytest.raises(StoreIntegrityError):
            fetch_into(settings, ws, {stage: fp})
        with pytest.raises(StoreIntegrityError):
            workspace_for(settings, tmp_path / "elsewhere", {stage: fp})
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("store/")} == {k: v for k, v in before.items() if not k.startswith("store/")}
    assert (ws.artifacts / "features" / "own.txt").read_text() == "mine" and (outside / "keep.txt").read_text() == "precious"

    # a manifest (or any document) written without the platform's key: refused before a name is read
    good = {"result": {"stage": "features", "outputs": {}, "info": {"fingerprint": FP}}, "files": {"a.bin": [7, 0, sha]}}
    (root / key).write_text(json.dumps(good))  # unsigned
    with pytest.raises(StoreIntegrityError, match="not a signed document"):
        store.pull_stage("features", FP, tmp_path / "one")
    monkeypatch.setenv("INFLUENCE_STORE_KEY", "another-key-" + "x" * 40)
    ObjectStore(f"file://{root}").put_json(key, good)  # signed with another key
    monkeypatch.setenv("INFLUENCE_STORE_KEY", STORE_KEY)
    with pytest.raises(StoreIntegrityError, match="wrong signature"):
        store.pull_stage("features", FP, tmp_path / "two")
    store.put_json(key, good)
    assert store.pull_stage("features", FP, tmp_path / "three") and (tmp_path / "three" / "a.bin").read_bytes() == b"planted"
    monkeypatch.delenv("INFLUENCE_STORE_KEY")
    with pytest.raises(StoreIntegrityError, match="INFLUENCE_STORE_KEY"):
        ObjectStore(f"file://{root}")


def test_store_addresses_are_checked():
    from flows.definition.settings import PipelineSettings, SettingsError

    base = PipelineSettings()
    assert with_overrides(base, {"cluster": {"store": "s3://bucket/prefix"}}).cluster.store == "s3://bucket/prefix"
    assert with_overrides(base, {"cluster": {"store": "file:///srv/store"}}).cluster.store == "file:///srv/store"
    for bad in ("bucket/prefix", "s3:///prefix", "file://relative/folder", "http://minio:9000/bucket"):
        with pytest.raises(SettingsError, match="s3://bucket/prefix"):
            with_overrides(base, {"cluster": {"store": bad}})


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_a_pipeline_in_another_folder_restores_every_stage_from_the_store(s3, tmp_path, raw_wheels, prefect_harness,
                                                                          monkeypatch):
    """The first folder's run computes its gradient-cache shards, index rows and retrainings on a local Dask cluster
    (``cluster.runner: dask``); the second folder restores every stage, and its GPU stages in one process equal the
    Dask ones bit for bit (the records on Dask and on threads: tests/test_multi_host.py)."""
    from flows.experiment import retraining
    from flows.stages import entry
    from flows.experiment.experiment import Experiment
    from flows.cluster.worker_workspace import input_fingerprints, receive_records, send_records, workspace_for
    from flows.pipeline import pipeline
    from flows.definition.stage_table import NAMES
    from flows.experiment.workspace import StageResult, Workspace
    from tests.conftest import make_project

    monkeypatch.setenv("INFLUENCE_STORES", "s3://stages/pipeline")  # the operator allows this store
    first = make_project(tmp_path / "first", tmp_path / "remote-1", raw_wheels)
    second = make_project(tmp_path / "second", tmp_path / "remote-2", raw_wheels)
    settings = with_overrides(load_settings(first / "params.yaml"),
                              {"evaluation": {"mislabel_fraction": 0.0, "methods": ["grad_cos"]}, "attribution": {"solver": "arnoldi"},
                               "cluster": {"store": "s3://stages/pipeline", "runner": "dask"}})
    ran = pipeline(settings=settings, project_dir=str(first))
    assert "features" not in ran["skipped"]
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["shards"])))
        tasks = [t.name for t in client.read_task_runs() if t.name.startswith("shard-")]
    assert sorted(r.name for r in subflows) == ["gradients-shards", "influence-shards", "multistage-shards"]
    assert all(r.state.is_completed() for r in subflows) and len(tasks) >= 3, tasks
    again = pipeline(settings=settings, project_dir=str(second))  # the same code, settings and data, elsewhere
    kept = [n for n in NAMES if n not in ("data", "report") and (first / "artifacts" / n / "result.json").is_file()]
    assert {"features", "pretrain", "finetune", "gradients", "influence", "deletion"} <= set(kept)
    assert set(kept) <= set(again["skipped"]), f"recomputed in the second folder: {set(kept) - set(again['skipped'])}"
    for name in kept:
        a, b = StageResult.load(Workspace(first), name), StageResult.load(Workspace(second), name)
        assert a.info["fingerprint"] == b.info["fingerprint"]
        assert {k: v[2] for k, v in a.info["files"].items()} == {k: v[2] for k, v in b.info["files"].items()}, name
        assert (second / "artifacts" / ".stages" / name).is_dir()  # the local cache of what was fetched

    # the GPU stages again, in one process: the gradient caches and index rows the Dask tasks made, the same files
    from flows.attribution import attribution
    from flows.cluster.shards import SHARDED_STAGES

    threads = with_overrides(settings, {"cluster": {"runner": "threads"}})
    attribution(threads, str(second), force=True)
    for name in SHARDED_STAGES:
        dask_files = {k: v[2] for k, v in StageResult.load(Workspace(first), name).info["files"].items() if k.endswith(".safetensors")}
        serial = {k: v[2] for k, v in StageResult.load(Workspace(second), name).info["files"].items() if k.endswith(".safetensors")}
        assert any("shard_" in k for k in dask_files) and dask_files == serial, name

    # a retraining on a machine that does not see the flow's folder: its inputs fetched, its records sent back
    monkeypatch.setenv("INFLUENCE_WORK_DIR", str(tmp_path / "elsewhere"))
    x = Experiment.for_stage("deletion", settings, Workspace(first))
    runs = retraining.runs_folder(x, "finetune")
    group = retraining.groups(x, entry.plan("deletion", x), "finetune")[1]
    inputs = input_fingerprints(Workspace(first))
    remote = workspace_for(settings, tmp_path / "not-here", inputs)
    assert remote.root.parent == tmp_path / "elsewhere"
    far = Experiment.for_stage("deletion", settings, remote)
    assert retraining.runs_folder(far, "finetune").name == runs.name  # the same context on both machines
    made = retraining.retrain_group(far, group, "finetune")
    assert made == [retraining.read_record(runs / f"{r.key}.json") for r in group]  # the flow's own records
    send_records(settings, runs.name, made)
    shutil.rmtree(runs)
    runs.mkdir()
    assert receive_records(settings, runs, group) == len(group)
    assert [retraining.read_record(runs / f"{r.key}.json") for r in group] == made
    from flows.incremental.object_store import StoreIntegrityError, store_of

    forged = {**made[0], "measured": [[0.0, 1.0] for _ in made[0]["measured"]]}  # whoever writes the bucket, no key
    store_of(settings)._backend.put_bytes(f"retrainings/{runs.name}/{group[0].key}.json", json.dumps(forged).encode())
    (runs / f"{group[0].key}.json").unlink()
    with pytest.raises(StoreIntegrityError, match="not a signed document"):
        receive_records(settings, runs, group)
    assert workspace_for(settings, first, inputs).root == first  # a machine that sees the folder works in it
    with pytest.raises(RuntimeError, match="cluster.store is empty"):
        workspace_for(with_overrides(settings, {"cluster": {"store": ""}}), tmp_path / "not-here", inputs)
