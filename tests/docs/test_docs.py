"""The README is the front door and the docs pages are the long form: links resolve, the README stays
short, and the generated recipe reference covers every key and trick (CI also runs `mkdocs build --strict`)."""

import importlib.util
import io
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def _relative_links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are not links
    for target, _ in LINK.findall(text):
        if not re.match(r"[a-z]+://", target):
            yield target


def test_the_readme_is_a_front_door_and_its_links_resolve():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 300
    for target in _relative_links(readme):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    for command in ("run", "ablate", "evaluate", "predict", "export", "audit", "cka", "compare", "self-train"):
        assert f"`medtricks {command}" in readme.read_text(), f"the command table lacks {command}"


def test_docs_pages_link_only_to_pages_and_images_that_exist():
    generated = {"index.md", "changelog.md", "reference.md", "api.md"}  # written by docs/gen_pages.py
    for page in (ROOT / "docs").rglob("*.md"):
        for target in _relative_links(page):
            resolved = (page.parent / target).resolve()
            assert resolved.exists() or resolved.name in generated, f"{page.relative_to(ROOT)} links to {target}"


def _generator():
    fake = types.ModuleType("mkdocs_gen_files")  # the build-time module, not needed to call the functions

    class _Sink(io.StringIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake.open = lambda *args, **kwargs: _Sink()
    saved = sys.modules.get("mkdocs_gen_files")
    sys.modules["mkdocs_gen_files"] = fake
    try:
        spec = importlib.util.spec_from_file_location("gen_pages", ROOT / "docs" / "gen_pages.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("mkdocs_gen_files", None)
        else:
            sys.modules["mkdocs_gen_files"] = saved
    return module


def test_the_recipe_reference_lists_every_key_and_trick():
    from medtricks.recipe import flatten_recipe, load_recipe
    from medtricks.tricks.registry import ablation_names

    reference = _generator().recipe_reference()
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    for key in flatten_recipe(recipe):
        if key.startswith("tricks.") and key.count(".") > 1:  # nested trick settings: their section is listed
            key = key.rsplit(".", 1)[0]
        assert f"`{key}" in reference, f"the recipe reference lacks {key}"
    for name in ablation_names():
        assert f"`{name}`" in reference


def test_the_recipe_reference_says_what_each_key_outside_tricks_means():
    """Every key row of the reference, outside ``tricks``, has a non-empty "meaning" column (the schema's
    descriptions; tests/recipe/test_recipe.py checks that the schema has them)."""
    reference = _generator().recipe_reference()
    rows = {line.split("`")[1]: line for line in reference.splitlines() if line.startswith("| `")}
    keys = [key for key in rows if "." in key and not key.startswith("tricks.")]  # not the tricks' table
    assert len(keys) > 50
    empty = [key for key in keys if re.search(r"\|\s*\|\s*$", rows[key])]
    assert not empty, f"recipe reference rows without a meaning: {empty}"
