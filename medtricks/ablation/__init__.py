"""Multi-seed ablations with confidence intervals, and run comparison tables.

Names load on first use (PEP 562): ``import medtricks.ablation`` stays cheap (no torch, no mlflow).

Example::

    from medtricks.recipe import load_recipe
    from medtricks.ablation import make_variants, run_ablation, compare_runs

    recipe = load_recipe("recipes/ablation_bag_of_tricks.yaml")
    print(make_variants(recipe, ["warmup", "bn_gamma=zero_late"]))
    result = run_ablation(recipe, ["warmup", "bn_gamma=zero_late"], seeds=3)
    result = run_ablation(recipe, ["warmup"], seeds=3, executor="ray", cpus_per_run=1)  # children on Ray
    print(compare_runs(experiment=recipe.experiment.name, group_by="variant"))
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TRICKS": "variants",
    "make_variants": "variants",
    "trick_overrides": "variants",
    "variant_recipe": "variants",
    "AblationResult": "result",
    "run_ablation": "runner",
    "ablation_id": "children",
    "ExecutorSettings": "executors",
    "compare_runs": "compare",
    "summarize_groups": "seed_stats",
    "image_bootstrap_delta": "table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medtricks.ablation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"medtricks.ablation.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
