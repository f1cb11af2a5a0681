"""One child run of an ablation: the ablation's id, a child's recipe and run folder, and the finished
children (and the parent) found again in the run store by that id -- which is what lets a re-run skip them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from medtricks.ablation.table_metric import metric_keys
from medtricks.recipe import Recipe, apply_overrides, recipe_digest, recipe_from_dict
from medtricks.tracking import RunNotFoundError

__all__ = ["ablation_id", "child_recipe"]

# Recipe keys that do not change what is trained: they stay out of the ablation id, so changing the
# tracking URI or the progress bar still resumes the same ablation. experiment.seed is set per child.
_NOT_IDENTITY = (("tracking",), ("experiment", "seed"), ("train", "progress"), ("ablation",))
_CHILD_COLUMNS = ["variant", "variant_index", "seed", "run_id", "value", "ci_low", "ci_high", "run_dir", "status"]


def ablation_id(recipe: Recipe, tricks: Sequence[str], mode: str) -> str:
    """A short stable id of (base recipe, tricks, mode): the same ablation gets the same id.

    Seeds are not part of it, so ``--seeds 10`` after ``--seeds 5`` reuses the first five children.
    """
    extra = {"resplit": True} if recipe.ablation.resplit else {}  # another protocol: other children
    return recipe_digest(recipe, ignore=_NOT_IDENTITY, tricks=[str(t).strip() for t in tricks], mode=mode, **extra)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:limit] or "x"


def child_recipe(
    base: Recipe,
    overrides: list[str],
    *,
    seed: int,
    variant: str,
    variant_index: int,
    ablation: str,
    tracking_uri: Optional[str] = None,
) -> Recipe:
    """The recipe of one child: the variant's overrides, the seed, and its own run folder.

    Each (variant, seed) gets its own ``experiment.output_dir`` below the ablation folder, so
    ``run_recipe(..., resume="auto")`` can only ever continue that child's own unfinished run.
    """
    data = apply_overrides(base.model_dump(mode="json"), overrides)
    data["experiment"]["seed"] = int(seed)
    if base.ablation.resplit:  # repeated hold-out: the seed draws the patient split too (paired by seed still)
        data["data"]["split_seed"] = int(seed)
    out = (
        Path(base.experiment.output_dir)
        / base.experiment.name
        / f"ablation-{ablation}"
        / f"v{variant_index:02d}_{_slug(variant)}_seed{seed}"
    )
    data["experiment"]["output_dir"] = str(out)
    data["tracking"]["run_name"] = f"{variant} | seed {seed}"
    if tracking_uri is not None:
        data["tracking"]["uri"] = tracking_uri
    return recipe_from_dict(data, source=f"ablation {ablation} variant {variant!r} seed {seed}")


def _children_from_store(store, experiment: str, ablation: str, metric: str) -> pd.DataFrame:
    """Finished children of an ablation as logged in the run store (the latest run per variant and seed)."""
    try:
        records = store.search_runs(
            experiment,
            statuses=["FINISHED"],
            tags={"medtricks.ablation_id": ablation, "medtricks.role": "ablation_child"},
        )
    except RunNotFoundError:  # the experiment does not exist yet: nothing ran
        return pd.DataFrame(columns=_CHILD_COLUMNS)
    keys = metric_keys(metric)
    rows = []
    for r in records:
        rows.append(
            {
                "variant": r.tags.get("variant"),
                "variant_index": int(r.tags.get("variant_index", -1)),
                "seed": int(r.tags["seed"]),
                "run_id": r.run_id,
                "value": r.metrics.get(keys["value"], math.nan),
                "ci_low": r.metrics.get(keys["ci_low"], math.nan),
                "ci_high": r.metrics.get(keys["ci_high"], math.nan),
                "run_dir": r.run_dir or r.tags.get("run_dir"),
                "status": r.status,
                "_start": r.start_time or 0,
            }
        )
    frame = pd.DataFrame(rows, columns=[*_CHILD_COLUMNS, "_start"])
    frame = frame.sort_values("_start", kind="stable").drop_duplicates(["variant", "seed"], keep="last")
    return frame.drop(columns="_start").reset_index(drop=True)


def _find_parent(store, experiment: str, ablation: str) -> Optional[str]:
    try:
        parents = store.search_runs(
            experiment, tags={"medtricks.ablation_id": ablation, "medtricks.role": "ablation_parent"}
        )
    except RunNotFoundError:
        return None
    return parents[-1].run_id if parents else None
