"""Ablation and comparison tables: per-seed values in, mean ± CI, paired deltas and verdicts out.

Two sources of uncertainty are reported side by side:

* **seeds** (the unit that matters for "does this trick help?"): mean with a Student-t interval
  (:func:`medtricks.evaluate.stats.mean_ci`) and a paired test against the reference variant over
  the seeds both share (:func:`medtricks.evaluate.stats.paired_comparison`, paired t or Wilcoxon);
* **images**: a paired bootstrap over the evaluation images of the seed-averaged metric difference
  (same resampled images for both variants and every seed), from the children's saved predictions.

The verdict (helps / hurts / no evidence) comes from the seed-level test.

Example::

    >>> import pandas as pd
    >>> runs = pd.DataFrame({"variant": ["baseline"] * 3 + ["+warmup"] * 3, "seed": [0, 1, 2] * 2,
    ...                      "value": [0.80, 0.82, 0.81, 0.84, 0.85, 0.85]})
    >>> table = summarize_groups(runs, ["baseline", "+warmup"])
    >>> table.loc[1, "verdict"]
    'helps'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from medtricks._defaults import DEFAULT_METRIC
from medtricks.errors import ConfigError
from medtricks.evaluate.markdown import fmt_delta_ci, fmt_mean_ci, fmt_num, fmt_p, fmt_signed, is_finite, markdown_table
from medtricks.evaluate.metrics import SCALAR_METRICS

# image_bootstrap_delta and load_predictions moved to evaluate/paired.py; importable from here as before
from medtricks.evaluate.paired import image_bootstrap_delta, load_predictions, stored_image_set
from medtricks.evaluate.stats import mean_ci, paired_comparison
from medtricks.rundir import PREDICTIONS_ARTIFACT_DIR, PREDICTIONS_FILE, RunDir, best_key, ci_keys  # noqa: F401
from medtricks.tracking import create_store

__all__ = [
    "metric_keys",
    "higher_is_better",
    "summarize_groups",
    "image_bootstrap_delta",
    "format_ablation_markdown",
    "format_runs_markdown",
    "forest_figure",
    "markdown_table",
    "compare_runs",
    "load_predictions",
    "PREDICTIONS_FILE",
]

# Where a run leaves its per-image predictions on an evaluation split (``{split}`` = val | test):
# an .npz with ``y_true`` (N,) int labels and ``probs`` (N, K) softmax probabilities, written in the
# run folder and logged as the store artifact ``RunDir.predictions_artifact(split)`` (names: medtricks.rundir).

_LOWER_IS_BETTER = ("loss", "ece")
_TEST_NAMES = {"t": "paired t", "wilcoxon": "wilcoxon"}


# -------------------------------------------------------------------------------------- metrics
def metric_keys(metric: str, *, allow_eval: bool = False) -> dict[str, Optional[str]]:
    """How a table metric maps onto what a run logged.

    ``val/auroc`` → value ``best/val/auroc`` (the best checkpoint, evaluated with bootstrap CIs),
    CI ``best/val/auroc_ci_low`` / ``_ci_high``, split ``val``, image-level name ``auroc``.
    A key already starting with ``best/`` is taken as is. With ``allow_eval`` (``compare``, not
    ``ablate``: an ablation trains, it does not evaluate) ``eval/<m>`` and ``eval/op/<m>`` name
    what ``medtricks evaluate`` / ``ensemble`` runs logged, paired through their
    ``predictions_eval.npz`` (``probs``, or ``probs_op`` at the operating point).

    >>> metric_keys("val/auroc")["value"]
    'best/val/auroc'
    >>> metric_keys("eval/op/accuracy", allow_eval=True)["probs_key"]
    'probs_op'
    """
    if allow_eval and isinstance(metric, str) and metric.startswith("eval/"):
        parts = metric.split("/")
        at_op = len(parts) > 2 and parts[1] == "op"
        name = "/".join(parts[2:] if at_op else parts[1:])
        if not name or not all(parts[1:]):
            raise ConfigError(f"metric must be eval/<name> or eval/op/<name> (e.g. eval/auroc), got {metric!r}")
        # eval/drop/<m> compares two image sets: no image-level pairing between runs
        image_level = name in SCALAR_METRICS and not (at_op and name == "ece")
        low, high = ci_keys(metric)
        return {
            "value": metric,
            "ci_low": low,
            "ci_high": high,
            "split": "eval",
            "name": "/".join(parts[1:]),
            "scalar": name if image_level else None,
            "probs_key": "probs_op" if at_op else "probs",
        }
    if isinstance(metric, str) and metric.startswith("eval/") and not allow_eval:
        raise ConfigError(
            f"metric {metric!r} is logged by evaluation runs (medtricks evaluate / ensemble), which "
            "an ablation does not make; use val/<name> or test/<name> here, and medtricks compare "
            "--runs EVAL_RUN ... --metric eval/<name> for evaluation runs"
        )
    key = metric if isinstance(metric, str) and metric.startswith("best/") else f"best/{metric}"
    parts = key.split("/")
    if not isinstance(metric, str) or len(parts) < 3 or parts[1] not in ("val", "test") or not parts[2]:
        also = ", or eval/<name> / eval/op/<name> for evaluation runs" if allow_eval else ""
        raise ConfigError(
            f"metric must be val/<name> or test/<name> (the best checkpoint's value, e.g. "
            f"val/auroc, test/accuracy, val/sensitivity/covid){also}, got {metric!r}"
        )

    name = "/".join(parts[2:])
    key = best_key(parts[1], name)
    low, high = ci_keys(key)
    return {
        "value": key,
        "ci_low": low,
        "ci_high": high,
        "split": parts[1],
        "name": name,
        "scalar": name if name in SCALAR_METRICS else None,
        "probs_key": "probs",
    }


def higher_is_better(metric: str) -> bool:
    """``False`` for losses and calibration error, ``True`` for everything else."""
    name = metric.rsplit("/", 1)[-1]
    return not any(name == m or name.endswith(m) for m in _LOWER_IS_BETTER)


# ---------------------------------------------------------------------------------- seed stats
def summarize_groups(
    runs: pd.DataFrame,
    order: Sequence[str],
    *,
    group_col: str = "variant",
    reference: Optional[str] = None,
    previous: bool = False,
    ci: float = 0.95,
    test: str = "t",
    higher_better: bool = True,
) -> pd.DataFrame:
    """One row per group: seeds, mean and CI over seeds, and the paired delta against ``reference``.

    Args:
        runs: one row per run with columns ``group_col``, ``seed`` and ``value`` (finite).
        order: the groups in table order; groups without any run get a row with ``n_seeds`` 0.
        reference: the group to compare with (default: the first of ``order``).
        previous: also compare each row with the row above (``delta_prev`` ... columns); this is how a
            cumulative ablation shows what each added trick did.
        ci, test, higher_better: see :func:`medtricks.evaluate.stats.paired_comparison`.

    Pairing is by ``seed``: only seeds present in both groups enter a comparison (``n_paired``).
    """
    if test not in _TEST_NAMES:
        raise ConfigError(f"test must be one of {sorted(_TEST_NAMES)}, got {test!r}")
    missing = {group_col, "seed", "value"} - set(runs.columns)
    if missing:
        raise ConfigError(f"runs table lacks column(s) {sorted(missing)}; has {list(runs.columns)}")
    order = list(order)
    reference = order[0] if reference is None else reference
    if reference not in order:
        raise ConfigError(f"reference {reference!r} is not one of the groups {order}")
    by_group = {g: dict(zip(df["seed"], df["value"])) for g, df in runs.groupby(group_col, sort=False)}
    unknown = sorted(set(by_group) - set(order), key=str)
    if unknown:
        raise ConfigError(f"runs of group(s) {unknown} are not in the table order {order}")
    for g, df in runs.groupby(group_col, sort=False):
        if df["seed"].duplicated().any():
            raise ConfigError(
                f"group {g!r} has more than one run for seed(s) "
                f"{sorted(df.loc[df['seed'].duplicated(), 'seed'].tolist())}; keep one per seed"
            )

    def compare(a: str, b: str, prefix: str) -> dict[str, Any]:
        va, vb = by_group.get(a, {}), by_group.get(b, {})
        seeds = sorted(set(va) & set(vb))
        out = {
            f"{prefix}": math.nan,
            f"{prefix}_ci_low": math.nan,
            f"{prefix}_ci_high": math.nan,
            f"{prefix}_p_value": math.nan,
            f"{prefix}_verdict": "",
            f"{prefix}_n_paired": len(seeds),
            f"{prefix}_unpaired_ci_low": math.nan,
            f"{prefix}_unpaired_ci_high": math.nan,
        }
        if a == b or not seeds:
            return out
        res = paired_comparison(
            [va[s] for s in seeds], [vb[s] for s in seeds], ci=ci, test=test, higher_is_better=higher_better
        )
        out.update(
            {
                f"{prefix}": res["delta_mean"],
                f"{prefix}_ci_low": res["ci_low"],
                f"{prefix}_ci_high": res["ci_high"],
                f"{prefix}_p_value": res["p_value"],
                f"{prefix}_verdict": res["verdict"],
                f"{prefix}_unpaired_ci_low": res["unpaired_ci_low"],
                f"{prefix}_unpaired_ci_high": res["unpaired_ci_high"],
            }
        )
        return out

    rows = []
    for i, group in enumerate(order):
        values = by_group.get(group, {})
        row: dict[str, Any] = {
            group_col: group,
            "n_seeds": len(values),
            "seeds": ",".join(str(s) for s in sorted(values)),
        }
        if values:
            row["mean"], row["ci_low"], row["ci_high"] = mean_ci(list(values.values()), ci=ci)
            row["std"] = float(np.std(list(values.values()), ddof=1)) if len(values) > 1 else math.nan
        else:
            row.update(mean=math.nan, ci_low=math.nan, ci_high=math.nan, std=math.nan)
        row.update(compare(group, reference, "delta"))
        if previous:
            row.update(compare(group, order[i - 1] if i else group, "delta_prev"))
        rows.append(row)
    table = pd.DataFrame(rows)
    table = table.rename(columns={"delta_verdict": "verdict"})
    table.attrs.update(reference=reference, ci=ci, test=_TEST_NAMES[test])
    return table


def pairing_gain(table: pd.DataFrame) -> Optional[float]:
    """Median over compared rows of (Welch interval width) / (paired interval width): how much narrower
    pairing by seed (common random numbers) made the Δ intervals; ``None`` when nothing compares.

    Both widths are fixed-n intervals of the same runs (``delta_ci_*`` may be a repeated CI after
    seeds-until-clear; ``delta_fixed_ci_*`` is then the fixed-n one)."""
    if "delta_unpaired_ci_low" not in table.columns:
        return None
    low = "delta_fixed_ci_low" if "delta_fixed_ci_low" in table.columns else "delta_ci_low"
    high = "delta_fixed_ci_high" if "delta_fixed_ci_high" in table.columns else "delta_ci_high"
    paired = pd.to_numeric(table[high], errors="coerce") - pd.to_numeric(table[low], errors="coerce")
    unpaired = pd.to_numeric(table["delta_unpaired_ci_high"], errors="coerce") - pd.to_numeric(
        table["delta_unpaired_ci_low"], errors="coerce"
    )
    ratio = (unpaired / paired)[(paired > 0) & np.isfinite(unpaired)]
    return float(ratio.median()) if len(ratio) else None


# ------------------------------------------------------------------------------------ formatting
def format_ablation_markdown(
    table: pd.DataFrame,
    *,
    metric: str,
    group_col: str = "variant",
    title: Optional[str] = None,
    notes: Sequence[str] = (),
    labels: Optional[dict[str, str]] = None,
) -> str:
    """The ablation table as Markdown: mean [CI] over seeds, Δ vs reference with CI, p, verdict.

    Image-bootstrap columns appear when ``table`` has ``boot_delta`` values; Δ vs the previous row
    when it has ``delta_prev`` (cumulative mode). ``labels`` maps a group to the text shown for it
    (e.g. only the trick a cumulative row adds).
    """
    labels = labels or {}
    ci = float(table.attrs.get("ci", 0.95))
    pct = f"{100 * ci:g}%"
    ref = table.attrs.get("reference", table[group_col].iloc[0])
    test = table.attrs.get("test", "paired t")
    has_prev = "delta_prev" in table.columns
    has_boot = "boot_delta" in table.columns and table["boot_delta"].map(is_finite).any()
    interval = table.attrs.get("interval")  # "repeated CI, pocock" after seeds-until-clear (sequential.py)
    header = [group_col, "seeds", f"{metric} mean [{pct} CI]", f"Δ vs {ref} [{pct} {interval or 'CI'}]", f"p ({test})"]
    if has_boot:
        header += [f"Δ image bootstrap [{pct} CI]", "p (bootstrap)"]
    if has_prev:
        header += [f"Δ vs previous [{pct} CI]", "p (prev)"]
    header.append("verdict")
    rows = []
    for _, r in table.iterrows():
        is_ref = r[group_col] == ref
        row = [
            labels.get(r[group_col], r[group_col]),
            str(int(r["n_seeds"])),
            fmt_mean_ci(r["mean"], r["ci_low"], r["ci_high"], int(r["n_seeds"])),
            "(reference)" if is_ref else fmt_delta_ci(r["delta"], r["delta_ci_low"], r["delta_ci_high"]),
            "" if is_ref else fmt_p(r["delta_p_value"]),
        ]
        if has_boot:
            row += [
                "" if is_ref else fmt_delta_ci(r.get("boot_delta"), r.get("boot_ci_low"), r.get("boot_ci_high")),
                "" if is_ref else fmt_p(r.get("boot_p_value")),
            ]
        if has_prev:
            first = r[group_col] == table[group_col].iloc[0]
            row += [
                "" if first else fmt_delta_ci(r["delta_prev"], r["delta_prev_ci_low"], r["delta_prev_ci_high"]),
                "" if first else fmt_p(r["delta_prev_p_value"]),
            ]
        row.append("" if is_ref else (r["verdict"] or "no evidence"))
        rows.append(row)
    out = [f"### {title}", ""] if title else []
    out.append(markdown_table(header, rows))
    explain = [
        f"Mean and {pct} Student-t CI over seeds; Δ = paired difference over the seeds both "
        f"variants share ({test} test); verdict from that test at α = {1 - ci:.2g}."
    ]
    if interval:
        explain = [
            f"Mean and {pct} Student-t CI over seeds; Δ = paired difference over the seeds both variants "
            f"share, with its {pct} group-sequential {interval} (no fixed-n p-value: the number of seeds "
            "was chosen by looking); verdict: helps / hurts when that interval excludes 0."
        ]
    gain = pairing_gain(table)
    if gain is not None:
        explain.append(
            f"Common random numbers: the paired Δ intervals are {gain:.2g}x narrower (median over "
            "variants) than Welch intervals of the same runs that ignore the pairing."
        )
    if has_boot:
        explain.append(
            "Δ image bootstrap: paired bootstrap over the evaluation images of the seed-averaged "
            "difference (same resampled images for both variants)."
        )
    if has_prev:
        explain.append(
            "Cumulative: each row adds its trick to everything above it (full variant names in the "
            "CSV); Δ vs previous isolates the trick."
        )
    out += ["", *explain]
    if notes:
        out += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def format_runs_markdown(
    runs: pd.DataFrame, *, metric: str, group_col: Optional[str] = None, ci_level: Optional[float] = None
) -> str:
    """Per-run table: name, id, seed, value with the bootstrap CI that run logged, status, tricks."""
    pct = f"{100 * ci_level:g}% " if ci_level else ""
    header = ([group_col] if group_col else []) + [
        "run",
        "run id",
        "seed",
        metric,
        f"bootstrap {pct}CI",
        "status",
        "tricks",
    ]
    rows = []
    for _, r in runs.iterrows():
        ci_text = f"[{fmt_num(r['ci_low'])}, {fmt_num(r['ci_high'])}]" if is_finite(r["ci_low"]) else "-"
        rows.append(
            ([r[group_col]] if group_col else [])
            + [
                r["run_name"],
                str(r["run_id"])[:12],
                "-" if pd.isna(r["seed"]) else str(int(r["seed"])),
                fmt_num(r["value"]),
                ci_text,
                r["status"],
                r.get("tricks") or "-",
            ]
        )
    return markdown_table(header, rows)


def forest_figure(
    table: pd.DataFrame, *, metric: str, group_col: str = "variant", labels: Optional[dict[str, str]] = None
):
    """Forest plot of the table (mean and CI over seeds per row), the reference mean as a line."""
    # evaluate.plots imports matplotlib (~0.5 s) at import time: only the ablation's forest plot needs
    # it, so `medtricks compare` (tables only) does not pay for it.
    from medtricks.evaluate.plots import plot_forest

    labels = labels or {}
    shown = table[table["mean"].map(is_finite)]
    if shown.empty:
        raise ConfigError("no row of the table has a finite mean: nothing to plot")
    ref = table.attrs.get("reference")
    ref_rows = shown.loc[shown[group_col] == ref, "mean"]
    names = [f"{labels.get(g, g)} (n={int(n)})" for g, n in zip(shown[group_col], shown["n_seeds"])]
    ci = float(table.attrs.get("ci", 0.95))
    return plot_forest(
        names,
        shown["mean"].tolist(),
        shown["ci_low"].tolist(),
        shown["ci_high"].tolist(),
        reference=float(ref_rows.iloc[0]) if len(ref_rows) else None,
        xlabel=f"{metric} (mean, {100 * ci:g}% CI over seeds)",
    )


# --------------------------------------------------------------------------------------- compare
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
    import tempfile

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
