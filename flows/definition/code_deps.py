"""The code a stage runs: for its input fingerprint (:mod:`flows.incremental.stage_cache`) and its ``dvc.yaml`` deps.

Starting from the functions a stage's row names (its entry function and, for a score stage, its
``score`` callable), the analysis follows:

- inside :mod:`flows`, *functions*: a function's own compiled code, the functions and classes it
  refers to (globals, closures, and the body of a decorated function), and the modules it imports,
  also inside its body;
- elsewhere in the project (:mod:`influence`), *modules*: a module's file and every project module
  it imports anywhere in it (imports inside functions too), transitively. Importing ``a.b.c`` does
  not pull in the packages ``a`` and ``a.b`` (their ``__init__`` re-exports are not run code of the
  stage); importing a name from a package (``from influence.models import train``) does.

Two modules enter a fingerprint by value rather than by code: :mod:`flows.definition.settings` (the settings
the stage reads are part of the fingerprint) and :mod:`flows.definition.stage_table` (the stage's own row is).
Imports under ``if TYPE_CHECKING:`` are not followed. The result over-approximates what runs
(a module counts whole), so an edit re-runs every stage that may depend on it, and an edit of
``report.py`` or of an unrelated method re-runs nothing it cannot reach.
"""

from __future__ import annotations

import ast
import dis
import hashlib
import inspect
import textwrap
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGES = ("influence", "flows")
BY_VALUE = ("flows.definition.settings", "flows.definition.stage_table")


def _root() -> Path:
    return Path(__file__).resolve().parents[2]


def module_file(module: str, root: Path | None = None) -> Path | None:
    """The source file of a project module (``a/b.py`` or ``a/b/__init__.py``), or ``None``."""
    base = (root or _root()).joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _in_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES and module not in BY_VALUE


def _imported(tree: ast.AST, package: str, root: Path) -> set[str]:
    """Project modules imported anywhere in ``tree`` (not under ``if TYPE_CHECKING:``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if module_file(sub, root) is not None else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if _in_project(m) and module_file(m, root) is not None}


@lru_cache(maxsize=None)
def _module_imports(path: Path, module: str, root: Path) -> frozenset[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return frozenset(_imported(ast.parse(path.read_text()), package, root))


def module_closure(modules: set[str], root: Path | None = None) -> set[str]:
    """``modules`` and every project module they import, transitively."""
    root = root or _root()
    done: set[str] = set()
    todo = [m for m in modules if _in_project(m)]
    while todo:
        module = todo.pop()
        path = module_file(module, root)
        if module in done or path is None:
            continue
        done.add(module)
        todo.extend(_module_imports(path, module, root) - done)
    return done


def code_digest(code: types.CodeType) -> str:
    """sha256 of a code object's bytecode, constants (nested code included) and names, not its line numbers."""
    digest = hashlib.sha256()
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode())
    for const in code.co_consts:
        digest.update(code_digest(const).encode() if isinstance(const, types.CodeType) else repr(const).encode())
    return digest.hexdigest()


def _function_imports(function: types.FunctionType, root: Path) -> set[str]:
    try:
        source = textwrap.dedent(inspect.getsource(function))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):  # a lambda inside a larger expression: parse its line alone
        return set()
    return _imported(tree, function.__module__.rpartition(".")[0], root)


def _project_module(value: Any) -> str | None:
    module = getattr(value, "__name__", None) if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
    return module if isinstance(module, str) and _in_project(module) else None


def _names(code: types.CodeType) -> set[str]:
    """Global names a code object and the code nested in it (inner functions, lambdas) load."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def _plain(value: Any) -> bool:
    """A constant whose ``repr`` is its value (no object addresses): numbers, strings and containers of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list, frozenset)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


def function_closure(functions: list[Any], root: Path | None = None) -> tuple[dict[str, str], set[str]]:
    """What the given callables run: ``({function: code digest} inside flows, {project modules})``.

    Args:
        functions: entry functions (lambdas, decorated functions, functions of :mod:`flows`).

    Returns:
        The digests of every :mod:`flows` function reached (by module and qualified name, plus
        the plain constants they read) and the module closure of everything else reached.
    """
    root = root or _root()
    digests: dict[str, str] = {}
    modules: set[str] = set()
    todo = list(functions)
    while todo:
        function = todo.pop()
        if not isinstance(function, types.FunctionType):
            module = _project_module(function)
            if module:
                modules.add(module)
            continue
        # the module whose file holds the code (a decorator's wrapper lives with the decorator, whatever __module__ says)
        name = f"{function.__globals__.get('__name__', function.__module__)}:{function.__code__.co_qualname}"
        if name in digests:
            continue
        digests[name] = code_digest(function.__code__)
        modules.update(_function_imports(function, root))
        cells = [cell.cell_contents for cell in function.__closure__ or () if _filled(cell)]
        found = [function.__globals__[n] for n in sorted(_names(function.__code__)) if n in function.__globals__]
        for value in [*found, *cells, *([function.__wrapped__] if hasattr(function, "__wrapped__") else [])]:
            if value is None:
                continue
            if isinstance(value, types.FunctionType) and value.__module__.split(".")[0] == "flows":
                todo.append(value)
            elif (module := _project_module(value)) is not None:
                modules.add(module)
            elif _plain(value):
                value_digest = hashlib.sha256(repr(value).encode()).hexdigest()
                digests[f"{name}={value_digest[:16]}"] = value_digest
    return digests, module_closure(modules, root)


def files_digest(modules: set[str], root: Path | None = None) -> dict[str, str]:
    """``{relative file: sha256}`` of the modules' source files."""
    root = root or _root()
    out = {}
    for module in sorted(modules):
        path = module_file(module, root)
        if path is not None:
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def code_files(functions: list[Any], root: Path | None = None) -> list[str]:
    """The source files (relative to the project) of everything :func:`function_closure` reaches."""
    root = root or _root()
    digests, modules = function_closure(functions, root)
    modules |= {name.split(":")[0] for name in digests}
    files = {module_file(m, root) for m in modules if m.split(".")[0] in PACKAGES}
    return sorted(str(f.relative_to(root)) for f in files if f is not None)


__all__ = ["code_digest", "code_files", "files_digest", "function_closure", "module_closure", "module_file"]
