"""Which seeds an ablation trains: a count or a list (each a valid ``experiment.seed``), and with
``until_ci`` (seeds until the answer is clear) the look schedule fixed before any seed trains, the
group-sequential decision after each round, and that decision's repeated CIs put into the table.
The statistics themselves are in :mod:`medtricks.ablation.sequential`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from medtricks.ablation.sequential import BOUNDARIES, look_schedule, sequential_look
from medtricks.errors import ConfigError
from medtricks.evaluate.markdown import is_finite
from medtricks.recipe import SEED_LIMIT


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
