"""Run a multi-seed ablation: one parent run, one child run per (variant, seed), one table.

The seed of a child drives ``experiment.seed`` only (weights init, data order, augmentation); the
patient-level split (``data.split_seed``) and the data stay fixed, so every variant sees the same
images and variants pair up by seed. ``ablation.resplit: true`` (repeated hold-out, for sets of a few
hundred images whose one test split cannot decide anything) lets the seed draw the split too: every
variant of seed s trains and is tested on split s, so variants still pair up by seed and the intervals
include which patients were held out. Runs go to the run store of ``tracking.backend``: MLflow, or
for ``none`` the local run store inside the ablation folder (the parent's store is the ablation
folder's own). Re-running the same ablation skips the (variant, seed) children that already
finished (found in the store by the ablation id) and continues interrupted ones from their last
checkpoint.

Example::

    from medtricks.recipe import load_recipe
    from medtricks.ablation import run_ablation

    recipe = load_recipe("recipes/paper_baseline.yaml")
    result = run_ablation(recipe, ["warmup", "bn_gamma=zero_late", "label_smoothing=0.1"], seeds=5)
    print(result.markdown())
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from medtricks.ablation.executors import ExecutorSettings, run_children
from medtricks.ablation.settings import ABLATION_DEFAULTS as _DEFAULTS
from medtricks.ablation.settings import ablation_settings
from medtricks.ablation.table import (
    forest_figure,
    format_ablation_markdown,
    higher_is_better,
    metric_keys,
    summarize_groups,
)
from medtricks.ablation.variants import make_variants
from medtricks.data import redact_paths
from medtricks.ablation.sequential import BOUNDARIES, look_schedule, sequential_look
from medtricks.errors import ConfigError
from medtricks.evaluate.markdown import is_finite
from medtricks.evaluate.paired import image_bootstrap_delta, load_predictions
from medtricks.logged_params import run_params
from medtricks.recipe import SEED_LIMIT, Recipe, apply_overrides, recipe_digest, recipe_from_dict
from medtricks.rundir import RunDir
from medtricks.tracking import RunNotFoundError, check_store, create_store

__all__ = ["AblationResult", "run_ablation", "ablation_settings", "ablation_id", "child_recipe"]

# Recipe keys that do not change what is trained: they stay out of the ablation id, so changing the
# tracking URI or the progress bar still resumes the same ablation. experiment.seed is set per child.
_NOT_IDENTITY = (("tracking",), ("experiment", "seed"), ("train", "progress"), ("ablation",))
_CHILD_COLUMNS = ["variant", "variant_index", "seed", "run_id", "value", "ci_low", "ci_high", "run_dir", "status"]


@dataclass
class AblationResult:
    """What :func:`run_ablation` returns.

    Attributes:
        table: one row per variant: ``n_seeds``, ``mean``, ``ci_low``, ``ci_high`` (over seeds),
            ``delta`` / ``delta_ci_low`` / ``delta_ci_high`` / ``delta_p_value`` / ``verdict`` (paired
            vs the baseline), ``boot_*`` (image bootstrap), ``delta_prev*`` (cumulative mode).
        children: one row per finished child run: variant, seed, run_id, value and its bootstrap CI.
        failed: ``{"variant", "seed", "error"}`` for every child that failed in this call.
    """

    table: pd.DataFrame
    children: pd.DataFrame
    metric: str
    mode: str
    ablation_id: str
    variants: list[tuple[str, list[str]]]
    seeds: list[int]
    parent_run_id: Optional[str] = None
    output_dir: Optional[Path] = None
    failed: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, int]] = field(default_factory=list)
    tricks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sequential: Optional[dict[str, Any]] = None  # seeds until the answer is clear: looks, boundary, stop

    def labels(self) -> dict[str, str]:
        """Row labels for display: in cumulative mode only the trick each row adds (``+ cosine``)."""
        if self.mode != "cumulative" or len(self.tricks) != len(self.variants) - 1:
            return {}
        return {name: f"+ {trick}" for (name, _), trick in zip(self.variants[1:], self.tricks)}

    def markdown(self) -> str:
        """The table as Markdown, with a title and the notes (what ``medtricks ablate`` prints)."""
        title = (
            f"Ablation {self.ablation_id} ({self.mode}, {len(self.seeds)} seeds: "
            f"{', '.join(str(s) for s in self.seeds)}) — {self.metric}"
        )
        if self.sequential:
            title += f" — seeds until ±{self.sequential['until_ci']:g} (max {self.sequential['max_seeds']})"
        return format_ablation_markdown(
            self.table, metric=self.metric, title=title, notes=self.notes, labels=self.labels()
        )

    def to_csv(self, path: Optional[str | Path] = None) -> str:
        """The table as CSV text; also written to ``path`` when given."""
        text = self.table.to_csv(index=False)
        if path is not None:
            Path(path).write_text(text)
        return text


# ------------------------------------------------------------------------------------ identities
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


# ------------------------------------------------------------------------------------- children
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
    import numpy as np

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


# ----------------------------------------------------------------------------------------- main
def _resolve_seeds(seeds: int | Sequence[int], base_seed: int) -> list[int]:
    if isinstance(seeds, bool):
        raise ConfigError(f"seeds must be a count (int >= 1) or a list of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {seeds}")
        out = [base_seed + i for i in range(seeds)]
    else:
        out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"seeds must be a non-empty list of distinct ints, got {list(seeds)!r}")
    if not all(0 <= s < SEED_LIMIT for s in out):  # numpy / scikit-learn take no more
        raise ConfigError(f"seeds {out[0]}..{out[-1]}: every child's experiment.seed must be 0 <= seed < 2**32")
    return out


def _seed_rounds(
    seeds: int | Sequence[int],
    base_seed: int,
    *,
    until_ci: Optional[float],
    max_seeds: Optional[int],
    seed_step: Optional[int],
    boundary: str,
) -> tuple[Optional[list[int]], list[int], list[int]]:
    """``(looks, all_seeds, first_round_seeds)``: without ``until_ci`` one round of ``seeds`` (``looks`` None);
    with it, the look schedule (seeds per variant at each look, fixed before any seed trains) up to ``max_seeds``."""
    if until_ci is None:
        seed_list = _resolve_seeds(seeds, base_seed)
        return None, seed_list, seed_list
    if max_seeds is None:
        raise ConfigError("until_ci needs max_seeds (--max-seeds N): the most seeds per variant to train")
    if not isinstance(seeds, int) or isinstance(seeds, bool):
        raise ConfigError(f"with until_ci, seeds must be a count (the first round's seeds), got {seeds!r}")
    if boundary not in BOUNDARIES:
        raise ConfigError(f"boundary must be one of {', '.join(BOUNDARIES)}, got {boundary!r}")
    if not (isinstance(until_ci, (int, float)) and not isinstance(until_ci, bool) and until_ci > 0):
        raise ConfigError(f"until_ci (the wanted half-width W of every Δ interval) must be > 0, got {until_ci!r}")
    looks = look_schedule(seeds, max_seeds, seed_step)
    all_seeds = _resolve_seeds(max_seeds, base_seed)
    return looks, all_seeds, all_seeds[: looks[0]]


def run_ablation(
    recipe: Recipe,
    tricks: list[str],
    *,
    seeds: int | Sequence[int] = _DEFAULTS.seeds,
    mode: str = _DEFAULTS.mode,
    metric: str = _DEFAULTS.metric,
    jobs: int = _DEFAULTS.jobs,
    tracking_uri: Optional[str] = None,
    quiet: bool = False,
    test: str = _DEFAULTS.test,
    executor: str = _DEFAULTS.executor,
    address: Optional[str] = _DEFAULTS.address,
    cpus_per_run: float = _DEFAULTS.cpus_per_run,
    gpus_per_run: float = _DEFAULTS.gpus_per_run,
    retries: int = _DEFAULTS.retries,
    until_ci: Optional[float] = None,
    max_seeds: Optional[int] = None,
    seed_step: Optional[int] = None,
    boundary: str = "pocock",
) -> AblationResult:
    """Train every variant for every seed and build the table.

    Args:
        recipe: the baseline recipe (every variant starts from it).
        tricks: trick specs (see :mod:`medtricks.ablation.variants`).
        seeds: a count (seeds ``experiment.seed``, ``+1``, ...) or an explicit list of seeds.
        mode: ``cumulative`` | ``one_at_a_time`` | ``grid``.
        metric: the table's metric, ``val/<name>`` or ``test/<name>`` (the best checkpoint's value).
        jobs: children trained at once by the local executor; ``> 1`` uses worker processes (use a
            tracking server, not sqlite, for many jobs).
        executor: ``local`` (this machine) or ``ray`` (each child a Ray task; see
            :mod:`medtricks.ablation.executors`).
        address: Ray only: ``None`` starts a local Ray for the call, ``auto`` joins this machine's
            cluster, ``ray://host:10001`` connects a Ray Client.
        cpus_per_run, gpus_per_run: Ray only: resources (and torch threads) per child.
        retries: Ray only: restarts of a child whose worker died; it resumes from its checkpoint.
        tracking_uri: MLflow URI for parent and children (default: the recipe's, then
            ``$MLFLOW_TRACKING_URI``, then ``sqlite:///mlflow.db``). With ``tracking.backend: none``
            parent and children go to the local run store inside the ablation folder.
        quiet: no printing.
        test: seed-level paired test, ``t`` or ``wilcoxon``.
        until_ci: seeds until the answer is clear: train ``seeds`` (a count, >= 2) seeds, then
            ``seed_step`` (default: ``seeds``) more per round, up to ``max_seeds``, and stop after the
            first round at which every variant's Δ vs the baseline has a 95 % (``eval.ci``) interval of
            half-width <= ``until_ci`` or excluding 0. The intervals are group-sequential repeated
            confidence intervals (``boundary``: ``pocock`` or ``obrien_fleming`` over the fixed look
            schedule; see :mod:`medtricks.ablation.sequential`), so their coverage holds whichever
            round the rule stops at. The table's ``delta_ci_*`` and verdict are then those intervals
            (the fixed-n t-interval stays in ``delta_fixed_ci_*``); resuming re-reads finished rounds.

    Children that fail are reported in ``result.failed`` and left out of the table (re-running the
    same command retries them); the parent run then ends ``FAILED``.
    """
    say = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
    executor = ExecutorSettings(
        name=executor, jobs=jobs, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, retries=retries
    )
    keys = metric_keys(metric)
    if test not in ("t", "wilcoxon"):
        raise ConfigError(f"test must be 't' or 'wilcoxon', got {test!r}")
    if keys["split"] == "test" and recipe.data.test_fraction == 0:
        raise ConfigError(
            f"metric {metric!r} needs a test split but data.test_fraction is 0; use val/"
            f"{keys['name']} or --set data.test_fraction=0.15"
        )
    if isinstance(tricks, str):
        tricks = tricks.split(",")
    tricks = [str(t).strip() for t in tricks if str(t).strip()]
    looks, all_seeds, seed_list = _seed_rounds(
        seeds, recipe.experiment.seed, until_ci=until_ci, max_seeds=max_seeds, seed_step=seed_step, boundary=boundary
    )
    variants = make_variants(recipe, tricks, mode)
    aid = ablation_id(recipe, tricks, mode)
    experiment = recipe.tracking.experiment or recipe.experiment.name
    uri = tracking_uri or recipe.tracking.uri
    # One line, in seconds, before the ablation folder or the parent run exists: a tracking URI or a Ray
    # address that does not answer
    check_store(recipe.tracking.backend, uri)
    executor.check_reachable()
    out_dir = RunDir.experiment_dir(recipe.experiment.output_dir, recipe.experiment.name) / f"ablation-{aid}"
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    # ---- parent run (re-opened when this ablation ran before); backend none: the ablation folder's store
    store = create_store(recipe.tracking.backend, uri, root=out_dir)
    parent = create_store(recipe.tracking.backend, uri, root=out_dir)
    previous = _find_parent(store, experiment, aid)
    tags = {
        "medtricks.role": "ablation_parent",
        "medtricks.ablation_id": aid,
        "ablation.mode": mode,
        "ablation.tricks": ",".join(tricks),
        "ablation.metric": metric,
        "ablation.seeds": ",".join(str(s) for s in seed_list),
        "ablation.dir": str(out_dir),
        "run_dir": str(out_dir),
    }
    parent_id: Optional[str] = parent.start(
        experiment=experiment,
        run_name=f"ablation {recipe.experiment.name} {aid[:6]}",
        tags=tags,
        resume_run_id=previous,
    )
    if previous:
        parent.set_tags(tags)
    base_params = {
        k: v
        for k, v in run_params(recipe).items()  # the base recipe's sections that are on
        if not k.startswith(("tracking.", "ablation.")) and k not in ("experiment.seed", "train.progress")
    }
    parent.log_params(
        {
            **base_params,
            "ablation.id": aid,
            "ablation.mode": mode,
            "ablation.tricks": ",".join(tricks),
            "ablation.variants": json.dumps(dict(variants)),
        }
    )
    sequential: Optional[dict[str, Any]] = None
    decision = None

    # Whatever happens below, the parent run is closed with a status that says so.
    try:
        index = {name: i for i, (name, _) in enumerate(variants)}
        failed: list[dict[str, Any]] = []
        skipped: list[tuple[str, int]] = []
        # One round without until_ci; with it, one round per look of the fixed schedule (finished
        # children of earlier calls are found in the store, so a re-run replays the same decisions).
        for look, n_round in enumerate(looks or [len(seed_list)]):
            round_seeds = all_seeds[:n_round] if looks else seed_list
            done = _children_from_store(store, experiment, aid, metric)
            finished = {(v, int(s)) for v, s in zip(done["variant"], done["seed"])}
            plan = [
                (name, overrides, seed)
                for seed in round_seeds
                for name, overrides in variants
                if (name, seed) not in finished
            ]  # seed-major: an interrupted ablation still pairs seeds
            skipped += [
                (name, seed)
                for seed in round_seeds
                for name, _ in variants
                if (name, seed) in finished and (name, seed) not in skipped
            ]
            rounds = f", round {look + 1}/{len(looks)} (seeds until ±{until_ci:g})" if looks else ""
            say(
                f"ablation {aid} ({mode}{rounds}): {len(variants)} variants x {len(round_seeds)} seeds = "
                f"{len(variants) * len(round_seeds)} runs; {len(round_seeds) * len(variants) - len(plan)} already "
                f"finished, {len(plan)} to run"
                + (
                    f"; parent run {parent_id} in experiment {experiment!r} ({store.describe()})"
                    if parent_id and look == 0
                    else ""
                )
            )
            if look == 0:
                for i, (name, overrides) in enumerate(variants):
                    say(f"  v{i:02d} {name}: {' '.join(overrides) or '(base recipe)'}")

            jobs_data = []
            for name, overrides, seed in plan:
                child = child_recipe(
                    recipe,
                    overrides,
                    seed=seed,
                    variant=name,
                    variant_index=index[name],
                    ablation=aid,
                    tracking_uri=tracking_uri,
                )
                tags = {
                    "variant": name,
                    "seed": str(seed),
                    "variant_index": str(index[name]),
                    "variant_overrides": " ".join(overrides) or "none",
                    "medtricks.role": "ablation_child",
                    "medtricks.ablation_id": aid,
                }
                jobs_data.append((name, seed, child.model_dump(mode="json"), tags))

            _, round_failed = run_children(
                jobs_data, executor, parent_id=parent_id, quiet=quiet, metric=metric, say=say
            )
            failed += round_failed
            seed_list = round_seeds
            if not looks:
                break
            decision = _sequential_decision(
                _children_from_store(store, experiment, aid, metric),
                variants,
                round_seeds,
                looks,
                until_ci,
                recipe.eval.ci,
                boundary,
            )
            if decision is None:
                notes.append(
                    f"seeds until ±{until_ci:g}: stopped at round {look + 1} because some children of "
                    "seeds " + ", ".join(str(s) for s in round_seeds) + " failed or logged no value; "
                    "re-run the same command to retry and continue"
                )
                break
            say(f"  {decision.describe()}")
            if decision.stop:
                break
        if looks:
            sequential = {
                "until_ci": until_ci,
                "max_seeds": max_seeds,
                "looks": looks,
                "boundary": boundary,
                "n_seeds": len(seed_list),
                "look": decision.look if decision else None,
                "stopped": bool(decision and decision.stop),
                "reason": decision.reason if decision else "children failed",
            }

        # ---- the children's numbers: from the run store (what the MLflow UI / compare show)
        all_children = _children_from_store(store, experiment, aid, metric)
        children = all_children[all_children["seed"].isin(seed_list) & all_children["variant"].isin(index)].copy()
        extra = len(all_children) - len(children)
        if extra > 0:
            notes.append(
                f"{extra} finished child run(s) of other seeds are not in this table (seeds asked: "
                f"{', '.join(str(s) for s in seed_list)})"
            )
        no_value = children[~children["value"].map(is_finite)]
        if len(no_value):
            notes.append(
                f"{len(no_value)} child run(s) have no {keys['value']}: "
                + ", ".join(f"{r.variant} seed {r.seed}" for r in no_value.itertuples())
            )
        children = children[children["value"].map(is_finite)]
        children["variant_index"] = children["variant"].map(index)
        children = children.sort_values(["variant_index", "seed"]).reset_index(drop=True)
        for f in failed:
            # notes are logged with the table: data paths in error texts are hashed (no patient IDs)
            notes.append(
                f"FAILED: {f['variant']} seed {f['seed']}: {redact_paths(f['error'], recipe.data.root)} "
                "(re-run the same command to retry)"
            )

        table = summarize_groups(
            children[["variant", "seed", "value"]],
            [n for n, _ in variants],
            reference="baseline",
            previous=(mode == "cumulative"),
            ci=recipe.eval.ci,
            test=test,
            higher_better=higher_is_better(metric),
        )
        table.insert(1, "overrides", [" ".join(o) for _, o in variants])
        if decision is not None:
            _apply_sequential(table, decision, higher_is_better(metric), boundary, until_ci, notes)

        # ---- image-level paired bootstrap from the children's saved predictions
        if keys["scalar"] is None:
            notes.append(
                f"image bootstrap: not available for {keys['name']!r} (only accuracy, balanced_accuracy, "
                "auroc, f1, ece)"
            )
        elif recipe.eval.n_bootstrap == 0:
            notes.append("image bootstrap: eval.n_bootstrap is 0")
        elif recipe.ablation.resplit:
            notes.append(
                "image bootstrap: not used with ablation.resplit (each seed tests its own patients); the "
                "seed-level interval, which covers the choice of test patients, is the one to read"
            )
        elif len(children):
            preds, missing = _predictions(children, keys["split"], store, out_dir / "predictions")
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

        result = AblationResult(
            table=table,
            children=children,
            metric=metric,
            mode=mode,
            ablation_id=aid,
            variants=variants,
            seeds=seed_list,
            parent_run_id=parent_id,
            output_dir=out_dir,
            failed=failed,
            skipped=skipped,
            notes=notes,
            tricks=tricks,
            sequential=sequential,
        )
        _write_outputs(result, parent, say)
    except BaseException as err:
        if parent is not None:
            interrupted = isinstance(err, KeyboardInterrupt)
            parent.set_tags(
                {
                    "ablation.status": "interrupted" if interrupted else "error",
                    "medtricks.error": redact_paths(f"{type(err).__name__}: {err}", recipe.data.root)[:5000],
                }
            )
            parent.end("KILLED" if interrupted else "FAILED")
        raise
    return result


def _sequential_decision(
    children: pd.DataFrame,
    variants: list[tuple[str, list[str]]],
    seeds: list[int],
    looks: list[int],
    width: float,
    ci: float,
    boundary: str,
):
    """The group-sequential decision on the paired differences of ``seeds``; ``None`` when a child is missing."""

    values = {(v, int(s)): x for v, s, x in zip(children["variant"], children["seed"], children["value"])}
    diffs: dict[str, list[float]] = {}
    for name, _ in variants[1:]:
        pairs = [(values.get((name, s)), values.get(("baseline", s))) for s in seeds]
        if any(a is None or b is None or not (is_finite(a) and is_finite(b)) for a, b in pairs):
            return None
        diffs[name] = [float(a) - float(b) for a, b in pairs]
    return sequential_look(diffs, looks, width=width, ci=ci, kind=boundary)


def _apply_sequential(
    table: pd.DataFrame, decision, higher_better: bool, boundary: str, width: float, notes: list[str]
) -> None:
    """Replace the table's fixed-n Δ interval and verdict with the repeated CI of the look it stopped at."""
    import numpy as np

    for col in ("delta_ci_low", "delta_ci_high", "delta_p_value"):
        table[col.replace("delta_", "delta_fixed_")] = table[col]
    for i, variant in enumerate(table["variant"]):
        row = decision.rows.get(variant)
        if row is None:
            continue
        table.loc[i, ["delta_ci_low", "delta_ci_high"]] = [row["low"], row["high"]]
        table.loc[i, "delta_p_value"] = np.nan  # a fixed-n p-value is not valid after optional stopping
        verdict = "no evidence"
        if row["excludes_zero"]:
            verdict = "helps" if (row["mean"] > 0) == higher_better else "hurts"
        table.loc[i, "verdict"] = verdict
    table.attrs["interval"] = f"repeated CI, {boundary}"
    notes.append(
        f"Seeds until ±{width:g}: {decision.describe()}. Δ intervals are group-sequential repeated "
        f"confidence intervals ({boundary} boundary over the looks fixed in advance), valid at "
        "whichever look the rule stopped; the fixed-n t-interval is in the CSV (delta_fixed_ci_*)."
    )


def _write_outputs(result: AblationResult, parent, say) -> None:
    """Markdown, CSVs and the forest plot into the ablation folder and onto the parent run."""
    import matplotlib.pyplot as plt

    out = result.output_dir
    md = result.markdown()
    (out / "ablation_table.md").write_text(md)
    result.to_csv(out / "ablation_table.csv")
    result.children.to_csv(out / "children.csv", index=False)
    files = [out / "ablation_table.md", out / "ablation_table.csv", out / "children.csv"]
    if result.table["mean"].map(is_finite).any():
        fig = forest_figure(result.table, metric=result.metric, labels=result.labels())
        fig.savefig(out / "forest.png", dpi=120, bbox_inches="tight")  # keep long labels inside
        plt.close(fig)
        files.append(out / "forest.png")
    say("")
    say(md)
    say(f"table, CSV and forest plot: {out}")
    if parent is None:
        return
    for path in files:
        parent.log_artifact(path, "ablation")
    metrics = {}
    for i, row in result.table.iterrows():
        prefix = f"ablation/v{i:02d}_{_slug(str(row['variant']))}"
        for col in ("mean", "ci_low", "ci_high", "delta", "delta_p_value", "n_seeds"):
            if is_finite(row.get(col)):
                metrics[f"{prefix}/{col}"] = float(row[col])
    parent.log_metrics(metrics)
    complete = not result.failed and len(result.children) == len(result.variants) * len(result.seeds)
    tags = {
        "ablation.status": "complete" if complete else "incomplete",
        "ablation.failed": str(len(result.failed)),
        "ablation.seeds": ",".join(str(s) for s in result.seeds),
    }
    if result.sequential:
        tags.update(
            {
                "ablation.until_ci": f"{result.sequential['until_ci']:g}",
                "ablation.sequential": f"{result.sequential['boundary']}, looks "
                f"{result.sequential['looks']}: {result.sequential['reason']}"[:5000],
            }
        )
    parent.set_tags(tags)
    parent.end("FAILED" if result.failed else "FINISHED")
