"""The suite's own layout (issue 34): test files sit in the folder of the layer they cover, their names are
unique (pytest's default "prepend" import mode imports each by its basename), and no test file imports another
or a conftest -- shared helpers reach the tests as fixtures (tests/conftest.py, tests/fixtures/, a folder's
conftest.py). Reads the files with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
TEST_FILES = sorted(TESTS.rglob("test_*.py"))


def test_test_files_are_in_layer_folders_with_unique_names():
    assert TEST_FILES, "no test file found"
    assert [p.name for p in TESTS.glob("test_*.py")] == [], "a test file belongs in the folder of what it covers"
    clashes = [name for name, n in Counter(p.name for p in TEST_FILES).items() if n > 1]
    assert clashes == [], f"test file names must be unique across tests/: {clashes}"


def test_no_test_file_imports_another_or_a_conftest():
    imports = []
    for path in TEST_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                first = name.split(".")[0]
                if first in ("conftest", "tests", "fixtures") or first.startswith("test_"):
                    imports.append(f"{path.relative_to(TESTS)}:{node.lineno}: {name}")
    assert imports == [], "share a helper through a fixture instead:\n" + "\n".join(imports)
