"""A resolved recipe written out: as YAML (``--dry-run``, the run's ``recipe.yaml``), as flat
``section.key`` params (MLflow), and as a short stable id (ablation and self-training folders)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from pydantic import BaseModel

from medtricks.recipe.schema import Recipe

__all__ = ["dump_recipe", "flatten_recipe", "recipe_digest"]


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what ``--dry-run`` prints and what MLflow stores)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def flatten_recipe(recipe: Recipe | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten to ``{"optim.lr": 0.1, ...}`` for MLflow params (lists become strings)."""
    data = recipe.model_dump(mode="json") if isinstance(recipe, BaseModel) else recipe
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_recipe(value, name + "."))
        else:
            flat[name] = value if not isinstance(value, (list, dict)) else str(value)
    return flat


#: Bump when a schema default changes meaning (see :func:`recipe_digest`). 2: defaults left out of the id.
_DIGEST_VERSION = 2


def recipe_digest(recipe: Recipe, *, ignore: tuple[tuple[str, ...], ...] = (), **extra: Any) -> str:
    """A short stable id of ``recipe`` without the keys in ``ignore`` (paths like ``("train", "progress")``)
    plus ``extra`` values: the same experiment gets the same id (ablation and self-training folders).

    Keys left at their schema default do not enter the id, so a medtricks release that adds a key (off by
    default) keeps every existing ablation resumable; a release that changes a default bumps
    ``_DIGEST_VERSION`` so that old and new experiments never share an id."""
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    for path in ignore:
        node = data
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    blob = json.dumps({"recipe": data, "digest_version": _DIGEST_VERSION, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
