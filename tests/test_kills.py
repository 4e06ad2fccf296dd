"""Real kills and a full disk: the pipeline as a subprocess, stopped again and again, then a re-run.

One project is interrupted three times by a signal at a random point inside a long stage (pretraining, the gradient
cache, the case-deletion retrainings), killed at moments too short to hit by timing (inside keeping a stage's version,
inside sending it to the object store, inside the report's MLflow logging, while holding the DVC slot, between the two
renames that move a stage into place: :mod:`tests.faults`), and stopped by a full disk (ENOSPC while the data stage
writes a table, a gradient index writes a shard, a stage saves its result, MLflow stores the report); then it is run to
the end, and its outputs must equal, bit for bit, those of an uninterrupted run of the same settings in another
project. SIGTERM (what ``timeout``, systemd and Kubernetes send) must end the run within seconds, with one line and no
traceback, and leave no process; a full disk must end it with one clear line naming the file, leaving no torn file.
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
LATEST_SECONDS = {"pretrain": 3.0, "gradients": 0.05, "retrainings": 0.5}


REPO = Path(__file__).resolve().parents[1]
STORE_KEY = "kills-" + "0123456789abcdef" * 3


def _start(project: Path, fault: str = "", store: str = "") -> subprocess.Popen:
    entry = ["-m", "tests.faults", fault] if fault else ["-m", "flows.cli"]
    extra = ["--set", f"cluster.store={store}"] if store else []
    command = [sys.executable, *entry, "run", "--params", str(project / "params.yaml"), *SETTINGS, *extra]
    env = {**os.environ, "PYTHONPATH": f"{project}{os.pathsep}{REPO}", "INFLUENCE_STORES": store, "INFLUENCE_STORE_KEY": STORE_KEY}
    return subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _torn(project: Path) -> list[str]:
    """Temporary files of an interrupted write left where a reader could meet them."""
    return sorted(str(p.relative_to(project)) for folder in (project / "artifacts", project / "data" / "prepared")
                  for p in folder.rglob("*") if ".tmp-" in p.name and ".staging" not in p.parts)


def _finish(process: subprocess.Popen, timeout: float = 1200) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-5000:]
    return output


def _inside(project: Path, stage: str) -> bool:
    """Whether ``stage`` is running now: its marker is there and its result is not (for the retrainings: some saved)."""
    artifacts = project / "artifacts"
    if stage == "retrainings":
        saved = any(folder.is_dir() and any(folder.glob("*.json")) for folder in (artifacts / "retrainings").glob("*"))
        deletion = (artifacts / ".staging" / "deletion" / ".running").is_file() or (artifacts / "deletion" / "result.json").is_file()
        return saved and not deletion
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

    store = f"file://{tmp_path / 'store'}"
    _fault(killed, "enospc:*/data/prepared/.finetune.csv.tmp-*", store, "finetune.csv")
    for stage, how in (("pretrain", signal.SIGKILL), ("gradients", signal.SIGTERM), ("retrainings", signal.SIGKILL)):
        if stage == "retrainings":  # the GPU stages after the gradient cache: a shard and a result on a full disk
            _fault(killed, "enospc:*/.staging/multistage/pretrain_index/.shard_*.tmp-*", store, "pretrain_index/.shard_")
            _fault(killed, "enospc:*/.staging/grad_cos/.result.json.tmp-*", store, "grad_cos/.result.json")
        process = _start(killed, store=store)
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

    for fault in ("kill:keep:deletion", "kill:push:deletion", "enospc:mlflow", "kill:mlflow", "kill:dvc-slot",
                  "kill:move:report"):
        _fault(killed, fault, store, "mlartifacts" if fault == "enospc:mlflow" else "")

    _finish(uninterrupted)
    expected = stage_digests(reference)
    assert {"pretrain/model.safetensors", "deletion/deletion.json"} <= set(expected)
    output = _finish(_start(killed, store=store))
    assert "stages skipped" in output
    left = [str(p) for p in (killed / "artifacts").rglob("*") if ".replaced-" in p.name or ".partial-" in p.name]
    left += [str(p) for p in (tmp_path / "store").rglob("*") if ".partial-" in p.name]
    assert not left and not _torn(killed), left + _torn(killed)
    found = stage_digests(killed)
    assert found.keys() == expected.keys()
    differing = sorted(name for name in expected if found[name] != expected[name])
    assert not differing, f"after the kills and a re-run these outputs differ from the uninterrupted run: {differing}"


def _fault(project: Path, fault: str, store: str, names: str) -> None:
    """Run the pipeline of ``project`` with ``fault`` (:mod:`tests.faults`): a kill ends it with SIGKILL and leaves no
    process; a full disk ends it with one clear line naming the file (``names`` is in it) and no torn file."""
    process = _start(project, fault, store)
    output = process.communicate(timeout=900)[0]
    if fault.startswith("kill:"):
        assert process.returncode == -signal.SIGKILL, f"{fault}: the run ended {process.returncode}:\n{output[-4000:]}"
        deadline = time.monotonic() + 10
        while not _group_gone(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_gone(process.pid), f"processes of the run are left after {fault}"
    else:
        said = [line for line in output.splitlines() if line.startswith("error: the disk is full")]
        assert process.returncode == 1 and len(said) == 1 and names in said[0], f"{fault}:\n{output[-4000:]}"
        assert "No space left on device" in said[0] and not _torn(project), _torn(project)
    print(f"{fault}: stopped as it should")
