"""The decision rule over the seeds of one recipe: what the run summary prints after the side-by-side report.

A single run's operating point hides how much it moves with the seed (the shipped Kermany recipe's
validation-chosen threshold ran from 0.04 to 0.29 over three seeds, and its specificity on a new site with
it). So every run is tagged with its *recipe family* -- the digest of its recipe without the seed (and
without keys that do not change what is trained) -- and at the end of a run, the finished runs of the same
family in the same experiment of the run store are read back: the summary prints, over those seeds and
this one, the mean and 95 % t-interval of the stored threshold and of the test (else validation) metrics at
the decision rule the run uses (the stored operating point, or 0.5 when ``eval.threshold: none``).

With one seed there is nothing to spread: the summary says how to get a second one. Reading the store
never fails a finished run (a tracking server that went away costs this paragraph, not the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from medtricks.evaluate.markdown import fmt_mean_ci, fmt_num
from medtricks.evaluate.stats import mean_ci
from medtricks.recipe import Recipe, recipe_digest
from medtricks.rundir import best_key

__all__ = [
    "FAMILY_TAG",
    "THRESHOLD_KEY",
    "recipe_family",
    "SeedSpread",
    "seed_spread",
    "spread_report",
    "say_seed_spread",
]

#: The tag every training run carries: its recipe's digest without the seed.
FAMILY_TAG = "medtricks.recipe_family"
#: The metric a run logs with its stored decision threshold (binary runs with an operating point).
THRESHOLD_KEY = "best/op/threshold"
# Keys that do not change what is trained (as an ablation's id; the seed is what varies in a family).
_NOT_FAMILY = (
    ("tracking",),
    ("experiment", "seed"),
    ("experiment", "output_dir"),
    ("train", "progress"),
    ("ablation",),
    ("data", "cache_dir"),
)


def recipe_family(recipe: Recipe) -> str:
    """The id shared by the runs of ``recipe`` that differ only in ``experiment.seed`` (and folders, tracking)."""
    return recipe_digest(recipe, ignore=_NOT_FAMILY, family=True)


@dataclass
class SeedSpread:
    """One recipe's runs over seeds: ``seeds`` and, per metric key, one value per seed (same order)."""

    seeds: list[int]
    split: str  # the split the metrics come from: "test", else "val"
    rule: str  # the decision rule the values were measured at, in words
    values: dict[str, list[float]] = field(default_factory=dict)  # label -> one value per seed

    def table(self) -> str:
        seeds = ", ".join(str(s) for s in self.seeds)
        lines = [f"over {len(self.seeds)} seeds of this recipe ({seeds}), {self.split} split, {self.rule}:"]
        for label, vals in self.values.items():
            mean, low, high = mean_ci(vals)
            low, high = max(low, 0.0), min(high, 1.0)  # every row is a rate or a threshold in [0, 1]
            lines.append(
                f"  {label:<26} {fmt_mean_ci(mean, low, high, len(vals))}  "
                f"(seeds {fmt_num(min(vals), 3)}-{fmt_num(max(vals), 3)})"
            )
        lines.append(
            "  mean [95 % t-interval over seeds, clipped to [0, 1]]; a wide interval: the rule moves with the seed"
        )
        return "\n".join(lines)


def _metric_keys(split: str, classes: Sequence[str], has_op: bool) -> dict[str, str]:
    """``label -> metric key`` at the run's decision rule (binary: the positive class classes[1])."""
    keys = {"AUROC": best_key(split, "auroc")}
    if has_op:
        keys["threshold (stored)"] = THRESHOLD_KEY
    keys["accuracy"] = best_key(split, "accuracy", op=has_op)
    if len(classes) == 2:
        keys[f"sensitivity/{classes[1]}"] = best_key(split, f"sensitivity/{classes[1]}", op=has_op)
        keys[f"specificity/{classes[1]}"] = best_key(split, f"specificity/{classes[1]}", op=has_op)
    else:
        keys["balanced accuracy"] = best_key(split, "balanced_accuracy")
    return keys


def seed_spread(
    store,
    experiment: str,
    family: str,
    *,
    current_seed: int,
    current_metrics: dict[str, float],
    classes: Sequence[str],
    has_op: bool,
    exclude_run_id: Optional[str] = None,
) -> SeedSpread:
    """The finished runs of ``family`` in ``experiment`` (one per seed, the newest), plus this run
    (``current_metrics``, which wins for its own seed). Runs missing a metric leave that metric's row out."""
    split = "test" if best_key("test", "auroc") in current_metrics else "val"
    keys = _metric_keys(split, classes, has_op)
    by_seed: dict[int, dict[str, float]] = {}
    for record in store.search_runs(experiment, tags={FAMILY_TAG: family}, statuses=["FINISHED"]):
        if record.run_id == exclude_run_id:
            continue
        try:
            seed = int(record.params.get("experiment.seed", ""))
        except ValueError:
            continue
        by_seed[seed] = record.metrics  # oldest first: a re-run seed keeps its newest run
    by_seed[int(current_seed)] = current_metrics
    seeds = sorted(by_seed)
    values = {}
    for label, key in keys.items():
        column = [by_seed[s].get(key) for s in seeds]
        if all(v is not None and math.isfinite(float(v)) for v in column):
            values[label] = [float(v) for v in column]
    rule = "at the stored operating point" if has_op else ("threshold 0.5" if len(classes) == 2 else "argmax")
    return SeedSpread(seeds=seeds, split=split, rule=rule, values=values)


def spread_report(spread: SeedSpread) -> str:
    """The run summary's paragraph: the table over seeds, or (one seed) how to get a spread."""
    if len(spread.seeds) < 2:
        return (
            f"one seed of this recipe so far ({spread.seeds[0]}): the decision rule's seed-to-seed spread is "
            f"unknown; run it again with --set experiment.seed={spread.seeds[0] + 1} (same experiment and "
            "run store) and this summary prints it"
        )
    return spread.table()


def say_seed_spread(recipe: Recipe, tracker, say, final, classes: Sequence[str]) -> Optional[SeedSpread]:
    """Print the spread of this run's recipe over the seeds in its run store (after the run's own report).
    Never raises: a store that cannot be searched costs this paragraph, with one line that says why."""
    if not final.logged:
        return None
    experiment = recipe.tracking.experiment or recipe.experiment.name
    try:
        spread = seed_spread(
            tracker,
            experiment,
            recipe_family(recipe),
            current_seed=recipe.experiment.seed,
            current_metrics=final.logged,
            classes=classes,
            has_op=final.operating_point is not None,
            exclude_run_id=getattr(tracker, "run_id", None),
        )
    except Exception as err:  # noqa: BLE001 - the run is finished and saved; this is a summary line
        say(f"seed spread: the run store could not be searched ({type(err).__name__}: {str(err)[:200]})")
        return None
    say(spread_report(spread))
    return spread
