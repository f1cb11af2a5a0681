"""The image-level column of the ablation table: a paired bootstrap over the evaluation images of the
seed-averaged difference to the baseline, from the children's saved per-image predictions (their run folder
first, else the run store's artifact). Where it cannot be computed a note says why.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtricks.evaluate.paired import image_bootstrap_delta, load_predictions
from medtricks.recipe import Recipe
from medtricks.rundir import RunDir

__all__ = ["image_bootstrap_columns"]


def image_bootstrap_columns(
    table: pd.DataFrame, children: pd.DataFrame, keys: dict, recipe: Recipe, store, cache: Path, notes: list[str]
) -> None:
    """Add the ``boot_*`` columns to ``table`` (in place), or a note in ``notes`` saying why there are none."""
    if keys["scalar"] is None:
        notes.append(
            f"image bootstrap: not available for {keys['name']!r} (only accuracy, balanced_accuracy, auroc, f1, ece)"
        )
    elif recipe.eval.n_bootstrap == 0:
        notes.append("image bootstrap: eval.n_bootstrap is 0")
    elif recipe.ablation.resplit:
        notes.append(
            "image bootstrap: not used with ablation.resplit (each seed tests its own patients); the "
            "seed-level interval, which covers the choice of test patients, is the one to read"
        )
    elif len(children):
        preds, missing = _predictions(children, keys["split"], store, cache)
        if missing:
            notes.append(
                f"image bootstrap: no saved {keys['split']} predictions for {len(missing)} child run(s) "
                f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}); "
                "those seeds are left out of it"
            )
        if preds:
            _add_image_bootstrap(
                table, preds, "baseline", keys["scalar"], recipe.eval.n_bootstrap, recipe.eval.ci, notes
            )


def _predictions(
    children: pd.DataFrame, split: str, store, cache: Path
) -> tuple[dict[tuple[str, int], tuple[Any, Any]], list[str]]:
    """Per-image predictions of each child: its run folder first, else the run store's artifact."""
    found: dict[tuple[str, int], tuple[Any, Any]] = {}
    missing: list[str] = []
    for row in children.itertuples():
        path = RunDir(row.run_dir).predictions(split) if isinstance(row.run_dir, str) and row.run_dir else None
        if (path is None or not path.is_file()) and row.run_id:
            path = store.download_artifact(row.run_id, RunDir.predictions_artifact(split), cache / str(row.run_id))
        if path is None or not Path(path).is_file():
            missing.append(f"{row.variant} seed {row.seed}")
            continue
        found[(row.variant, int(row.seed))] = load_predictions(path)
    return found, missing


def _add_image_bootstrap(
    table: pd.DataFrame, preds: dict, reference: str, scalar: str, n_bootstrap: int, ci: float, notes: list[str]
) -> None:
    labels = [p[0] for p in preds.values()]
    if any(len(y) != len(labels[0]) or not np.array_equal(y, labels[0]) for y in labels[1:]):
        notes.append(
            "image bootstrap skipped: the children's evaluation labels differ, so their images are "
            "not the same (was data.split_seed or the data changed between runs?)"
        )
        return
    for col in ("boot_delta", "boot_ci_low", "boot_ci_high", "boot_p_value", "boot_n_seeds"):
        table[col] = math.nan
    ref_seeds = {s for (v, s) in preds if v == reference}
    for i, variant in enumerate(table["variant"]):
        if variant == reference:
            continue
        seeds = sorted(ref_seeds & {s for (v, s) in preds if v == variant})
        if not seeds:
            continue
        res = image_bootstrap_delta(
            labels[0],
            [preds[(variant, s)][1] for s in seeds],
            [preds[(reference, s)][1] for s in seeds],
            scalar,
            n_bootstrap=n_bootstrap,
            ci=ci,
        )
        table.loc[i, ["boot_delta", "boot_ci_low", "boot_ci_high", "boot_p_value", "boot_n_seeds"]] = [
            res["delta"],
            res["ci_low"],
            res["ci_high"],
            res["p_value"],
            len(seeds),
        ]
