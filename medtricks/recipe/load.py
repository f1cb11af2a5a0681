"""Loading a recipe file: the YAML read strictly, its ``base:`` chain merged, ``--set`` overrides applied,
then validated (:func:`~medtricks.recipe.schema.recipe_from_dict`). A bare name such as ``quickstart`` is
looked up among the shipped recipes; a stored run's recipe is loaded without importing its plug-ins."""

from __future__ import annotations

from pathlib import Path

import yaml

from medtricks._shipped import shipped_dir
from medtricks._yaml import read_yaml_text, strict_load
from medtricks.recipe.schema import Recipe, RecipeError, recipe_from_dict
from medtricks.tricks.registry import ignoring_recipe_plugins

__all__ = [
    "load_recipe",
    "load_run_recipe",
    "resolve_recipe_dict",
    "apply_overrides",
    "find_recipe",
    "shipped_recipes_dir",
]


# ---------------------------------------------------------------------------------- read / merge
def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:  # duplicate keys and anchors/aliases are refused (medtricks/_yaml.py)
        data = strict_load(read_yaml_text(path), "recipe", name=str(path))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve_recipe_dict(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and its ``base:`` chain into one merged dict (no validation yet)."""
    path = Path(path).expanduser().resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise RecipeError(f"recipe inheritance cycle: {cycle}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for entry in bases:
        if not isinstance(entry, str):
            raise RecipeError(f"{path}: 'base' must be a file name or a list of them, got {entry!r}")
        base_path = (path.parent / entry).resolve()
        if not base_path.is_file():
            raise RecipeError(f"{path}: base recipe {entry!r} not found (looked at {base_path})")
        merged = _deep_merge(merged, resolve_recipe_dict(base_path, (*_chain, path)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b=c`` overrides to a recipe dict; values are parsed as YAML scalars/lists."""
    data = _deep_merge({}, data)
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.05")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise RecipeError(f"--set {item!r}: the key must be dotted section.key, e.g. optim.lr")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {item!r}: value {raw!r} is not valid YAML: {err}") from err
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return data


# ------------------------------------------------------------------------------------------ load
def shipped_recipes_dir() -> Path:
    """``recipes/`` of the checkout, else the copy a regular install puts in ``<prefix>/share/medtricks``."""
    return shipped_dir("recipes", Path(__file__).resolve().parents[2])


def find_recipe(path: str | Path) -> Path:
    """``path`` if it exists; a bare name such as ``quickstart`` is looked up among the shipped recipes."""
    candidate = Path(path).expanduser()
    if candidate.is_file() or candidate.parent != Path("."):
        return candidate
    shipped = shipped_recipes_dir()
    for name in (candidate.name, f"{candidate.name}.yaml"):
        if (shipped / name).is_file():
            return shipped / name
    names = sorted(p.stem for p in shipped.glob("*.yaml")) if shipped.is_dir() else []
    raise RecipeError(
        f"recipe file not found: {candidate} (nor a shipped recipe of that name in {shipped}; "
        f"shipped: {', '.join(names) or 'none'})"
    )


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file, resolve its ``base:`` chain, apply ``--set`` overrides and validate.

    ``path`` may also be a shipped recipe's name (``"quickstart"``), see :func:`find_recipe`.

    Relative data paths stay relative to the working directory (where ``medtricks run`` is
    started), as users expect from a command line tool.
    """
    data = resolve_recipe_dict(find_recipe(path))
    data = apply_overrides(data, overrides)
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return recipe_from_dict(data, source)


def load_run_recipe(path: str | Path) -> Recipe:
    """A stored run's ``recipe.yaml`` (a run folder you may have received, or a tracking server's copy).

    Its ``experiment.plugins`` list is never imported, even with ``--allow-plugins``: loading a model
    must not run code that a file beside it names. Import a plug-in you trust yourself first (``import
    my_lab.tricks``; on the command line ``--plugin``).
    """
    with ignoring_recipe_plugins():
        try:
            return load_recipe(path)
        except RecipeError as err:
            try:
                listed = (yaml.safe_load(Path(path).read_text()) or {}).get("experiment", {}).get("plugins")
            except Exception:  # noqa: BLE001 - the recipe error above says what is wrong with the file
                listed = None
            if not listed:
                raise
            raise RecipeError(
                f"{err}\n  the run's recipe names plug-ins {listed}, which medtricks never imports from "
                "a stored run; if you trust them, name them yourself with --plugin"
            ) from None
