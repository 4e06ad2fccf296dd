"""Real kills: the pipeline as a subprocess, SIGKILL or SIGTERM at a random point inside a long stage, then a re-run.

One project is interrupted three times, each time inside another stage (pretraining, the gradient cache,
the case-deletion retrainings), and then run to the end; its outputs must equal, bit for bit, those of
an uninterrupted run of the same settings in another project. SIGTERM (what ``timeout``, systemd and
Kubernetes send) must end the run within seconds, with one line and no traceback, and leave no process.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_project
from tests.stage_digests import stage_digests

pytestmark = pytest.mark.slow

# stages long enough on this machine to be caught inside (a few seconds each), the rest as small as the tiny settings;
# one finetuning mode (the one the case-deletion check retrains): the other adds time to every run, not kill points
SETTINGS = ["--set", "data.pretrain_sentences=2000", "--set", "pretrain.epochs=6", "--set", "pretrain.batch_size=32",
            "--set", "data.finetune_train_examples=600", "--set", "finetune.hidden_dim=24",
            "--set", "finetune.modes=[updated]", "--set", "evaluation.mislabel_fraction=0.0"]
STOP_SECONDS = 20  # SIGTERM to exit, the temporary Prefect server included
# how long after a stage starts the signal may come (drawn uniformly): within the shortest time the stage takes here
LATEST_SECONDS = {"pretrain": 3.0, "gradients": 0.05, "retrainings": 3.0}


def _start(project: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "run", "--params", str(project / "params.yaml"), *SETTINGS]
    return subprocess.Popen(command, cwd=project, env={**os.environ, "PYTHONPATH": str(project)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 1200) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-5000:]
    return output


def _inside(project: Path, stage: str) -> bool:
    """Whether ``stage`` is running now: its marker is there and its result is not (for the retrainings: some saved)."""
    artifacts = project / "artifacts"
    if stage == "retrainings":
        saved = any(folder.is_dir() and any(folder.glob("*.json")) for folder in (artifacts / "retrainings").glob("*"))
        return saved and not (artifacts / ".staging" / "deletion" / ".running").is_file()
    return (artifacts / ".staging" / stage / ".running").is_file() and not (artifacts / stage / "result.json").is_file()


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_killed_three_times_then_rerun_equals_an_uninterrupted_run(tmp_path, raw_wheels):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"random seed of the kill points: {seed}")
    reference = make_project(tmp_path / "reference", tmp_path / "reference-remote", raw_wheels)
    killed = make_project(tmp_path / "killed", tmp_path / "killed-remote", raw_wheels)
    uninterrupted = _start(reference)  # alongside the interrupted runs (they are timed by their own stages)

    for stage, how in (("pretrain", signal.SIGKILL), ("gradients", signal.SIGTERM), ("retrainings", signal.SIGKILL)):
        process = _start(killed)
        waited = time.monotonic()
        while not _inside(killed, stage):
            assert process.poll() is None, f"the run ended before {stage}:\n{process.stdout.read()[-4000:]}"
            assert time.monotonic() - waited < 900, f"{stage} never started"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, LATEST_SECONDS[stage]))
        os.killpg(process.pid, signal.SIGSTOP)  # frozen where it is: the check below sees what the signal will hit
        inside = _inside(killed, stage)
        if how == signal.SIGKILL:  # as the kernel's OOM killer or `kill -9` of the whole group
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate(timeout=60)[0]
        else:  # as `timeout` does: to the run's own process only
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            os.killpg(process.pid, signal.SIGCONT)
            output = process.communicate(timeout=STOP_SECONDS + 30)[0]
            stopped = time.monotonic() - sent
            print(f"SIGTERM inside {stage}: exit {process.returncode} after {stopped:.1f} s; last lines:\n{output[-1500:]}")
            assert process.returncode == 128 + signal.SIGTERM and stopped < STOP_SECONDS
            after = output[output.index("stopping: received SIGTERM"):]
            assert output.count("stopping: received SIGTERM") == 1 and "Traceback" not in after, after[-3000:]
            assert "Connection refused" not in after and "ConnectError" not in after, after[-3000:]
        deadline = time.monotonic() + 10
        while not _group_gone(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_gone(process.pid), f"processes of the run are left after {signal.Signals(how).name}"
        print(f"{signal.Signals(how).name} inside {stage} (still inside when sent: {inside})")
        assert inside, f"{stage} ended before the signal: the stage is too short to be caught"
        if stage != "retrainings":
            assert not (killed / "artifacts" / stage / "result.json").is_file()  # never taken for finished

    _finish(uninterrupted)
    expected = stage_digests(reference)
    assert {"pretrain/model.safetensors", "deletion/deletion.json"} <= set(expected)
    output = _finish(_start(killed))
    assert "stages skipped" in output
    found = stage_digests(killed)
    assert found.keys() == expected.keys()
    differing = sorted(name for name in expected if found[name] != expected[name])
    assert not differing, f"after the kills and a re-run these outputs differ from the uninterrupted run: {differing}"
