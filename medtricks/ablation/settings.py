"""``medtricks ablate``'s settings: command-line values over the recipe's ``ablation:`` section over its
defaults. The defaults have one home, the recipe schema (:class:`medtricks.recipe.AblationConfig`):
:data:`ABLATION_DEFAULTS` and :func:`~medtricks.ablation.runner.run_ablation`'s keyword defaults read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from medtricks.errors import ConfigError
from medtricks.recipe import AblationConfig, Recipe

__all__ = ["ABLATION_DEFAULTS", "ablation_settings"]

#: The ``ablation:`` section at its schema defaults (seeds 5, cumulative, val/auroc, 1 job, paired t, local).
ABLATION_DEFAULTS = AblationConfig()
# The keys ablation_settings fills in: tricks has no default (the caller's or the recipe's), resplit is read
# from the recipe by run_ablation itself (it changes the children's recipes).
_SETTINGS_DEFAULTS = {
    name: getattr(ABLATION_DEFAULTS, name) for name in AblationConfig.model_fields if name not in ("tricks", "resplit")
}


def ablation_settings(
    recipe: Recipe,
    *,
    tricks: Optional[str | Sequence[str]] = None,
    seeds: Optional[int | Sequence[int]] = None,
    mode: Optional[str] = None,
    metric: Optional[str] = None,
    jobs: Optional[int] = None,
    test: Optional[str] = None,
    executor: Optional[str] = None,
    address: Optional[str] = None,
    cpus_per_run: Optional[float] = None,
    gpus_per_run: Optional[float] = None,
    retries: Optional[int] = None,
    until_ci: Optional[float] = None,
    max_seeds: Optional[int] = None,
    seed_step: Optional[int] = None,
    boundary: Optional[str] = None,
) -> dict[str, Any]:
    """Keyword arguments for :func:`~medtricks.ablation.runner.run_ablation`: command-line values over the
    recipe's ``ablation:`` section over the defaults (seeds 5, cumulative, val/auroc, 1 job, paired t, the local
    executor).

    ``until_ci`` / ``max_seeds`` / ``seed_step`` / ``boundary`` (seeds until the answer is clear, see
    :mod:`medtricks.ablation.sequential`) come from the caller only; they are passed through as given.

    ``tricks`` may be a comma-separated string (``--tricks warmup,bn_gamma=zero_late``).

    Example::

        settings = ablation_settings(recipe, tricks=args.tricks, seeds=args.seeds)
        result = run_ablation(recipe, **settings)
    """
    section = getattr(recipe, "ablation", None)
    if section is None:
        section = {}
    elif not isinstance(section, dict):
        section = section.model_dump() if hasattr(section, "model_dump") else dict(section)
    # resplit is read from the recipe by run_ablation itself (it changes the children's recipes)
    unknown = sorted(set(section) - {"tricks", "resplit", *_SETTINGS_DEFAULTS})
    if unknown:
        raise ConfigError(
            f"recipe section 'ablation' has unknown key(s) {unknown}; valid: tricks, {', '.join(_SETTINGS_DEFAULTS)}"
        )
    given = {
        "tricks": tricks,
        "seeds": seeds,
        "mode": mode,
        "metric": metric,
        "jobs": jobs,
        "test": test,
        "executor": executor,
        "address": address,
        "cpus_per_run": cpus_per_run,
        "gpus_per_run": gpus_per_run,
        "retries": retries,
    }
    out: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            value = section.get(key)
        if value is None:
            value = _SETTINGS_DEFAULTS.get(key)
        out[key] = value
    if isinstance(out["tricks"], str):
        out["tricks"] = [t.strip() for t in out["tricks"].split(",") if t.strip()]
    if not out["tricks"]:
        raise ConfigError(
            "no tricks to ablate: pass --tricks warmup,bn_gamma=zero_late,... or set ablation.tricks in the recipe"
        )
    out["tricks"] = list(out["tricks"])
    if until_ci is not None:
        out.update(until_ci=until_ci, max_seeds=max_seeds, seed_step=seed_step, boundary=boundary or "pocock")
    elif max_seeds is not None or seed_step is not None:
        raise ConfigError(
            "--max-seeds / --seed-step only apply with --until-ci W (seeds until every Δ interval is "
            "within ±W or excludes 0)"
        )
    return out
