"""Statistics over seeds: mean with a t-interval, and paired comparisons of two variants.

Seeds are the unit here (one metric value per training run), so intervals come from the Student t
distribution (``scipy.stats``), not from resampling images — for that see
:func:`medtricks.evaluate.metrics.paired_bootstrap_delta`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from medtricks.errors import ConfigError

__all__ = ["mean_ci", "paired_comparison"]

_TESTS = {"t": "paired t", "wilcoxon": "wilcoxon"}


def _as_values(values: Any, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D sequence of per-seed metric values, got shape {v.shape}")
    if v.size == 0:
        raise ConfigError(f"{name} is empty: need at least one per-seed value")
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise ConfigError(
            f"{name}[{int(bad[0])}] = {v[bad[0]]} is not finite; a failed run must be re-run or removed explicitly"
        )
    return v


def _check_ci(ci: float) -> None:
    if not (0.0 < float(ci) < 1.0):
        raise ConfigError(f"ci must be a confidence level strictly between 0 and 1 (e.g. 0.95), got {ci!r}")


def mean_ci(values: Sequence[float], ci: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval over seeds: ``(mean, low, high)``.

    One value gives ``(v, nan, nan)`` (no spread to estimate); identical values give a zero-width
    interval.

    >>> mean_ci([0.80, 0.82, 0.84])  # doctest: +ELLIPSIS
    (0.82, 0.770..., 0.869...)
    """
    v = _as_values(values, "values")
    _check_ci(ci)
    mean = float(v.mean())
    if v.size == 1:
        return (mean, math.nan, math.nan)
    sem = float(stats.sem(v))
    if sem == 0.0:  # scipy's t.interval is nan for scale 0; the interval is the point
        return (mean, mean, mean)
    low, high = stats.t.interval(ci, df=v.size - 1, loc=mean, scale=sem)
    return (mean, float(low), float(high))


def paired_comparison(
    a: Sequence[float], b: Sequence[float], *, ci: float = 0.95, test: str = "t", higher_is_better: bool = True
) -> dict[str, Any]:
    """Compare variant ``a`` with baseline ``b`` over seeds (``a[i]`` and ``b[i]`` share seed ``i``).

    Args:
        a, b: per-seed values of one metric, paired by seed.
        ci: confidence level; the test's significance level is ``1 - ci``.
        test: ``"t"`` (``scipy.stats.ttest_rel``) or ``"wilcoxon"`` (``scipy.stats.wilcoxon``, exact
            for small n; note that with 5 seeds its smallest two-sided p is 0.0625).
        higher_is_better: ``False`` for metrics like ``ece`` or ``loss``, so that "helps" means lower.

    Returns:
        ``{"delta_mean", "ci_low", "ci_high", "p_value", "test", "verdict", "n", "unpaired_ci_low",
        "unpaired_ci_high"}`` where ``delta_mean = mean(a - b)`` and the interval is the paired t-interval
        of that mean (for both tests). ``unpaired_ci_*`` is the Welch interval of the same difference that
        ignores the pairing — what independent draws per variant would give, so the ratio of the two
        widths measures what common random numbers bought (``scipy.stats.ttest_ind``). ``verdict`` is ``"helps"`` / ``"hurts"`` when the interval excludes 0 *and*
        ``p_value < 1 - ci`` (the two agree for the t-test), otherwise ``"no evidence"``.

    Example:
        >>> r = paired_comparison([0.91, 0.92, 0.90, 0.93, 0.92], [0.89, 0.90, 0.89, 0.90, 0.91])
        >>> r["verdict"], round(r["delta_mean"], 3)
        ('helps', 0.018)
    """
    if test not in _TESTS:
        raise ConfigError(f"test must be one of {sorted(_TESTS)}, got {test!r}")
    _check_ci(ci)
    av, bv = _as_values(a, "a"), _as_values(b, "b")
    if av.size != bv.size:
        raise ConfigError(
            f"a has {av.size} values and b has {bv.size}; paired comparison needs one value per seed in both"
        )
    diff = av - bv
    delta = float(diff.mean())
    out: dict[str, Any] = {
        "delta_mean": delta,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "p_value": math.nan,
        "test": _TESTS[test],
        "verdict": "no evidence",
        "n": int(diff.size),
        "unpaired_ci_low": math.nan,
        "unpaired_ci_high": math.nan,
    }
    if diff.size < 2:
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision-loss notes on tiny spreads
        if np.all(diff == diff[0]):
            # No spread: scipy's t-test gives nan (all zero) or inf/p=0; report the exact interval
            # and, as the t-test would, count a constant nonzero shift as evidence.
            out["ci_low"] = out["ci_high"] = delta
            out["p_value"] = 1.0 if delta == 0.0 else 0.0
        else:
            res = stats.ttest_rel(av, bv)
            interval = res.confidence_interval(confidence_level=ci)
            out["ci_low"], out["ci_high"] = float(interval.low), float(interval.high)
            out["p_value"] = float(res.pvalue)
        if av.std() > 0 or bv.std() > 0:  # Welch needs a spread in at least one group
            welch = stats.ttest_ind(av, bv, equal_var=False).confidence_interval(confidence_level=ci)
            out["unpaired_ci_low"], out["unpaired_ci_high"] = float(welch.low), float(welch.high)
        if test == "wilcoxon":
            out["p_value"] = 1.0 if np.all(diff == 0) else float(stats.wilcoxon(av, bv).pvalue)

    alpha = 1.0 - ci
    excludes_zero = out["ci_low"] > 0 or out["ci_high"] < 0
    if excludes_zero and out["p_value"] < alpha:
        better = (delta > 0) == higher_is_better
        out["verdict"] = "helps" if better else "hurts"
    return out
