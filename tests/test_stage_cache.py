"""Stage bookkeeping on a tiny real workspace: skip, keep past versions, restore them, never trust a killed run."""

from __future__ import annotations

import pytest

from flows.settings import load_settings, with_overrides
from flows.stage_cache import KEPT_VERSIONS, recorded_fingerprint, run_or_skip, versions_dir
from flows.stages import run_stage
from flows.workspace import Workspace


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

    # a run killed after rewriting outputs leaves no result that claims them
    def killed():
        (ws.artifacts / "pretrain" / "model.safetensors").write_bytes(b"half-written")
        raise Killed

    c = with_overrides(a, {"pretrain": {"learning_rate": 0.03}})
    with pytest.raises(Killed):
        run("pretrain", c, killed)
    assert recorded_fingerprint(ws, "pretrain") == ""
    assert run("pretrain", b) == "restored" and model_bytes() == second

    for rate in (0.04, 0.05, 0.06):  # only the most recently used versions are kept
        assert run("pretrain", with_overrides(a, {"pretrain": {"learning_rate": rate}})) == "ran"
    assert len([p for p in versions_dir(ws, "pretrain").iterdir() if not p.name.startswith(".")]) == KEPT_VERSIONS
    assert run("pretrain", with_overrides(a, {"pretrain": {"learning_rate": 0.05}})) == "restored"
