"""Seed-level statistics of a table: one row per group (variant) with the mean and Student-t CI over
seeds, and the paired-by-seed difference to a reference (and, cumulatively, to the row above).

The verdict (helps / hurts / no evidence) comes from this seed-level test
(:func:`medtricks.evaluate.stats.paired_comparison`, paired t or Wilcoxon).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import pandas as pd

from medtricks.errors import ConfigError
from medtricks.evaluate.stats import mean_ci, paired_comparison

__all__ = ["summarize_groups", "pairing_gain"]

_TEST_NAMES = {"t": "paired t", "wilcoxon": "wilcoxon"}


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
