"""The import graph of medtricks: no cycles among module-level imports, no hidden ones in functions.

Reads the source with ``ast`` (nothing is imported). An edge ``a -> b`` is a module-level
``import b`` / ``from b import x`` in ``a`` (``from pkg import submodule`` points at the
submodule); imports inside functions, classes and ``if TYPE_CHECKING:`` blocks are not edges.
Imports inside ``try``/``if`` at module level are (they run at import time).

To check more of the package, add its dotted name to ``CHECKED_PACKAGES`` (``"medtricks"`` checks
everything); to allow a function-level import, add it to ``LAZY_IMPORTS_ALLOWED`` with the reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "medtricks"

#: Packages (or modules) whose module-level imports among themselves must form no cycle.
CHECKED_PACKAGES = ["medtricks.models", "medtricks.audit"]

#: Packages in which a function may import a medtricks module only if listed in LAZY_IMPORTS_ALLOWED.
NO_LAZY_IMPORT_PACKAGES = ["medtricks.models", "medtricks.audit"]

#: (importing module, imported module): function-level imports kept on purpose.
LAZY_IMPORTS_ALLOWED = {
    # evaluate.plots imports matplotlib at import time; audit reports read/tabulated without figures
    # should not pay for it.
    ("medtricks.audit.report", "medtricks.evaluate.plots"),
}


# ------------------------------------------------------------------------------------ the graph
def _module_files() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (resolves ``from . import x``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.stmt) -> list[str]:
    """medtricks modules an import statement loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        source = _absolute(module, node)
        names = [source] + [f"{source}.{alias.name}" for alias in node.names]
    else:
        return []
    return [n for n in names if n in MODULES and n != module]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(module: str, body: list[ast.stmt]) -> set[str]:
    out: set[str] = set()
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update(_targets(module, node))
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                out |= _module_level_imports(module, node.body)
            out |= _module_level_imports(module, node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                out |= _module_level_imports(module, block)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            out |= _module_level_imports(module, node.body)
    return out


def _function_level_imports(module: str, tree: ast.Module) -> set[str]:
    out: set[str] = set()
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    out.update(_targets(module, node))
    return out


def _parse(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))


def _in(module: str, packages: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def import_graph(packages: list[str]) -> dict[str, set[str]]:
    """Module-level import edges among the modules of ``packages``."""
    nodes = [m for m in MODULES if _in(m, packages)]
    return {m: {t for t in _module_level_imports(m, _parse(m).body) if _in(t, packages)} for m in nodes}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), as cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


# ------------------------------------------------------------------------------------ tests
def test_checked_packages_exist():
    for package in CHECKED_PACKAGES + NO_LAZY_IMPORT_PACKAGES:
        assert package in MODULES, f"{package} is not a module under {ROOT / PACKAGE}"


def test_find_cycles_sees_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_submodule_imports_are_edges():
    tree = ast.parse("from . import weights\nfrom .names import ALIASES\nimport medtricks.errors\n")
    edges = _module_level_imports("medtricks.models.backbones", tree.body)
    assert {"medtricks.models.weights", "medtricks.models.names", "medtricks.errors"} <= edges


def test_no_import_cycles_among_module_level_imports():
    graph = import_graph(CHECKED_PACKAGES)
    assert graph, f"no modules found for {CHECKED_PACKAGES}"
    cycles = find_cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (edges: " + ", ".join(
        f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) + ")" for c in cycles)
    assert not cycles, f"import cycles among module-level imports: {detail}"


@pytest.mark.parametrize("package", NO_LAZY_IMPORT_PACKAGES)
def test_medtricks_imports_inside_functions_are_only_the_allowed_ones(package):
    found = {(m, t) for m in MODULES if _in(m, [package]) for t in _function_level_imports(m, _parse(m))}
    unexpected = sorted(found - LAZY_IMPORTS_ALLOWED)
    assert not unexpected, ("medtricks modules imported inside functions (move them to the top of the "
                            f"module, or list them in LAZY_IMPORTS_ALLOWED with the reason): {unexpected}")
