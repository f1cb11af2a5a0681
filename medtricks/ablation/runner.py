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

The pieces, by concern: :mod:`~medtricks.ablation.children` (the ablation id, a child's recipe, the
finished children in the store), :mod:`~medtricks.ablation.executors` (where children train),
:mod:`~medtricks.ablation.seed_rounds` (which seeds, and the seeds-until-clear rounds),
:mod:`~medtricks.ablation.image_bootstrap` (the image-level column) and :mod:`~medtricks.ablation.result`
(the result and its files). This module runs them in order under one parent run.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from medtricks.ablation.children import _CHILD_COLUMNS, _NOT_IDENTITY, _slug  # noqa: F401 - re-exported
from medtricks.ablation.children import _children_from_store, _find_parent, ablation_id, child_recipe
from medtricks.ablation.executors import ExecutorSettings, run_children
from medtricks.ablation.image_bootstrap import _add_image_bootstrap, _predictions  # noqa: F401 - re-exported
from medtricks.ablation.image_bootstrap import image_bootstrap_columns
from medtricks.ablation.result import AblationResult, _write_outputs
from medtricks.ablation.seed_rounds import _resolve_seeds  # noqa: F401 - re-exported
from medtricks.ablation.seed_rounds import _apply_sequential, _seed_rounds, _sequential_decision
from medtricks.ablation.seed_stats import summarize_groups
from medtricks.ablation.settings import ABLATION_DEFAULTS as _DEFAULTS
from medtricks.ablation.settings import ablation_settings
from medtricks.ablation.table_metric import higher_is_better, metric_keys
from medtricks.ablation.variants import make_variants
from medtricks.data import redact_paths
from medtricks.errors import ConfigError
from medtricks.evaluate.markdown import is_finite
from medtricks.logged_params import run_params
from medtricks.recipe import Recipe
from medtricks.rundir import RunDir
from medtricks.tracking import check_store, create_store

__all__ = ["AblationResult", "run_ablation", "ablation_settings", "ablation_id", "child_recipe"]


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
        image_bootstrap_columns(table, children, keys, recipe, store, out_dir / "predictions", notes)

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
