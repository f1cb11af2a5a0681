"""Validation and test side by side, with the gap: the table a run prints at its end.

The split that chose the checkpoint (validation) flatters the model; the held-out test split does
not. Printing them together, with ``test - val``, makes the gap impossible to miss.

Example::

    print(split_table({"val": val_metrics, "test": test_metrics}))
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from medtricks.errors import ConfigError

__all__ = ["split_table", "split_gaps", "headline_keys", "bootstrap_note"]


def headline_keys(values: dict, positive: Optional[str] = None) -> list[str]:
    """The metrics a reader compares first: accuracy, balanced accuracy, AUROC, the positive class's
    sensitivity and specificity (binary; every class's when ``positive`` is None), F1 and ECE — in
    that order, those present."""
    keys = ["accuracy", "balanced_accuracy", "auroc"]
    if positive is not None:
        keys += [f"sensitivity/{positive}", f"specificity/{positive}"]
    else:  # multiclass: every class's sensitivity and specificity
        keys += [k for k in values if k.startswith(("sensitivity/", "specificity/"))]
    keys += ["f1", "ece"]
    return [k for k in keys if k in values]


def split_gaps(results: dict, reference: str = "val", keys: Optional[Sequence[str]] = None) -> dict[str, float]:
    """``{"<split>-<reference>/<metric>": value}`` for every other split, e.g. ``test-val/auroc``."""
    ref = results[reference].values
    keys = list(keys) if keys is not None else [k for k in ref if k != "n"]
    out = {}
    for split, res in results.items():
        if split == reference or res is None:
            continue
        for key in keys:
            a, b = res.values.get(key, math.nan), ref.get(key, math.nan)
            if math.isfinite(a) and math.isfinite(b):
                out[f"{split}-{reference}/{key}"] = float(a - b)
    return out


def _cell(res, key: str) -> str:
    value = res.values.get(key, math.nan)
    if not math.isfinite(value):
        return "nan"
    low, high = res.ci.get(key, (math.nan, math.nan))
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{value:.3f}"


def bootstrap_note(result) -> str:
    """``[95% percentile-bootstrap CIs over images, 500 resamples, seed 0]`` ("" without CIs)."""
    if not result.ci:
        return ""
    seed = f", seed {result.seed}" if getattr(result, "seed", None) is not None else ""
    return f"[{100 * result.ci_level:g}% percentile-bootstrap CIs over images, {result.n_bootstrap} resamples{seed}]"


def split_table(
    results: dict,
    *,
    keys: Optional[Sequence[str]] = None,
    reference: str = "val",
    title: str = "",
    ci_note: bool = True,
) -> str:
    """Aligned table: one row per metric, one column per split (value [95% CI]), then the gap of each
    other split against ``reference``. ``results`` maps split name -> MetricsResult (None skipped).
    ``ci_note=False`` leaves out the line that says how the CIs were made (:func:`bootstrap_note`), for
    a report that says it once under several tables."""
    results = {k: v for k, v in results.items() if v is not None}
    if reference not in results:
        raise ConfigError(f"split_table needs the reference split {reference!r}; got {sorted(results)}")
    first = results[reference]
    keys = list(keys) if keys is not None else [k for k in first.values if k != "n"]
    others = [s for s in results if s != reference]
    head = (
        ["metric"]
        + [f"{s} (n={int(r.values.get('n', 0))})" for s, r in results.items()]
        + [f"{s} - {reference}" for s in others]
    )
    rows = [head]
    for key in keys:
        row = [key] + [_cell(r, key) for r in results.values()]
        for s in others:
            a, b = results[s].values.get(key, math.nan), first.values.get(key, math.nan)
            row.append(f"{a - b:+.3f}" if math.isfinite(a) and math.isfinite(b) else "")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [title] if title else []
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    if ci_note and bootstrap_note(first):
        lines.append(bootstrap_note(first))
    return "\n".join(lines)
