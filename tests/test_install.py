"""The library installs alone: a fresh virtual environment, ``pip install`` of the project with no extra, then
``import influence`` with Prefect, MLflow and DVC absent, and the README's quick start (examples/quickstart.py).

torch comes first, pinned to the lock's release (``torch==2.13.0``): pip takes the CPU wheel from a local wheel
folder (this machine's pip configuration names /opt/wheels) where there is one. Where pip would instead download
PyPI's CUDA build (gigabytes), the test fails before installing anything and says so. Everything else comes from
PyPI or pip's own cache. About two minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the release of requirements.lock
PYTHON = shutil.which("python3.11") or sys.executable  # a system interpreter, not the project's venv
# what the distribution needs to build: the rest of the checkout (.venv, data, artifacts) stays behind
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "influence", "flows")
PLATFORM = ("prefect", "mlflow", "dvc")
LARGE = ("nvidia-", "triton", "cuda-")  # what PyPI's CUDA build of torch brings


def _environment() -> dict[str, str]:
    """The caller's environment without what would reach the project's venv (pip's configuration stays)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO)))
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (f"{' '.join(args)} failed ({done.returncode}):\n"
                                  f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def _check_torch_is_local(python: str, tmp_path: Path) -> None:
    """Fail, before any download, when installing TORCH would fetch PyPI's CUDA build rather than a local wheel."""
    report = tmp_path / "torch-report.json"
    _run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), TORCH], tmp_path, 300)
    items = json.loads(report.read_text())["install"]
    names = [item["metadata"]["name"].lower() for item in items]
    torch_url = next(item["download_info"]["url"] for item in items if item["metadata"]["name"].lower() == "torch")
    large = [n for n in names if n.startswith(LARGE)]
    if large or not torch_url.startswith("file:"):
        pytest.fail(f"installing {TORCH} here would download PyPI's build ({torch_url}; "
                    f"with {large or 'nothing else large'}): "
                    "put the CPU wheel (torch-2.13.0+cpu, PyTorch's CPU index) in a folder that pip's find-links "
                    "names (PIP_FIND_LINKS), as this project's machines do with /opt/wheels")


def test_library_installs_alone_and_runs_the_quick_start(tmp_path):
    quickstart = REPO / "examples" / "quickstart.py"
    assert quickstart.is_file(), f"{quickstart} is missing (the README's quick start)"
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)

    venv = tmp_path / "venv"
    _run([PYTHON, "-m", "venv", str(venv)], tmp_path, 120)
    python = str(venv / "bin" / "python")
    _check_torch_is_local(python, tmp_path)
    # --no-compile: bytecode is written when a module is first imported (saves about a minute for torch)
    _run([python, "-m", "pip", "install", "--quiet", "--no-compile", TORCH], tmp_path, 600)
    _run([python, "-m", "pip", "install", "--quiet", "--no-compile", str(source)], tmp_path, 600)
    _run([python, "-m", "pip", "check"], tmp_path, 120)

    probe = ("import importlib.util, json, influence; "
             f"print(json.dumps({{'file': influence.__file__, 'present': [m for m in {PLATFORM!r} "
             "if importlib.util.find_spec(m) is not None]}))")
    found = json.loads(_run([python, "-c", probe], tmp_path, 300).stdout.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(venv), f"influence was imported from {found['file']}, not the fresh venv"
    assert found["present"] == [], f"the library's installation brought {found['present']} (the platform's packages)"

    # the quick start as a newcomer runs it, from outside the checkout (sys.path[0] is examples/, not the repo)
    done = _run([python, str(quickstart)], tmp_path, 600)
    assert "scores" in done.stdout, done.stdout
