"""The house's shape, enforced: ``flows/`` is layered (a folder imports only the folders below it), no module of
``flows/`` or ``influence/`` is in an import circle (function-local imports count: they hid circles before), and the
top level of ``flows/`` stays small (the flows, their tasks and the command line)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# who may import whom inside flows/ (besides a folder's own modules): each layer names the layers below it
BELOW = {
    "definition": set(),
    "guards": {"definition"},
    "experiment": {"definition", "guards"},
    "versioning": {"definition", "guards"},
    "reporting": {"definition", "guards", "experiment"},
    "stages": {"definition", "guards", "experiment", "versioning", "reporting"},
    "incremental": {"definition", "guards", "experiment", "versioning", "stages"},
    "answers": {"definition", "guards", "experiment", "versioning", "reporting", "stages", "incremental"},
    "cluster": {"definition", "guards", "experiment", "versioning", "reporting", "stages", "incremental"},
}
TOP_LEVEL_MAX_LINES, TOP_LEVEL_MAX_MODULES = 300, 10


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere (not under ``if TYPE_CHECKING:``), resolved to known modules."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def add(module: str) -> None:
        while module and module not in known:
            module = module.rpartition(".")[0]
        if module and module != name:
            found.add(module)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {**_modules("flows"), **_modules("influence")}
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_no_import_circle_in_flows_or_influence():
    cycles = _cycles(_graph())
    assert not cycles, f"import circles: {cycles}"


def test_influence_imports_no_platform_tool():
    for name, path in _modules("influence").items():
        text = path.read_text()
        for tool in ("prefect", "mlflow", "dvc", "flows"):
            assert f"import {tool}" not in text and f"from {tool}" not in text, f"{name} imports {tool}"


def test_each_folder_of_flows_imports_only_the_layers_below_it():
    graph, wrong = _graph(), []
    for name, imported in graph.items():
        parts = name.split(".")
        if parts[0] != "flows" or len(parts) < 3:  # the top level (flows, tasks, cli) may import any layer
            continue
        layer = parts[1]
        assert layer in BELOW, f"{name}: folder {layer!r} has no place in the layers of this test"
        for other in imported:
            other_parts = other.split(".")
            if other_parts[0] != "flows":
                continue
            if len(other_parts) < 3:
                wrong.append(f"{name} imports the top-level {other}")
            elif other_parts[1] != layer and other_parts[1] not in BELOW[layer]:
                wrong.append(f"{name} ({layer}) imports {other} ({other_parts[1]})")
    assert not wrong, "\n".join(wrong)


def test_the_top_level_of_flows_is_small():
    top = sorted((REPO / "flows").glob("*.py"))
    assert len(top) <= TOP_LEVEL_MAX_MODULES, [p.name for p in top]
    long = {p.name: n for p in top if (n := len(p.read_text().splitlines())) > TOP_LEVEL_MAX_LINES}
    assert not long, f"top-level modules over {TOP_LEVEL_MAX_LINES} lines: {long}"
    folders = {p.name for p in (REPO / "flows").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(BELOW), folders ^ set(BELOW)
