"""``medtricks compare``: the side-by-side table of runs read from a run store -- every run with its logged CI,
per-group seed statistics with ``group_by``, and each run's paired image-level difference to a reference.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from medtricks._defaults import DEFAULT_METRIC
from medtricks.ablation.seed_stats import summarize_groups
from medtricks.ablation.table_format import format_ablation_markdown, format_runs_markdown
from medtricks.ablation.table_metric import higher_is_better, metric_keys
from medtricks.errors import ConfigError
from medtricks.evaluate.markdown import fmt_mean_ci, fmt_p, fmt_signed, is_finite, markdown_table
from medtricks.evaluate.paired import image_bootstrap_delta, load_predictions, stored_image_set
from medtricks.evaluate.stats import mean_ci
from medtricks.rundir import RunDir
from medtricks.tracking import create_store

__all__ = ["compare_runs", "runs_frame"]


def _seed_of(record) -> Optional[int]:
    raw = record.tags.get("seed", record.params.get("experiment.seed"))
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def runs_frame(records, metric: str, group_by: Optional[str] = None) -> pd.DataFrame:
    """Plain table of run records: one row per run with the metric and its logged CI."""
    keys = metric_keys(metric, allow_eval=True)
    rows = []
    for r in records:
        group = None
        if group_by:
            group = r.tags.get(group_by, r.params.get(group_by))
        rows.append(
            {
                "run_id": r.run_id,
                "run_name": r.run_name,
                "status": r.status,
                "start_time": r.start_time,
                "seed": _seed_of(r),
                "group": group,
                "value": r.metrics.get(keys["value"], math.nan),
                "ci_low": r.metrics.get(keys["ci_low"], math.nan),
                "ci_high": r.metrics.get(keys["ci_high"], math.nan),
                "tricks": r.tags.get("tricks"),
                "variant_index": r.tags.get("variant_index"),
                "ci_level": r.params.get("eval.ci"),
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "run_id",
            "run_name",
            "status",
            "start_time",
            "seed",
            "group",
            "value",
            "ci_low",
            "ci_high",
            "tricks",
            "variant_index",
            "ci_level",
        ],
    )


def compare_runs(
    *,
    experiment: Optional[str] = None,
    run_ids: Optional[list[str]] = None,
    metric: str = DEFAULT_METRIC,
    group_by: Optional[str] = None,
    tracking_uri: Optional[str] = None,
    ci: float = 0.95,
    test: str = "t",
    store: Any = None,
    runs_dir: Optional[str | Path] = None,
) -> str:
    """The side-by-side table ``medtricks compare`` prints, read from a run store.

    The store: ``store`` (any :class:`~medtricks.tracking.RunStore`), else the local run store under
    ``runs_dir`` (runs of ``tracking.backend: none``), else MLflow at ``tracking_uri``.

    Every run with the metric is listed with the bootstrap CI it logged; ``eval/<m>`` and
    ``eval/op/<m>`` read evaluation runs (``medtricks evaluate`` / ``ensemble``). With ``group_by`` (a tag
    such as ``variant``, or a param such as ``optim.lr``) runs are also aggregated per group: seeds,
    mean with a t-CI over runs, and the paired-by-seed difference to the reference group
    (``baseline`` when present, else the first group).

    Example::

        print(compare_runs(experiment="quickstart", group_by="variant"))
        print(compare_runs(experiment="quickstart", runs_dir="runs"))  # tracking.backend: none
    """
    if experiment is None and not run_ids:
        raise ConfigError("compare needs --experiment NAME or --runs ID [ID ...]")
    keys = metric_keys(metric, allow_eval=True)
    if store is None:
        store = create_store("none", root=runs_dir) if runs_dir is not None else create_store("mlflow", tracking_uri)
    records = store.get_runs(experiment=experiment, run_ids=run_ids)
    notes: list[str] = []
    parents = [r for r in records if r.tags.get("medtricks.role") == "ablation_parent"]
    if parents and not run_ids:
        records = [r for r in records if r.tags.get("medtricks.role") != "ablation_parent"]
        notes.append(
            f"{len(parents)} ablation parent run(s) not listed (their table is their artifact "
            "ablation/ablation_table.md)"
        )
    frame = runs_frame(records, metric, group_by)
    where = f"experiment {experiment!r}" if experiment else f"{len(run_ids or [])} given run(s)"
    without = frame[~frame["value"].map(is_finite)]
    if len(without):
        listed = ", ".join(f"{r.run_name or r.run_id[:12]} ({r.status})" for r in without.itertuples())
        notes.append(f"{len(without)} run(s) have no {keys['value']} and are left out: {listed}")
    frame = frame[frame["value"].map(is_finite)].copy()
    if frame.empty:
        lines = [f"No run in {where} logged {keys['value']}."] + [f"- {n}" for n in notes]
        return "\n".join(lines) + "\n"

    levels = {float(v) for v in frame["ci_level"].dropna()}
    ci_level = levels.pop() if len(levels) == 1 else None
    out = [f"## {metric} in {where} ({len(frame)} runs)", ""]
    if group_by:
        no_tag = frame["group"].isna()
        if no_tag.any():
            notes.append(f"{int(no_tag.sum())} run(s) have no tag or param {group_by!r}: grouped as '(none)'")
        frame["group"] = frame["group"].fillna("(none)")
        frame = frame.sort_values(["start_time"], kind="stable")
        order = _group_order(frame)
        paired = frame.dropna(subset=["seed"])
        if len(paired) < len(frame):
            notes.append(
                f"{len(frame) - len(paired)} run(s) have neither a 'seed' tag nor an experiment.seed "
                "param: counted in the run list only"
            )
        # One run per (group, seed) for the statistics: the latest (a re-run replaces an older one).
        dupes = paired.duplicated(subset=["group", "seed"], keep="last")
        if dupes.any():
            notes.append(
                f"{int(dupes.sum())} older run(s) with the same {group_by} and seed as a later run are "
                "left out of the statistics"
            )
        stats_runs = paired[~dupes].rename(columns={"group": group_by})[[group_by, "seed", "value"]]
        stats_runs["seed"] = stats_runs["seed"].astype(int)
        reference = "baseline" if "baseline" in order else order[0]
        table = summarize_groups(
            stats_runs,
            order,
            group_col=group_by,
            reference=reference,
            ci=ci,
            test=test,
            higher_better=higher_is_better(metric),
        )
        out.append(format_ablation_markdown(table, metric=metric, group_col=group_by).rstrip())
        out.append("")
        shown = frame.sort_values(
            ["group"], key=lambda s: s.map({g: i for i, g in enumerate(order)}), kind="stable"
        ).rename(columns={"group": group_by})
        out.append(format_runs_markdown(shown, metric=metric, group_col=group_by, ci_level=ci_level))
    else:
        shown = frame.sort_values("value", ascending=not higher_is_better(metric), kind="stable")
        out.append(format_runs_markdown(shown, metric=metric, ci_level=ci_level))
        if len(shown) > 1:
            mean, low, high = mean_ci(shown["value"].tolist(), ci=ci)
            out += [
                "",
                f"All {len(shown)} runs: mean {fmt_mean_ci(mean, low, high, len(shown))} "
                f"({100 * ci:g}% Student-t CI over runs).",
            ]
            reference = (
                run_ids[0]
                if run_ids and run_ids[0] in set(shown["run_id"])
                else shown.sort_values("start_time", kind="stable")["run_id"].iloc[0]
            )
            out += _paired_vs_reference(shown, reference, keys, store, ci, notes)
    if notes:
        out += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def _paired_vs_reference(
    runs: pd.DataFrame, reference: str, keys: dict, store: Any, ci: float, notes: list[str], n_bootstrap: int = 1000
) -> list[str]:
    """Markdown lines: each run minus ``reference`` on the same images (paired bootstrap over images).

    Uses the per-image predictions every run logs; runs evaluated on other images (other labels) or
    without predictions are named in ``notes`` instead.
    """
    if keys["scalar"] is None:
        notes.append(f"no image-level paired comparison for {keys['name']!r} (not an image-level metric)")
        return []
    artifact = RunDir.predictions_artifact(keys["split"])
    probs_key = keys.get("probs_key") or "probs"
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    image_sets: dict[str, Optional[str]] = {}
    without: list[str] = []
    with tempfile.TemporaryDirectory(prefix="medtricks-compare-") as tmp:
        for run_id in runs["run_id"]:
            path = store.download_artifact(run_id, artifact, Path(tmp) / run_id)
            if path is None:
                without.append(run_id[:12])
                continue
            with np.load(path) as data:
                has_key = probs_key in data.files
            if not has_key:
                notes.append(
                    f"run {run_id[:12]}: its {artifact} has no {probs_key!r} "
                    f"(a multiclass model, or an evaluation from before operating points): not paired"
                )
                continue
            preds[run_id] = load_predictions(path, probs_key)
            image_sets[run_id] = stored_image_set(path)
    if without:
        notes.append(
            f"{len(without)} run(s) logged no {artifact}, so they are not in the "
            f"paired image comparison: {', '.join(without)}"
        )
    if reference not in preds:
        return []
    y_ref = preds[reference][0]
    names = dict(zip(runs["run_id"], runs["run_name"]))
    rows = []
    for run_id, (y, probs) in preds.items():
        if run_id == reference:
            continue
        if len(y) != len(y_ref) or not np.array_equal(y, y_ref):
            notes.append(
                f"run {run_id[:12]} was evaluated on other images than {reference[:12]} ({len(y)} vs "
                f"{len(y_ref)} images{', other labels' if len(y) == len(y_ref) else ''}): no paired Δ"
            )
            continue
        if image_sets.get(run_id) and image_sets.get(reference) and image_sets[run_id] != image_sets[reference]:
            notes.append(
                f"run {run_id[:12]} was evaluated on other images than {reference[:12]} (same labels, but "
                "another image list or order): no paired Δ"
            )
            continue
        if probs.shape != preds[reference][1].shape:
            notes.append(
                f"run {run_id[:12]} predicts {probs.shape[1]} classes, {reference[:12]} "
                f"{preds[reference][1].shape[1]}: no paired Δ"
            )
            continue
        d = image_bootstrap_delta(y_ref, [probs], [preds[reference][1]], keys["scalar"], n_bootstrap=n_bootstrap, ci=ci)
        rows.append(
            [
                names.get(run_id) or run_id[:12],
                str(run_id)[:12],
                fmt_signed(d["delta"]),
                f"[{fmt_signed(d['ci_low'])}, {fmt_signed(d['ci_high'])}]",
                fmt_p(d["p_value"]),
            ]
        )
    if not rows:
        return []
    title = (
        f"Paired on the same {len(y_ref)} {keys['split']} images: run − {names.get(reference) or reference[:12]}"
        f" ({reference[:12]}), {n_bootstrap} bootstrap resamples over images"
    )
    header = ["run", "run id", f"Δ {keys['name']}", f"{100 * ci:g}% CI", "p"]
    return ["", title, "", markdown_table(header, rows).rstrip()]


def _group_order(frame: pd.DataFrame) -> list[str]:
    """Groups in ablation order when runs carry ``variant_index``, else by first appearance."""
    idx = pd.to_numeric(frame["variant_index"], errors="coerce")
    first = frame.assign(_idx=idx).groupby("group", sort=False)["_idx"].min()
    appearance = list(dict.fromkeys(frame["group"]))
    return sorted(
        appearance,
        key=lambda g: (0 if is_finite(first[g]) else 1, first[g] if is_finite(first[g]) else 0, appearance.index(g)),
    )
