"""Recipes: the whole experiment in one validated, resolved YAML document.

A recipe is YAML with the sections below. ``base: other.yaml`` inherits from another recipe (path
relative to the recipe file, deep-merged, chains allowed) and ``--set a.b=c`` overrides any key
after inheritance, with the value parsed as YAML (``0.05`` → float, ``true`` → bool, ``[1, 2]`` →
list, ``null`` → None). The resolved :class:`Recipe` is the single source of truth of a run: every
knob the run uses is in it, and it is logged to MLflow.

The package by concern: :mod:`~medtricks.recipe.sections` (one model per section, every key with its
meaning), :mod:`~medtricks.recipe.schema` (:class:`Recipe`, the rules between sections, validation with
clear errors), :mod:`~medtricks.recipe.load` (files, ``base:`` inheritance, ``--set`` overrides, shipped
recipes) and :mod:`~medtricks.recipe.dump` (YAML, flat params, stable ids). Every name is importable from
``medtricks.recipe``.

Example::

    from medtricks.recipe import load_recipe
    recipe = load_recipe("recipes/quickstart.yaml", overrides=["optim.lr=0.05"])
    print(recipe.optim.lr)
"""

from __future__ import annotations

from medtricks.recipe.dump import dump_recipe, flatten_recipe, recipe_digest
from medtricks.recipe.load import (
    apply_overrides,
    find_recipe,
    load_recipe,
    load_run_recipe,
    resolve_recipe_dict,
    shipped_recipes_dir,
)
from medtricks.recipe.schema import Recipe, RecipeError, recipe_from_dict
from medtricks.recipe.sections import (
    RUN_WEIGHTS_PREFIX,
    SEED_LIMIT,
    AblationConfig,
    AuditConfig,
    CacheFrozenConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    ProgressiveResizeConfig,
    ResizerConfig,
    ScheduleConfig,
    SynthConfig,
    TrackingConfig,
    TrainConfig,
    UnlabeledConfig,
    VitConfig,
    check_run_name,
    check_weights_spec,
)
from medtricks.tricks.keys.bn_gamma import BnGammaConfig, GammaRuleConfig  # re-exported (the trick owns them)

__all__ = [
    "Recipe",
    "RecipeError",
    "load_run_recipe",
    "load_recipe",
    "recipe_from_dict",
    "resolve_recipe_dict",
    "apply_overrides",
    "flatten_recipe",
    "dump_recipe",
    "recipe_digest",
    "check_weights_spec",
    "RUN_WEIGHTS_PREFIX",
]
