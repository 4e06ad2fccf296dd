"""Render ``docs/results.md`` (every measured figure, one row per claim) from ``bench/results/*.json``.

Each record is what a script of ``bench/`` wrote with ``--json`` (see ``bench/recording.py``), or a figure
transcribed from an earlier README with its original date, commit and machine (``"source"`` says so);
``evidence.json``, ``library.json`` and ``operations.json`` carry their command, date and commit per
claim. ``timings.json`` is a list of wall times of the pipeline and the test command. The claims with a
``"headline"`` (the short wording, or ``true`` for their ``what``) also make the README's results table
(:func:`headline_table`).
``tests/test_docs.py`` checks that the committed ``docs/results.md`` is this rendering and that the
README holds the headline table, so a figure and its source cannot drift apart.
Run: ``.venv/bin/python bench/render_results.py`` (writes ``docs/results.md``; ``--check``: exit 1 if it differs).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
OUTPUT = BENCH.parent / "docs" / "results.md"

# the sections of docs/results.md, in order: (record name, heading, what it holds); then the benchmarks
SECTIONS = [
    ("evidence", "Evidence", "the pipeline's evidence stages; the tables and how to read them: [evidence.md](evidence.md)"),
    ("library", "Library", "the library's methods, outside the benchmarks' default runs: [library.md](library.md)"),
    ("operations", "Operations", "the servers, explain and the workspace: [operations.md](operations.md)"),
]
HEADER = "| what | figure | command | date | commit | machine | source |\n| --- | --- | --- | --- | --- | --- | --- |"


def load(results: Path = RESULTS) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """``({name: record}, timing rows)`` from the JSON files of ``results``."""
    records = {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json")) if path.stem != "timings"}
    timings_file = results / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else []
    return records, timings


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _command(command: str) -> str:
    """The command without ``--json PATH`` (where its record went), in a code span."""
    if command.startswith((".venv/", "./", "CI=")) and "--json" in command:
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        if "--json" in words:
            at = words.index("--json")
            del words[at:at + 2]
        command = shlex.join(words)
    return f"`{_cell(command)}`" if command else ""


def _machine_label(machine: dict[str, Any]) -> str:
    if machine.get("description"):
        return machine["description"]
    parts = [machine.get("cpu") or "CPU not recorded", f"{machine.get('cores')} cores"]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']} GiB")
    parts.append(machine.get("gpu") or "no GPU")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    return ", ".join(parts)


class _Machines:
    """Short names M1, M2, ... for the machines, in order of first use."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def __call__(self, machine: dict[str, Any]) -> str:
        label = _machine_label(machine)
        if label not in self.names:
            self.names[label] = f"M{len(self.names) + 1}"
        return self.names[label]

    def table(self) -> str:
        rows = "\n".join(f"| {name} | {_cell(label)} |" for label, name in self.names.items())
        return "| | machine |\n| --- | --- |\n" + rows


def _source(item: dict[str, Any]) -> str:
    return _cell(item.get("source", "measured"))


def _claim_row(claim: dict[str, Any], record: dict[str, Any], machines: _Machines, link: bool) -> str:
    merged = {**{k: v for k, v in record.items() if k != "claims"}, **claim}
    what = _cell(claim["what"])
    if link and claim.get("evidence"):
        what = f"[{what}]({claim['evidence']})"
    machine = machines(merged["machine"])
    if merged.get("load_average") is not None:
        machine += f" (load {merged['load_average']:.1f})"
    commit = merged.get("commit", "unknown")
    commit = f"`{commit[:7]}`" + (" + uncommitted changes" if merged.get("uncommitted") else "")
    return (f"| {what} | {_cell(claim['figure'])} | {_command(merged.get('command', ''))} | {merged.get('date', '')} | "
            f"{commit} | {machine} | {_source(merged)} |")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not finished"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def render(results: Path = RESULTS) -> str:
    """The text of ``docs/results.md``."""
    records, timings = load(results)
    machines = _Machines()
    out = [
        "# Measured results",
        "",
        "<!-- Generated by bench/render_results.py from bench/results/*.json: do not edit here. A benchmark writes its",
        "     record with --json (its default); then run .venv/bin/python bench/render_results.py. -->",
        "",
        "Every measured figure of the project, one row per claim, with the command that produces it, the date, the",
        "commit and the machine. *measured*: the record a `bench/` script wrote (`--json`), at that commit. A row",
        "*transcribed from README.md at* a commit is a figure the README recorded before this page existed, with",
        "its original date and machine; its commit is the one that recorded it (the code measured is that",
        "commit's or its parent's). Wall times on a shared 2-core machine move with what else runs on it: the",
        "load average at the end of a measured run is given beside its machine.",
        "",
        "Sections: " + ", ".join(f"[{heading}](#{heading.lower()})" for name, heading, _ in SECTIONS if name in records)
        + ", [Benchmarks](#benchmarks), [Wall times](#wall-times), [Machines](#machines).",
        "",
    ]
    for name, heading, about in SECTIONS:
        if name not in records:
            continue
        record = records[name]
        out += [f"## {heading}", "", f"Figures of {about}.", "", HEADER]
        out += [_claim_row(claim, record, machines, link=True) for claim in record["claims"]]
        out.append("")
    out += ["## Benchmarks", "",
            "Ours against a baseline on the same work, in one run (`bench/README.md`).", ""]
    for name, record in records.items():
        if name in {n for n, _, _ in SECTIONS}:
            continue
        out += [f"### {name}", "", f"`bench/{name}.py`" + (f": {_cell(record['note'])}" if record.get("note") else "."),
                "", HEADER]
        out += [_claim_row(claim, record, machines, link=False) for claim in record["claims"]]
        out.append("")
    out += ["## Wall times", "",
            "The pipeline's and the test command's wall times, newest first (`bench/results/timings.json`).", "",
            "| date | what | wall time | tests passed | command | commit | machine | note | source |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in sorted(reversed(timings), key=lambda r: r["date"], reverse=True):  # the file lists them oldest first
        out.append(f"| {row['date']} | {_cell(row['what'])} | {_duration(row['seconds'])} | {row.get('tests_passed') or ''} | "
                   f"{_command(row['command'])} | `{row['commit'][:7]}` | {machines(row['machine'])} | "
                   f"{_cell(row.get('note', ''))} | {_source(row)} |")
    out += ["", "## Machines", "", machines.table(), ""]
    return "\n".join(out)


def headline_table(results: Path = RESULTS) -> str:
    """The README's results table: the claims marked ``headline``, linked to their evidence (paths from the README)."""
    records, _ = load(results)
    rows = ["| claim | figure | where |", "| --- | --- | --- |"]
    for name, record in records.items():
        for claim in record.get("claims", []):
            if not claim.get("headline"):
                continue
            where = f"[evidence](docs/{claim['evidence']})" if claim.get("evidence") else f"[results](docs/results.md#{name})"
            what = claim["headline"] if isinstance(claim["headline"], str) else claim["what"]
            rows.append(f"| {_cell(what)} | {_cell(claim['figure'])} | {where} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/results.md differs from the rendering")
    parser.add_argument("--headline", action="store_true", help="print the README's results table")
    args = parser.parse_args()
    if args.headline:
        print(headline_table())
        return
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            sys.exit(f"{OUTPUT} differs from the rendering of bench/results/*.json: run .venv/bin/python bench/render_results.py")
        return
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
