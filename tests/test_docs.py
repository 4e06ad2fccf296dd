"""The README is a front page and the docs hold together.

The README stays short and opens with the two commands; its quick start is ``examples/quickstart.py``
word for word, and that file runs as written; every relative link of the README and of ``docs/`` reaches
a file (and a heading, for an ``#anchor`` into Markdown); ``docs/results.md`` is the rendering of
``bench/results/*.json`` and the README's results table is their headline rows, so a figure and its source
cannot drift apart.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
QUICKSTART = REPO / "examples" / "quickstart.py"
# every Markdown page whose links are checked
PAGES = [README, REPO / "CHANGELOG.md", REPO / "bench" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _render_results():
    spec = importlib.util.spec_from_file_location("render_results", REPO / "bench" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    found: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text()):
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(2))
        count = found.get(slug, 0)
        found[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move detail to docs/"
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    opening = "\n".join(lines[:first_section])
    assert first_section <= 30, "the README's opening (before its first section) stays within 30 lines"
    for command in ("./scripts/run-pipeline", "./scripts/run-tests"):
        at = next(i for i, line in enumerate(lines) if command in line)
        assert at < 15, f"{command} appears on line {at + 1}: the two commands open the README"
    for fact in ("Linux x86_64", "Python 3.11", "2 CPU cores", "sudo", "GB of disk"):
        assert fact in opening, f"the opening says what the commands need and take: {fact!r} is missing"


def test_readme_has_no_dated_prose_and_names_only_the_stable_flow_modules():
    text = README.read_text()
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", text), "dated figures belong in docs/results.md or CHANGELOG.md"
    named = set(re.findall(r"flows/(\w+)\.py", text))
    assert named <= {"cli", "pipeline", "explain"}, f"the README names internal flows/ modules: {sorted(named)}"


def test_readme_quick_start_is_examples_quickstart():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the quick start has a python code block"
    assert blocks[0] == QUICKSTART.read_text(), "the README's quick start differs from examples/quickstart.py"


def test_quickstart_runs_as_written_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(QUICKSTART)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top proponents" in done.stdout and "highest self-influence" in done.stdout
    assert not list(tmp_path.iterdir()), "the quick start writes nothing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for line in _prose(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{target} (no file {resolved.relative_to(REPO) if REPO in resolved.parents else resolved})")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{target} (no heading #{anchor} in {resolved.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_results_page_is_the_rendering_of_the_benchmarks_json():
    render_results = _render_results()
    expected = render_results.render()
    assert (REPO / "docs" / "results.md").read_text() == expected, \
        "docs/results.md is stale: run .venv/bin/python bench/render_results.py"
    assert render_results.headline_table() in README.read_text(), \
        "the README's results table is stale: paste .venv/bin/python bench/render_results.py --headline"


def test_every_benchmark_records_its_figures():
    records = {path.stem for path in (REPO / "bench" / "results").glob("*.json")}
    for script in sorted((REPO / "bench").glob("*.py")):
        source = script.read_text()
        if 'if __name__ == "__main__":' not in source or script.stem == "render_results":
            continue
        assert "add_json_option(parser, __file__)" in source and "write(args.json" in source, \
            f"{script.name} takes --json and writes its record"
        assert script.stem in records, f"bench/results/{script.stem}.json is missing"
