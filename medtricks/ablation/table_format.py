"""How a table is shown: the ablation / group table and the per-run table as Markdown, and the forest plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import pandas as pd

from medtricks.ablation.seed_stats import pairing_gain
from medtricks.errors import ConfigError
from medtricks.evaluate.markdown import fmt_delta_ci, fmt_mean_ci, fmt_num, fmt_p, is_finite, markdown_table

__all__ = ["format_ablation_markdown", "format_runs_markdown", "forest_figure"]


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
