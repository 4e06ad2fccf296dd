"""Stage bookkeeping on a tiny real workspace: skip, keep past versions, restore them, never trust a killed run."""

from __future__ import annotations

import shutil

import pytest

from flows.definition.settings import load_settings, with_overrides
from flows.incremental.stage_cache import KEPT_VERSIONS, fingerprint, recorded_fingerprint, run_or_skip, versions_dir
from flows.stages.entry import run_stage
from flows.experiment.workspace import Workspace


class Killed(Exception):
    pass


def test_going_back_to_earlier_settings_restores_their_outputs(project):
    ws = Workspace(project)
    a = load_settings(project / "params.yaml")

    def run(stage, settings, body=None):
        return run_or_skip(stage, body or (lambda: run_stage(stage, settings, ws)), settings, ws)[1]

    def model_bytes():
        return (ws.artifacts / "pretrain" / "model.safetensors").read_bytes()

    assert [run("data", a), run("features", a), run("pretrain", a)] == ["ran", "ran", "ran"]
    first = model_bytes()
    assert run("pretrain", a) == "skipped"
    b = with_overrides(a, {"pretrain": {"learning_rate": 0.02}})
    assert run("pretrain", b) == "ran" and model_bytes() != first
    second = model_bytes()
    assert run("pretrain", a) == "restored" and model_bytes() == first  # A, B, A: nothing recomputed
    assert run("pretrain", b) == "restored" and model_bytes() == second
    assert run("features", b) == "skipped"  # pretraining settings are not the features' inputs

    # a run killed half-way wrote into its staging folder only: the last completed outputs stay in place, current
    def killed():
        (ws.stage_dir("pretrain") / "model.safetensors").write_bytes(b"half-written")
        raise Killed

    c = with_overrides(a, {"pretrain": {"learning_rate": 0.03}})
    with pytest.raises(Killed):
        run("pretrain", c, killed)
    assert (ws.staging_dir("pretrain") / "model.safetensors").read_bytes() == b"half-written"
    assert model_bytes() == second and recorded_fingerprint(ws, "pretrain") == fingerprint("pretrain", b, ws)
    assert run("pretrain", b) == "skipped" and model_bytes() == second
    final = ws.artifacts / "pretrain" / "model.safetensors"
    with pytest.raises(Killed):  # and even a stage that replaced a file of its final folder by mistake is not trusted
        run("pretrain", c, lambda: (final.unlink(), final.write_bytes(b"half"), killed()))
    assert run("pretrain", b) == "restored" and model_bytes() == second

    for rate in (0.04, 0.05, 0.06):  # only the most recently used versions are kept
        assert run("pretrain", with_overrides(a, {"pretrain": {"learning_rate": rate}})) == "ran"
    assert len([p for p in versions_dir(ws, "pretrain").iterdir() if not p.name.startswith(".")]) == KEPT_VERSIONS
    assert run("pretrain", with_overrides(a, {"pretrain": {"learning_rate": 0.05}})) == "restored"


def test_a_skip_checks_the_bytes_the_stage_wrote(project):
    """The completion record lists every file of the stage with its sha256: a file changed or removed after the stage
    completed makes it run again (a kept version likewise); a file only touched (same bytes) does not."""
    import json
    import os

    ws = Workspace(project)
    a = load_settings(project / "params.yaml")

    def run(stage):
        return run_or_skip(stage, lambda: run_stage(stage, a, ws), a, ws)[1]

    assert [run("data"), run("features"), run("pretrain")] == ["ran", "ran", "ran"]
    folder = ws.artifacts / "pretrain"
    files = json.loads((folder / "result.json").read_text())["info"]["files"]
    assert "model.safetensors" in files and "result.json" not in files
    model = folder / "model.safetensors"
    original = model.read_bytes()
    assert files["model.safetensors"][0] == len(original)

    os.utime(model)  # touched: same bytes, other time -> hashed again, still the same
    assert run("pretrain") == "skipped"
    changed = bytearray(original)
    changed[-1] ^= 1  # one flipped bit, same size
    model.unlink()  # replaced, as an editor or a stray process would; the kept version keeps its own inode
    model.write_bytes(bytes(changed))
    assert run("pretrain") == "restored" and model.read_bytes() == original  # the kept version, checked, comes back
    victim = next(name for name in files if name != "model.safetensors") if len(files) > 1 else None
    if victim is not None:
        (folder / victim).unlink()
        assert run("pretrain") == "restored"
    # a result without a manifest (written by an older version) is not trusted
    record = json.loads((folder / "result.json").read_text())
    del record["info"]["files"]
    (folder / "result.json").write_text(json.dumps(record))
    assert run("pretrain") in ("restored", "ran") and model.read_bytes() == original
    assert run("pretrain") == "skipped"




