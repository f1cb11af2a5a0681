"""The import graph of medtricks: no cycles among module-level imports, no hidden ones in functions,
and the orchestration on top is never imported by the layers below it.

Reads the source with ``ast`` (nothing is imported). An edge ``a -> b`` is a module-level
``import b`` / ``from b import x`` in ``a`` (``from pkg import submodule`` points at the
submodule; ``from pkg import name`` of a package that loads ``name`` lazily through its ``_EXPORTS``
table (PEP 562) points at the module that defines ``name``, which that import loads); imports inside
functions, classes and ``if TYPE_CHECKING:`` blocks are not edges. Imports inside ``try``/``if`` at
module level are (they run at import time).

To allow a function-level import, add it to ``LAZY_IMPORTS_ALLOWED`` with the reason: an import
time that a lighter command must not pay, or a behaviour that needs the import to happen late.
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "medtricks"

#: Packages (or modules) whose module-level imports among themselves must form no cycle.
CHECKED_PACKAGES = ["medtricks"]

#: Packages in which a function may import a medtricks module only if listed in LAZY_IMPORTS_ALLOWED.
NO_LAZY_IMPORT_PACKAGES = ["medtricks"]

#: Modules exempt from that rule, with the reason.
LAZY_IMPORT_MODULES = {
    "medtricks.cli": "`medtricks --help` answers in ~0.2 s without torch: each command imports what it runs"
}

#: (importing module, imported module): function-level imports kept on purpose, with the reason.
LAZY_IMPORTS_ALLOWED = {
    (
        "medtricks.audit.report",
        "medtricks.evaluate.plots",
    ): "evaluate.plots imports matplotlib at import time; audit reports read or tabulated without "
    "figures do not pay for it",
    (
        "medtricks.ablation.table_format",
        "medtricks.evaluate.plots",
    ): "matplotlib only for the ablation forest plot; `medtricks compare` prints tables only",
    (
        "medtricks.tracking",
        "medtricks.tracking.mlflow_store",
    ): "mlflow costs 1-2 s to import; a tracking.backend none run (and every reader of a local run "
    "store) must not pay it",
    (
        "medtricks.tracking",
        "medtricks.tracking.mlflow_model",
    ): "the same: mlflow.pyfunc only when an MLflow model folder is written (export --format mlflow)",
    (
        "medtricks.posthoc.load",
        "medtricks.tracking.mlflow_store",
    ): "the same: mlflow only when a run id is looked up in MLflow",
    (
        "medtricks.gamma.bn",
        "medtricks.models",
    ): "gamma_preview falls back to bare timm when medtricks.models cannot be imported "
    "(tests/gamma/test_bn_gamma_strategy.py); an import at the top would run before that check",
    ("medtricks.gamma.bn", "medtricks.models.backbones"): "the same import (create_model's module)",
    # A built-in trick's keys (tricks/keys/<name>.py) load its code (tricks/<name>.py) when a run builds it
    # (Trick.implementation): that code imports torch, timm, scikit-learn, and reading a recipe must not pay
    # for them -- `medtricks run recipes/quickstart.yaml --dry-run` took 4.5 s of CPU with them, 0.35 s without.
    **{
        (f"medtricks.tricks.keys.{name}", f"medtricks.tricks.{name}"): "torch, timm or scikit-learn only when a "
        "run builds the trick; a recipe is read without them (tests/recipe/test_recipe_parse_cost.py)"
        for name in (
            "adversarial",
            "bn_gamma",
            "class_balance",
            "distill",
            "drloc",
            "ema",
            "fixmatch",
            "mpl",
            "layerscale_gamma",
            "mixup",
            "pseudo_label",
            "reinit_late",
        )
    },
}

#: Function-level imports with no import-time reason, left for their owners to move to the top (then
#: delete the entry). Tolerated like LAZY_IMPORTS_ALLOWED meanwhile; do not add to this list.
NOT_YET_TOP_LEVEL: set = set()

#: The orchestration on top: it may import every layer below; nothing below imports it, not even
#: inside a function (data flows one way: recipe -> data -> models -> tricks -> train -> evaluate
#: -> audit, with tracking and the run folder beside them). Every other module is below; a new
#: orchestration module belongs in this list.
TOP_LAYER = [
    "medtricks.cli",
    "medtricks.ablation",
    "medtricks.run",
    "medtricks.posthoc",
    "medtricks.posthoc.ensemble",
    "medtricks.posthoc.load",
    "medtricks.posthoc.predict",
    "medtricks.posthoc.export",
    "medtricks.posthoc.representations",
]
TOP_LAYER += ["medtricks.self_train"]  # issue 17: Noisy Student rounds (runs, a parent run, a state file)
TOP_LAYER += [
    "medtricks.self_train_plan",
    "medtricks.self_train_state",
    "medtricks.self_train_result",
]  # issue 34: self_train.py split by concern (round plan, state file, result)
TOP_LAYER += ["medtricks.__main__"]  # issue 18: `python -m medtricks` / `torchrun -m medtricks` (calls cli.main)
TOP_LAYER += ["medtricks.deploy.calibrate", "medtricks.deploy.adapt"]  # issue 30: site calibration / adaptation
TOP_LAYER += [
    "medtricks.posthoc.attention"
]  # issue 32: `medtricks attention` (a trained run, image files, its run store)
TOP_LAYER += ["medtricks.deploy.finetune"]  # issue 30: fine-tuning on a labelled site sample (cross-fitted runs)
TOP_LAYER += ["medtricks.deploy.finetune_folds"]  # its fold and final run folders (resumable runs)
TOP_LAYER += ["medtricks.deploy.finetune_setup", "medtricks.deploy.finetune_final"]  # its checks/plan, its final run
TOP_LAYER += [
    "medtricks.run.prepare",
    "medtricks.run.resume",
    "medtricks.run.inputs",
    "medtricks.run.finish",
]  # issue 34: run.py split by concern (medtricks.run covers them too)


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


def _lazy_exports(package: str) -> dict[str, str]:
    """``name -> defining module`` of a package whose ``__getattr__`` loads names from an ``_EXPORTS``
    table (values: a dotted module, or a submodule of the package); ``{}`` for other modules."""
    if not _is_package(package):
        return {}
    for node in _parse(package).body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Dict)
            and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
        ):
            table = ast.literal_eval(node.value)
            return {
                name: f"{package}.{where}" if f"{package}.{where}" in MODULES else where
                for name, where in table.items()
            }
    return {}


def _targets(module: str, node: ast.stmt) -> list[str]:
    """medtricks modules an import statement loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        source = _absolute(module, node)
        exports = _lazy_exports(source) if source in MODULES else {}
        names = [source] + [f"{source}.{alias.name}" for alias in node.names]
        names += [exports[alias.name] for alias in node.names if alias.name in exports]
    else:
        return []
    return [n for n in names if n in MODULES and n != module]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


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


