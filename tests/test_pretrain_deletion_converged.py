"""The multi-stage influence function on the real pipeline, where its premise holds (profile ``multistage-converged``).

A nightly check (``scripts/run-tests -m nightly``; about 20 minutes on a 2-core machine, too long for the test
command): the README's command on a fresh project, with the repository's ``params.yaml`` and the profile, must
pass every pretraining case-deletion check of the multi-stage influence function, in both embedding modes, at
1% and 5% (32 queries, 3 random draws: docs/evidence.md, The converged profile). The intervals measured there end 0.065 or more away
from zero, so a pass is no coin toss, and a wrong multi-stage formula (the Schur term dropped, a mixed
curvature) would not pass them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, make_project

pytestmark = [pytest.mark.slow, pytest.mark.nightly]

PROFILE = "multistage-converged"


def test_the_multistage_influence_function_passes_pretraining_case_deletion_when_both_stages_converge(tmp_path, raw_wheels):
    from flows.definition.settings import load_profile, load_settings

    root = make_project(tmp_path / "project", tmp_path / "remote", raw_wheels, extra=("profiles",))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")  # the user's defaults, the profile over them
    settings = load_profile(load_settings(root / "params.yaml"), PROFILE, root)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", PROFILE], cwd=root,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    checks = [c for c in json.loads((root / "artifacts" / "pretrain_deletion" / "deletion.json").read_text())
              if c["method"] == "multistage"]
    found = {(c["mode"], c["kind"], round(c["fraction"], 2)) for c in checks}
    assert found == {(mode, kind, fraction) for mode in ("fixed", "updated") for kind in ("proponents", "opponents")
                     for fraction in settings.evaluation.pretrain_k_fractions}
    for c in checks:
        print(f"{c['mode']:8s} {c['kind']:11s} k={c['k']:3d}: {c['mean_top']:+.3f} vs {c['mean_random']:+.3f}, "
              f"[{c['interval_low']:+.3f}, {c['interval_high']:+.3f}] {'pass' if c['passed'] else 'FAIL'}")
    failed = [(c["mode"], c["kind"], c["k"], round(c["interval_low"], 3), round(c["interval_high"], 3))
              for c in checks if not c["passed"]]
    assert not failed, f"multi-stage influence checks that failed (mode, kind, k, interval): {failed}"
    assert all(len(c["delta_top"]) == settings.evaluation.queries for c in checks)  # every checked query