def test_a_score_stage_killed_after_one_mode_resumes_with_the_next(project, monkeypatch):
    """A score stage computes one mode after the other; killed after the first, it computes only the second when
    it runs again with the same inputs, and its outputs equal an uninterrupted run's."""
    from flows.experiment.experiment import Experiment

    ws = Workspace(project)
    a = load_settings(project / "params.yaml")
    modes = list(a.finetune.modes)
    assert len(modes) == 2
    for stage in ("data", "features", "pretrain", "finetune"):
        run_or_skip(stage, lambda stage=stage: run_stage(stage, a, ws), a, ws)
    computed, kill_at = [], [2]
    write_scores = Experiment.write_scores

    def counted(x, mode, scores):  # the stage writes a mode's scores once it has computed them
        computed.append(mode)
        if len(computed) == kill_at[0]:
            raise Killed
        return write_scores(x, mode, scores)

    monkeypatch.setattr(Experiment, "write_scores", counted)

    def run(settings):
        return run_or_skip("grad_cos", lambda: run_stage("grad_cos", settings, ws), settings, ws)

    with pytest.raises(Killed):
        run(a)
    assert computed == modes
    kill_at[0] = 0
    computed.clear()
    result, status = run(a)
    assert status == "ran" and computed == modes[1:]  # the first mode's scores were read back
    assert result.info["resumed_modes"] == modes[:1]
    resumed = {m: (ws.artifacts / "grad_cos" / f"{m}.safetensors").read_bytes() for m in modes}

    computed.clear()
    other = with_overrides(a, {"attribution": {"measurement": "margin"}})
    assert run(other)[1] == "ran" and computed == modes  # other inputs: nothing of theirs to resume from
    computed.clear()
    shutil.rmtree(versions_dir(ws, "grad_cos"))  # no kept version of the first inputs either: computed again, whole
    assert run(a)[1] == "ran" and computed == modes
    assert {m: (ws.artifacts / "grad_cos" / f"{m}.safetensors").read_bytes() for m in modes} == resumed


def test_multistage_magic_killed_within_a_mode_resumes_at_its_first_missing_query_group(project, monkeypatch):
    """Multi-stage MAGIC saves each group of queries as it completes: killed after the first group, the rerun
    computes only the groups left (no group twice), the pieces are gone from the completed stage, and the scores
    equal one call over every query."""
    import torch

    from flows.experiment.experiment import Experiment
    from flows.stages import multistage_magic as stage_module
    from influence.methods import multistage_magic

    ws = Workspace(project)
    a = with_overrides(load_settings(project / "params.yaml"), {"attribution": {"multistage_magic": True}})
    modes = list(a.finetune.modes)
    for stage in ("data", "features", "pretrain", "finetune"):
        run_or_skip(stage, lambda stage=stage: run_stage(stage, a, ws), a, ws)
    monkeypatch.setattr(stage_module, "MAGIC_QUERY_GROUP", 2)
    calls, kill_at, library = [], [2], multistage_magic.multistage_magic_scores

    def counted(*args, **kwargs):
        calls.append([str(i) for i in args[6].ids])
        if len(calls) == kill_at[0]:
            raise Killed
        return library(*args, **kwargs)

    monkeypatch.setattr(multistage_magic, "multistage_magic_scores", counted)

    def run():
        return run_or_skip("multistage_magic", lambda: run_stage("multistage_magic", a, ws), a, ws)

    with pytest.raises(Killed):
        run()
    x = Experiment.for_stage("multistage_magic", a, ws)
    queries = x.split("queries")
    assert len(queries) == 3 and calls == [list(queries.ids[:2]), list(queries.ids[2:])]
    kill_at[0] = 0
    calls.clear()
    result, status = run()
    assert status == "ran"
    assert calls == [list(queries.ids[2:])] + [list(queries.ids[:2]), list(queries.ids[2:])] * (len(modes) - 1)
    assert not (ws.artifacts / "multistage_magic" / ".partial").exists()
    assert not any(".partial" in name for name in result.info["files"])

    from flows.experiment.recipes import finetune_recipe, pretrain_recipe
    from influence.methods.magic import TrainingRecipe

    for mode in modes:
        whole = library(x.pretrain_task, x.pretrained(), x.split("pretrain"), x.query_task, x.finetuned(mode), x.split("train"),
                        queries, pretraining=TrainingRecipe(**pretrain_recipe(x)),
                        finetuning=TrainingRecipe(**finetune_recipe(x, mode)), shared=x.shared(), device="cpu",
                        batch_size=x.batch(256)).float()
        stored = x.scores("multistage_magic", mode)
        torch.testing.assert_close(stored, whole, rtol=1e-5, atol=1e-6 * float(whole.abs().max()))
