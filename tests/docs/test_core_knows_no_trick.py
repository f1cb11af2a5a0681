"""The core knows no trick by name: the run orchestration (``medtricks/run/``), the run folder
(``rundir.py``) and the training loop (``train/engine.py``) reach the tricks only through the points
of ``medtricks.tricks.base.Trick`` -- a trick's report, sampler, priors and checkpoint state are the trick's.

Reads the source with ``ast`` (nothing is imported), like ``tests/docs/test_import_graph.py``. The names are
those of the plug-ins: every ``Trick`` subclass in ``medtricks/tricks/`` that owns recipe keys under
``tricks:`` (its ``fields``), and the plug-in file names. The registered tricks without ``fields``
(``warmup``, ``amp``, ``resizer``...) only label core settings (``schedule.warmup_epochs``,
``model.resizer``) for ``ablate`` and tags, so the core spells those settings as its own.

A name counts when it is a string literal that holds it as a word (``"bn_gamma"``, ``"tricks.ema"``,
``"bn_gamma_report.csv"``; docstrings are prose and not checked), an attribute, a variable or keyword
name made of it (``recipe.tricks.class_balance``, ``run.bn_gamma_report``), or a module it imports from.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRICKS = ROOT / "medtricks" / "tricks"
#: The core modules that must name no trick (a package: every module in it).
CORE = ["medtricks/run", "medtricks/run.py", "medtricks/rundir.py", "medtricks/train/engine.py"]
#: Files of tricks/ that are not plug-ins.
NOT_PLUGINS = {"__init__", "base", "registry", "settings"}


def _class_attribute(cls: ast.ClassDef, attribute: str):
    for node in cls.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attribute for t in node.targets):
            return node.value
    return None


def plugin_names() -> set[str]:
    """Names of the plug-in tricks in medtricks/tricks/ (``name = "..."`` of classes with ``fields``) and
    the plug-in files' names."""
    names = {path.stem for path in TRICKS.glob("*.py") if path.stem not in NOT_PLUGINS}
    for path in TRICKS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                name, fields = _class_attribute(node, "name"), _class_attribute(node, "fields")
                if isinstance(name, ast.Constant) and isinstance(fields, ast.Dict) and fields.keys:
                    names.add(name.value)
    return names


def core_files() -> list[Path]:
    files = []
    for entry in CORE:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
    return files


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                out.add(id(first.value))
    return out


def names_spelled(source: str, names: set[str]) -> list[tuple[int, str, str]]:
    """``(line, what, name)`` for every trick name the source spells outside docstrings and comments."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    word = {name: re.compile(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])") for name in names}
    found = []

    def check(node, text: str, what: str) -> None:
        for name, pattern in word.items():
            if pattern.search(text):
                found.append((getattr(node, "lineno", 0), f"{what} {text!r}", name))

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            check(node, node.value, "string")
        elif isinstance(node, ast.Attribute):
            check(node, node.attr, "attribute")
        elif isinstance(node, ast.Name):
            check(node, node.id, "name")
        elif isinstance(node, ast.keyword) and node.arg:
            check(node, node.arg, "keyword")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            check(node, node.name, "definition")
        elif isinstance(node, ast.ImportFrom) and node.module:
            check(node, node.module, "import from")
            for alias in node.names:
                check(node, alias.name, "import")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                check(node, alias.name, "import")
    return sorted(found)


def test_the_plugin_names_are_found():
    names = plugin_names()
    assert {"bn_gamma", "layerscale_gamma", "ema", "class_balance", "mixup", "drloc"} <= names
    assert not {"warmup", "amp", "resizer"} & names  # labels of core settings, not plug-ins


def test_the_check_sees_a_name_in_strings_attributes_and_imports():
    source = (
        '"""Docstrings may mention bn_gamma."""\n'
        "from medtricks.tricks.class_balance import x\n"
        'a = [t for t in tricks if t.name == "bn_gamma"]\n'
        "b = recipe.tricks.ema\n"
        "c = run.layerscale_gamma_report\n"
        'd = f"tricks.mixup_alpha={v}"\n'
        'e = recipe.schema  # "ema" inside a word is not the name\n'
    )
    found = {(line, name) for line, _, name in names_spelled(source, plugin_names())}
    assert found == {(2, "class_balance"), (3, "bn_gamma"), (4, "ema"), (5, "layerscale_gamma"), (6, "mixup")}


def test_run_rundir_and_the_engine_name_no_trick():
    names = plugin_names()
    files = core_files()
    assert {f.name for f in files} >= {"rundir.py", "engine.py"} and len(files) > 2  # and the run's modules
    spelled = [
        f"{path.relative_to(ROOT)}:{line}: {what} names trick {name!r}"
        for path in files
        for line, what, name in names_spelled(path.read_text(encoding="utf-8"), names)
    ]
    assert not spelled, (
        "the core must reach tricks through their points (medtricks/tricks/base.py), not by "
        "name:\n" + "\n".join(spelled)
    )