def _all_imports(module: str, tree: ast.Module) -> set[str]:
    """Every medtricks module the file imports anywhere: top, functions, classes, TYPE_CHECKING."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update(_targets(module, node))
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
    for package in CHECKED_PACKAGES + NO_LAZY_IMPORT_PACKAGES + TOP_LAYER + list(LAZY_IMPORT_MODULES):
        assert package in MODULES, f"{package} is not a module under {ROOT / PACKAGE}"


def test_find_cycles_sees_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_submodule_imports_are_edges():
    tree = ast.parse("from . import weights\nfrom .model_names import ALIASES\nimport medtricks.errors\n")
    edges = _module_level_imports("medtricks.models.backbones", tree.body)
    assert {"medtricks.models.weights", "medtricks.models.model_names", "medtricks.errors"} <= edges


def test_names_a_package_loads_lazily_are_edges_to_their_module():
    tree = ast.parse(
        "from medtricks.data import load_card\nfrom medtricks.evaluate import compute_metrics\n"
        "from medtricks import run_recipe\n"
    )
    edges = _module_level_imports("medtricks.posthoc", tree.body)
    assert {"medtricks.data", "medtricks.data.cards", "medtricks.evaluate.metrics", "medtricks.run"} <= edges


def test_no_import_cycles_among_module_level_imports():
    graph = import_graph(CHECKED_PACKAGES)
    assert graph, f"no modules found for {CHECKED_PACKAGES}"
    cycles = find_cycles(graph)
    detail = "; ".join(
        " <-> ".join(c) + " (edges: " + ", ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) + ")"
        for c in cycles
    )
    assert not cycles, f"import cycles among module-level imports: {detail}"


def test_medtricks_imports_inside_functions_are_only_the_allowed_ones():
    found = {
        (m, t)
        for m in MODULES
        if _in(m, NO_LAZY_IMPORT_PACKAGES) and not _in(m, list(LAZY_IMPORT_MODULES))
        for t in _function_level_imports(m, _parse(m))
    }
    unexpected = sorted(found - set(LAZY_IMPORTS_ALLOWED) - NOT_YET_TOP_LEVEL)
    assert not unexpected, (
        "medtricks modules imported inside functions (move them to the top of the "
        f"module, or list them in LAZY_IMPORTS_ALLOWED with the reason): {unexpected}"
    )


def _lower_layers() -> list[str]:
    return [m for m in MODULES if m != PACKAGE and not _in(m, TOP_LAYER)]


def test_the_lower_layers_are_the_rest_of_the_package():
    lower = _lower_layers()
    for package in (
        "medtricks.evaluate",
        "medtricks.data",
        "medtricks.models",
        "medtricks.train",
        "medtricks.tricks",
        "medtricks.audit",
        "medtricks.tracking",
        "medtricks.recipe",
        "medtricks.rundir",
    ):
        assert package in lower


def test_lower_layers_never_import_the_orchestration():
    found = sorted((m, t) for m in _lower_layers() for t in _all_imports(m, _parse(m)) if _in(t, TOP_LAYER))
    assert not found, (
        f"modules below the orchestration must not import {', '.join(TOP_LAYER)} (not even inside "
        f"a function or for type checking): {found}"
    )
