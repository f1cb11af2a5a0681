"""Statistics over seeds against scipy on known data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medtricks.evaluate import mean_ci, paired_comparison

# Per-seed AUROCs of a baseline and a variant (5 seeds, paired by seed).
BASE = np.array([0.861, 0.874, 0.858, 0.869, 0.866])
VARIANT = np.array([0.872, 0.881, 0.866, 0.884, 0.871])


def test_mean_ci_equals_scipy_t_interval():
    mean, low, high = mean_ci(BASE)
    n = len(BASE)
    half = stats.t.ppf(0.975, n - 1) * BASE.std(ddof=1) / math.sqrt(n)  # textbook formula
    assert mean == pytest.approx(BASE.mean())
    assert (low, high) == pytest.approx((BASE.mean() - half, BASE.mean() + half))
    _, low90, high90 = mean_ci(BASE, ci=0.90)
    assert low < low90 < mean < high90 < high


def test_mean_ci_known_values():
    # mean 0.82, sd 0.02, n 3: half width = t(0.975, 2) * 0.02 / sqrt(3) = 4.302653 * 0.011547
    mean, low, high = mean_ci([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82)
    assert high - mean == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)


def test_mean_ci_edge_cases():
    mean, low, high = mean_ci([0.9])
    assert mean == 0.9 and math.isnan(low) and math.isnan(high)
    assert mean_ci([0.7, 0.7, 0.7]) == (pytest.approx(0.7), pytest.approx(0.7), pytest.approx(0.7))
    with pytest.raises(ValueError, match="values is empty"):
        mean_ci([])
    with pytest.raises(ValueError, match=r"values\[1\] = nan is not finite"):
        mean_ci([0.8, float("nan")])
    with pytest.raises(ValueError, match="ci must be"):
        mean_ci([0.8, 0.9], ci=1.5)


def test_paired_t_equals_scipy_ttest_rel():
    r = paired_comparison(VARIANT, BASE)
    ref = stats.ttest_rel(VARIANT, BASE)
    diff = VARIANT - BASE
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    assert r["test"] == "paired t"
    assert r["n"] == 5
    assert r["delta_mean"] == pytest.approx(diff.mean())
    assert r["p_value"] == pytest.approx(ref.pvalue)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert r["ci_low"] > 0 and r["p_value"] < 0.05
    assert r["verdict"] == "helps"


def test_verdict_directions():
    assert paired_comparison(BASE, VARIANT)["verdict"] == "hurts"
    # for a lower-is-better metric (ECE, loss) a higher value hurts
    assert paired_comparison(VARIANT, BASE, higher_is_better=False)["verdict"] == "hurts"
    assert paired_comparison(BASE, VARIANT, higher_is_better=False)["verdict"] == "helps"
    noisy = BASE + np.array([0.01, -0.012, 0.004, -0.003, 0.002])
    r = paired_comparison(noisy, BASE)
    assert r["ci_low"] < 0 < r["ci_high"] and r["verdict"] == "no evidence"


def test_paired_wilcoxon_equals_scipy():
    r = paired_comparison(VARIANT, BASE, test="wilcoxon")
    assert r["test"] == "wilcoxon"
    assert r["p_value"] == pytest.approx(stats.wilcoxon(VARIANT, BASE).pvalue)
    # 5 seeds all better: exact two-sided p is 2/2^5 = 0.0625 -> not enough evidence at 5%
    assert r["p_value"] == pytest.approx(0.0625)
    assert r["verdict"] == "no evidence"
    rng = np.random.default_rng(0)
    base8 = 0.86 + rng.normal(0, 0.005, 8)
    r8 = paired_comparison(base8 + 0.01 + rng.normal(0, 0.002, 8), base8, test="wilcoxon")
    assert r8["p_value"] == pytest.approx(2 / 2**8) and r8["verdict"] == "helps"


def test_paired_edge_cases():
    one = paired_comparison([0.9], [0.8])
    assert one["delta_mean"] == pytest.approx(0.1) and math.isnan(one["ci_low"]) and one["verdict"] == "no evidence"
    same = paired_comparison(BASE, BASE.copy())
    assert same["delta_mean"] == 0 and same["p_value"] == 1.0 and same["verdict"] == "no evidence"
    assert paired_comparison(BASE, BASE.copy(), test="wilcoxon")["p_value"] == 1.0
    with pytest.raises(ValueError, match="a has 5 values and b has 4"):
        paired_comparison(BASE, BASE[:4])
    with pytest.raises(ValueError, match=r"test must be one of \['t', 'wilcoxon'\]"):
        paired_comparison(BASE, VARIANT, test="mannwhitney")
    with pytest.raises(ValueError, match=r"b\[2\] = inf is not finite"):
        paired_comparison(BASE, [0.8, 0.8, float("inf"), 0.8, 0.8])
