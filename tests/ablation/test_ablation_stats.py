"""Ablation statistics against scipy on known data, and the image-level paired bootstrap."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from medtricks.ablation.table import (
    format_ablation_markdown,
    higher_is_better,
    image_bootstrap_delta,
    metric_keys,
    summarize_groups,
)
from medtricks.evaluate.metrics import paired_bootstrap_delta

BASE = [0.80, 0.82, 0.81, 0.79, 0.83]
WARM = [0.84, 0.85, 0.85, 0.82, 0.86]
BOTH = [0.84, 0.86, 0.84, 0.83, 0.85]


def _runs():
    rows = [("baseline", s, v) for s, v in enumerate(BASE)] + [("+warmup", s, v) for s, v in enumerate(WARM)]
    rows += [("+warmup +cosine", s, v) for s, v in enumerate(BOTH)]
    return pd.DataFrame(rows, columns=["variant", "seed", "value"])


def test_summary_matches_scipy():
    table = summarize_groups(_runs(), ["baseline", "+warmup", "+warmup +cosine"], previous=True)
    row = table.set_index("variant").loc["+warmup"]
    mean = np.mean(WARM)
    low, high = stats.t.interval(0.95, df=4, loc=mean, scale=stats.sem(WARM))
    assert row["n_seeds"] == 5 and row["seeds"] == "0,1,2,3,4"
    assert row["mean"] == pytest.approx(mean) and (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    diff = np.subtract(WARM, BASE)
    t = stats.ttest_rel(WARM, BASE)
    d_low, d_high = stats.t.interval(0.95, df=4, loc=diff.mean(), scale=stats.sem(diff))
    assert row["delta"] == pytest.approx(diff.mean())
    assert (row["delta_ci_low"], row["delta_ci_high"]) == pytest.approx((d_low, d_high))
    assert row["delta_p_value"] == pytest.approx(t.pvalue)
    assert row["verdict"] == "helps"
    # cumulative: the last row against the row above isolates the added trick (no evidence here)
    last = table.set_index("variant").loc["+warmup +cosine"]
    assert last["delta_prev"] == pytest.approx(np.mean(np.subtract(BOTH, WARM)))
    assert last["delta_prev_p_value"] == pytest.approx(stats.ttest_rel(BOTH, WARM).pvalue)
    assert last["delta_prev_verdict"] == "no evidence"
    assert table.attrs["reference"] == "baseline"


def test_wilcoxon_and_lower_is_better():
    table = summarize_groups(_runs(), ["baseline", "+warmup", "+warmup +cosine"], test="wilcoxon")
    row = table.set_index("variant").loc["+warmup"]
    assert row["delta_p_value"] == pytest.approx(stats.wilcoxon(WARM, BASE).pvalue)
    assert row["verdict"] == "no evidence"  # 5 seeds: the smallest exact two-sided Wilcoxon p is 0.0625
    loss = summarize_groups(_runs(), ["baseline", "+warmup", "+warmup +cosine"], higher_better=False)
    assert loss.set_index("variant").loc["+warmup", "verdict"] == "hurts"
    assert higher_is_better("val/auroc") and not higher_is_better("val/ece") and not higher_is_better("val/loss")


def test_pairs_by_shared_seeds_only():
    runs = _runs()
    runs = runs[~((runs["variant"] == "+warmup") & (runs["seed"] == 4))]  # a failed child
    table = summarize_groups(runs, ["baseline", "+warmup", "+warmup +cosine", "+never_ran"])
    row = table.set_index("variant").loc["+warmup"]
    assert row["n_seeds"] == 4 and row["delta_n_paired"] == 4
    assert row["delta"] == pytest.approx(np.mean(np.subtract(WARM[:4], BASE[:4])))
    empty = table.set_index("variant").loc["+never_ran"]
    assert empty["n_seeds"] == 0 and math.isnan(empty["mean"])
    one = summarize_groups(runs[runs["seed"] == 0], ["baseline", "+warmup", "+warmup +cosine"])
    assert math.isnan(one.loc[1, "ci_low"]) and one.loc[1, "verdict"] == "no evidence"


def test_bad_tables_are_rejected():
    runs = _runs()
    with pytest.raises(ValueError, match="not in the table order"):
        summarize_groups(runs, ["baseline", "+warmup"])
    with pytest.raises(ValueError, match="more than one run for seed"):
        summarize_groups(pd.concat([runs, runs.iloc[:1]]), ["baseline", "+warmup", "+warmup +cosine"])
    with pytest.raises(ValueError, match="lacks column"):
        summarize_groups(runs.drop(columns="seed"), ["baseline"])
    with pytest.raises(ValueError, match="val/<name>"):
        metric_keys("train/auroc")
    assert metric_keys("val/auroc")["value"] == "best/val/auroc"
    assert metric_keys("test/sensitivity/covid")["scalar"] is None


def _preds(seed, quality, n=80, k=3):
    rng = np.random.default_rng(seed)
    y = np.random.default_rng(0).integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += quality
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def test_image_bootstrap_one_seed_equals_library():
    y, good = _preds(1, 2.0)
    _, bad = _preds(2, 0.5)
    ours = image_bootstrap_delta(y, [good], [bad], "auroc", n_bootstrap=200, seed=3)
    lib = paired_bootstrap_delta(y, good, bad, "auroc", n_bootstrap=200, seed=3)
    for key in ("delta", "ci_low", "ci_high", "p_value", "n_skipped"):
        assert ours[key] == pytest.approx(lib[key]), key


def test_image_bootstrap_averages_seeds():
    y, a0 = _preds(1, 2.0)
    a1 = _preds(3, 1.5)[1]
    b0, b1 = _preds(2, 0.5)[1], _preds(4, 0.8)[1]
    res = image_bootstrap_delta(y, [a0, a1], [b0, b1], "auroc", n_bootstrap=200)

    def auc(p):
        return roc_auc_score(y, p, multi_class="ovr", average="macro")

    expected = np.mean([auc(a0) - auc(b0), auc(a1) - auc(b1)])
    assert res["delta"] == pytest.approx(expected) and res["n_seeds"] == 2
    assert res["ci_low"] < res["delta"] < res["ci_high"] and res["ci_low"] > 0 and res["p_value"] < 0.05
    with pytest.raises(ValueError, match="same non-zero number of seeds"):
        image_bootstrap_delta(y, [a0], [b0, b1], "auroc")
    with pytest.raises(ValueError, match="shapes"):
        image_bootstrap_delta(y, [a0], [b0[:10]], "auroc")


def test_markdown_carries_seeds_mean_and_ci():
    table = summarize_groups(_runs(), ["baseline", "+warmup", "+warmup +cosine"], previous=True)
    md = format_ablation_markdown(table, metric="val/auroc", title="demo")
    lines = md.splitlines()
    assert lines[0] == "### demo"
    header = lines[2]
    for col in (
        "seeds",
        "val/auroc mean [95% CI]",
        "Δ vs baseline [95% CI]",
        "p (paired t)",
        "Δ vs previous",
        "verdict",
    ):
        assert col in header
    warm = next(line for line in lines if line.startswith("| +warmup "))
    row = table.set_index("variant").loc["+warmup"]
    assert f"{row['mean']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]" in warm
    assert f"{row['delta']:+.4f}" in warm and "helps" in warm
    assert "(reference)" in next(line for line in lines if line.startswith("| baseline "))


def test_unpaired_interval_is_welch_and_pairing_gain_is_reported():
    """Common random numbers: the table keeps the Welch interval that ignores the pairing, so the gain
    from pairing by seed is measured on the same runs (seed effects shared by both variants cancel)."""
    table = summarize_groups(_runs(), ["baseline", "+warmup", "+warmup +cosine"])
    row = table.set_index("variant").loc["+warmup"]
    welch = stats.ttest_ind(WARM, BASE, equal_var=False).confidence_interval(0.95)
    assert (row["delta_unpaired_ci_low"], row["delta_unpaired_ci_high"]) == pytest.approx((welch.low, welch.high))
    paired_width = row["delta_ci_high"] - row["delta_ci_low"]
    assert welch.high - welch.low > paired_width  # here the seeds move both variants together
    gains = []
    for name in ("+warmup", "+warmup +cosine"):
        r = table.set_index("variant").loc[name]
        gains.append(
            (r["delta_unpaired_ci_high"] - r["delta_unpaired_ci_low"]) / (r["delta_ci_high"] - r["delta_ci_low"])
        )
    from medtricks.ablation.table import pairing_gain

    assert pairing_gain(table) == pytest.approx(float(np.median(gains)))
    assert f"{pairing_gain(table):.2g}x narrower" in format_ablation_markdown(table, metric="test/auroc")


def test_pairing_gain_below_one_when_seeds_anticorrelate():
    # a variant whose seed effects run against the baseline's: pairing widens the interval, and the table says so
    runs = pd.DataFrame(
        [("baseline", s, v) for s, v in enumerate([0.80, 0.82, 0.84, 0.86])]
        + [("+x", s, v) for s, v in enumerate([0.86, 0.84, 0.82, 0.80])],
        columns=["variant", "seed", "value"],
    )
    from medtricks.ablation.table import pairing_gain

    table = summarize_groups(runs, ["baseline", "+x"])
    assert pairing_gain(table) < 1.0
    one = summarize_groups(runs[runs.seed == 0], ["baseline", "+x"])  # one seed: no interval, no gain
    assert pairing_gain(one) is None
