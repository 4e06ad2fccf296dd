"""Where a benchmark's figures go: ``bench/results/<script>.json``, with the machine, commit, date and command.

Every script of ``bench/`` takes ``--json PATH`` (default ``bench/results/<script name>.json``) and ends
with :func:`write`: the figures it printed, as numbers, and its claims (one line of ``docs/results.md``
each: what was compared, and the figure, formatted from the numbers of the same run).
``bench/render_results.py`` renders ``docs/results.md`` from these files, so a figure and its source
cannot drift apart. A record::

    {"benchmark": "per_example_gradients", "command": ".venv/bin/python bench/per_example_gradients.py",
     "date": "2026-12-08", "commit": "<git rev-parse HEAD>", "machine": {"cpu": ..., "cores": 2, ...},
     "figures": {...}, "claims": [{"what": "...", "figure": "..."}]}

plus ``"uncommitted"``, the tracked files of ``influence/`` and ``bench/`` that differed from the commit.
A record transcribed from an earlier document instead of measured carries ``"source"``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ROOT = BENCH.parent


def add_json_option(parser: argparse.ArgumentParser, script: str) -> None:
    """``--json PATH``: where the record goes (default ``bench/results/<script>.json``)."""
    default = RESULTS / f"{Path(script).stem}.json"
    parser.add_argument("--json", default=str(default),
                        help=f"write the figures, machine, commit, date and command here (default: {default.relative_to(ROOT)})")


def machine() -> dict[str, Any]:
    """The CPU model (``/proc/cpuinfo``), cores, memory in GiB (``/proc/meminfo``) and GPU of this machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
                break
    except OSError:
        pass
    found: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "gpu": None}
    try:
        import torch

        found["torch"] = torch.__version__
        if torch.cuda.is_available():
            found["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return found


def commit() -> str:
    """``git rev-parse HEAD`` of the project (``unknown`` outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def uncommitted() -> list[str]:
    """Tracked files of ``influence/`` and ``bench/`` that differ from the commit (the code measured is not exactly it)."""
    try:
        listed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "influence", "bench"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted(line[3:] for line in listed.splitlines() if line.strip())


def command() -> str:
    """The command line that ran this script, from the project folder."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


def write(path: str | Path, figures: dict[str, Any], claims: list[dict[str, Any]]) -> Path:
    """Write the record of this run to ``path`` (folders made as needed); returns the path.

    Args:
        path: the ``--json`` argument.
        figures: the run's numbers, by name (seconds, ratios, correlations, ...).
        claims: ``[{"what": ..., "figure": ...}, ...]``, one row of ``docs/results.md`` each; a claim
            with ``"headline": True`` also appears in the README's results table.
    """
    record = {
        "benchmark": Path(sys.argv[0]).stem,
        "command": command(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "machine": machine(),
        "load_average": round(os.getloadavg()[0], 2),  # other work on the machine skews wall times
        "figures": figures,
        "claims": claims,
    }
    changed = uncommitted()
    if changed:
        record["uncommitted"] = changed
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"figures written to {path}")
    return path
