"""Reading a recipe is light, and every trick key says what it means.

Parsing a recipe imports the trick registry, which builds the ``tricks:`` section from every built-in trick; the
tricks whose code needs torch, timm or scikit-learn are declared apart from it (``medtricks/tricks/keys/``), so
``medtricks run RECIPE --dry-run`` and everything else that only reads a recipe stays well under a second. The
recipe reference (docs/gen_pages.py) takes each key's meaning from the same schema: the trick registry's
``tricks:`` model and its sections.
"""

import importlib.util
import io
import json
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from medtricks.tricks.base import find_trick, registered_tricks
from medtricks.tricks.registry import tricks_config_model

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "torchvision", "sklearn", "mlflow", "monai", "matplotlib")


def _heavy_modules_after(code: str) -> list[str]:
    """The heavy libraries in ``sys.modules`` after ``code`` runs in a fresh interpreter (in the repository root)."""
    script = f"import json, sys\n{code}\nprint(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_loading_a_recipe_imports_no_heavy_library():
    code = "from medtricks.recipe import load_recipe\nload_recipe('recipes/quickstart.yaml')"
    assert _heavy_modules_after(code) == []


def test_the_dry_run_and_the_ablation_names_import_no_heavy_library():
    code = (
        "import contextlib, io\n"
        "from medtricks.cli import main\n"
        "from medtricks.tricks.registry import ablation_names\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['run', 'recipes/quickstart.yaml', '--dry-run'])\n"
        "ablation_names()"
    )
    assert _heavy_modules_after(code) == []


def test_each_declared_trick_builds_from_its_own_module():
    """A trick declared in tricks/keys/ is built from the subclass in the trick's module, with the same name and
    keys; a trick with no heavy code is its own implementation."""
    for cls in registered_tricks():
        impl = cls.implementation()
        assert issubclass(impl, cls) and impl.implementation() is impl, cls
        if impl is not cls:
            assert cls.__module__ == f"medtricks.tricks.keys.{cls.name}"
            assert impl.__module__ == f"medtricks.tricks.{cls.name}"
            assert (impl.name, impl.fields, impl.ablation) == (cls.name, cls.fields, cls.ablation)
    ema = find_trick("ema").implementation()
    assert ema is not find_trick("ema")
    subclass = type("EmaVariant", (ema,), {"name": "ema_variant"})
    assert subclass.implementation() is subclass  # a plug-in built on a built-in trick acts as itself


# ---------------------------------------------------------------------------------------- meanings
def _sections(model: type[BaseModel], prefix: str):
    """(dotted key, field, section model or None) of every key of ``model`` and of the sections nested in it."""
    for name, field in model.model_fields.items():
        nested = [
            sub
            for sub in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(sub, type) and issubclass(sub, BaseModel)
        ]
        yield prefix + name, field, (nested[0] if nested else None)
        for sub in nested:
            yield from _sections(sub, f"{prefix}{name}.")


def test_every_trick_key_says_what_it_means():
    """Every key of the ``tricks:`` section (the registry's model, as the reference reads it) has a description,
    and every trick section a docstring: the reference's "meaning" column and section text."""
    keys = list(_sections(tricks_config_model(), "tricks."))
    assert {"tricks.label_smoothing", "tricks.bn_gamma.rules.value", "tricks.drloc.lambda"} <= {k for k, _, _ in keys}
    missing = sorted(key for key, field, _ in keys if not (field.description or "").strip())
    assert not missing, f"trick keys without a description (Field(description=...)): {missing}"
    undocumented = sorted(
        key for key, _, section in keys if section is not None and not (section.__doc__ or "").strip()
    )
    assert not undocumented, f"trick sections without a docstring: {undocumented}"
    silent = sorted(cls.name for cls in registered_tricks() if not cls.ablation and not (cls.__doc__ or "").strip())
    assert not silent, f"tricks without ablation names need a docstring (the reference's 'what it does'): {silent}"


def _recipe_reference() -> str:
    """docs/gen_pages.py's recipe reference, generated without mkdocs (its build-time module faked)."""
    fake = types.ModuleType("mkdocs_gen_files")
    fake.open = lambda *args, **kwargs: io.StringIO()
    saved = sys.modules.get("mkdocs_gen_files")
    sys.modules["mkdocs_gen_files"] = fake
    try:
        spec = importlib.util.spec_from_file_location("gen_pages_for_tricks", ROOT / "docs" / "gen_pages.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("mkdocs_gen_files", None)
        else:
            sys.modules["mkdocs_gen_files"] = saved
    return module.recipe_reference()


def test_the_recipe_reference_says_what_each_trick_key_means():
    reference = _recipe_reference()
    tricks = reference[reference.index("## `tricks`") :]
    rows = {line.split("`")[1]: line for line in tricks.splitlines() if line.startswith("| `tricks.")}
    assert len(rows) > 60
    empty = sorted(key for key, line in rows.items() if re.search(r"\|\s*\|\s*$", line))
    assert not empty, f"recipe reference rows without a meaning: {empty}"
    headings = re.findall(r"### `(tricks\.[\w.]+)`\n\n(.*)\n", tricks)
    assert headings and all(text.strip() for _, text in headings), headings
    amp = next(line for line in tricks.splitlines() if line.startswith("| `amp` |"))
    assert not amp.rstrip().endswith("| |"), amp
