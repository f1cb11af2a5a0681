"""Metrics and bootstrap CIs: hand-computed examples, agreement with sklearn, degenerate resamples."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score, roc_auc_score

from medtricks.evaluate import (
    MetricsResult,
    bootstrap_ci,
    compute_metrics,
    expected_calibration_error,
    paired_bootstrap_delta,
)


def _binary(p_pos):
    p_pos = np.asarray(p_pos, dtype=float)
    return np.stack([1 - p_pos, p_pos], axis=1)


def _synthetic(n, k, signal=1.5, seed=0):
    """Labels and softmax probabilities of a moderately good classifier."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- hand-computed example
# y = [0, 0, 0, 1, 1], p(positive) = [.22, .31, .72, .83, .42] -> predictions [0, 0, 1, 1, 0]
HAND_Y = np.array([0, 0, 0, 1, 1])
HAND_P = _binary([0.22, 0.31, 0.72, 0.83, 0.42])


def test_hand_computed_binary_example():
    res = compute_metrics(HAND_Y, HAND_P, ["normal", "pneumonia"], n_bootstrap=0)
    v = res.values
    assert v["n"] == 5
    assert v["accuracy"] == pytest.approx(3 / 5)
    assert v["sensitivity/normal"] == pytest.approx(2 / 3)  # 2 of 3 normals called normal
    assert v["sensitivity/pneumonia"] == pytest.approx(1 / 2)
    assert v["specificity/pneumonia"] == pytest.approx(2 / 3)  # = sensitivity of the negatives
    assert v["specificity/normal"] == pytest.approx(1 / 2)
    assert v["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # F1(normal): TP 2, FP 1, FN 1 -> 4/6; F1(pneumonia): TP 1, FP 1, FN 1 -> 2/4
    assert v["f1"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    # positives .83, .42 vs negatives .22, .31, .72: .83 beats 3, .42 beats 2 -> 5/6
    assert v["auroc"] == pytest.approx(5 / 6)
    # confidences .78 .69 .72 .83 .58, correct 1 1 0 1 0; 15 bins put .69 and .72 together:
    # (|.78-1| + 2*|.705-.5| + |.83-1| + |.58-0|) / 5
    assert v["ece"] == pytest.approx((0.22 + 0.41 + 0.17 + 0.58) / 5, abs=1e-6)
    assert res.ci == {}


def test_binary_auroc_is_for_positive_class_classes_1():
    y = np.array([0, 1, 0, 1, 1, 0])
    p = _binary([0.1, 0.8, 0.35, 0.4, 0.9, 0.6])
    res = compute_metrics(y, p, ["neg", "pos"], n_bootstrap=0)
    assert res.values["auroc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    # not the (identical for binary) complement trick: check it is not 1 - AUROC
    assert res.values["auroc"] > 0.5


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (5, 2)])
def test_point_metrics_equal_sklearn(k, seed):
    y, p = _synthetic(300, k, signal=1.0, seed=seed)
    classes = [f"c{i}" for i in range(k)]
    v = compute_metrics(y, p, classes, n_bootstrap=0).values
    pred = p.argmax(1)
    assert v["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert v["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert v["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    expected_auc = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert v["auroc"] == pytest.approx(expected_auc)
    sens = recall_score(y, pred, average=None, labels=list(range(k)))
    for c in range(k):
        assert v[f"sensitivity/c{c}"] == pytest.approx(sens[c])
        # specificity of c = recall of "not c"
        assert v[f"specificity/c{c}"] == pytest.approx(recall_score(y != c, pred != c))


def test_f1_matches_sklearn_when_a_class_is_never_predicted():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    p = np.array([[0.8, 0.1, 0.1]] * 4 + [[0.1, 0.1, 0.8]] * 3)  # class 1 never predicted
    v = compute_metrics(y, p, ["a", "b", "c"], n_bootstrap=0).values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert v["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro", zero_division=0))
    assert v["sensitivity/b"] == 0.0


def _ece_reference(y, p, n_bins):
    """Independent numpy ECE (Guo et al. 2017) with right-closed bins, for checking MONAI's binning."""
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(conf[m].mean() - correct[m].mean())
    return total / len(y)


@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_matches_reference(n_bins):
    y, p = _synthetic(400, 3, signal=2.0, seed=3)
    assert expected_calibration_error(y, p, n_bins) == pytest.approx(_ece_reference(y, p, n_bins), abs=1e-5)
    assert compute_metrics(y, p, ["a", "b", "c"], n_bootstrap=0, ece_bins=n_bins).values["ece"] == pytest.approx(
        _ece_reference(y, p, n_bins), abs=1e-5
    )


def test_ece_zero_for_perfectly_calibrated_and_large_for_overconfident():
    # confidence 0.75 and exactly 3 of 4 right in that bin -> ECE 0
    y = np.array([0, 0, 0, 1])
    p = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-6)
    # always 99% sure and always wrong -> ECE 0.99
    assert expected_calibration_error([1, 1], [[0.99, 0.01], [0.99, 0.01]]) == pytest.approx(0.99, abs=1e-6)


# ---------------------------------------------------------------- bootstrap CIs
def test_ci_keys_contain_point_and_narrow_with_more_data():
    y, p = _synthetic(150, 3, seed=4)
    small = compute_metrics(y, p, ["a", "b", "c"], n_bootstrap=200, seed=0)
    assert set(small.ci) == set(small.values) - {"n"}
    for key, (low, high) in small.ci.items():
        assert low <= small.values[key] <= high, key
    y2, p2 = _synthetic(1500, 3, seed=4)
    big = compute_metrics(y2, p2, ["a", "b", "c"], n_bootstrap=200, seed=0)
    for key in ("accuracy", "auroc", "ece", "sensitivity/a"):
        width_small = small.ci[key][1] - small.ci[key][0]
        width_big = big.ci[key][1] - big.ci[key][0]
        assert width_big < 0.6 * width_small, key  # ~sqrt(10) narrower in theory


def test_bootstrap_is_reproducible_and_seeded():
    y, p = _synthetic(120, 2, seed=5)
    a = compute_metrics(y, p, ["n", "p"], n_bootstrap=100, seed=7)
    b = compute_metrics(y, p, ["n", "p"], n_bootstrap=100, seed=7)
    c = compute_metrics(y, p, ["n", "p"], n_bootstrap=100, seed=8)
    assert a.ci == b.ci
    assert a.ci["auroc"] != c.ci["auroc"]


def test_degenerate_resamples_are_skipped_and_counted():
    # one positive in 10: about (9/10)^10 = 35% of resamples have no positive -> AUROC undefined
    y = np.array([0] * 9 + [1])
    p = _binary([0.1, 0.2, 0.3, 0.15, 0.4, 0.05, 0.6, 0.2, 0.1, 0.7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning leaks out of the resampling loop either
        res = compute_metrics(y, p, ["normal", "nodule"], n_bootstrap=300, seed=0)
    skipped = res.n_skipped["auroc"]
    assert 0.2 * 300 < skipped < 0.5 * 300
    assert res.n_skipped["sensitivity/nodule"] == skipped  # same resamples lack the positive
    # class averages change meaning without a class: skipped on exactly those resamples too
    assert res.n_skipped["balanced_accuracy"] == skipped and res.n_skipped["f1"] == skipped
    assert res.n_skipped["accuracy"] == 0 and res.n_skipped["ece"] == 0
    low, high = res.ci["auroc"]
    assert math.isfinite(low) and low <= res.values["auroc"] <= high
    assert res.to_dict()["auroc_ci_skipped"] == skipped
    assert "accuracy_ci_skipped" not in res.to_dict()
    assert f"CI from {300 - skipped} of 300 resamples" in res.table()


def test_stratified_resampling_never_loses_a_class():
    y = np.array([0] * 9 + [1])
    p = _binary([0.1, 0.2, 0.3, 0.15, 0.4, 0.05, 0.6, 0.2, 0.1, 0.7])
    res = compute_metrics(y, p, ["normal", "nodule"], n_bootstrap=100, stratified=True)
    assert res.n_skipped["auroc"] == 0
    # the single positive is always resampled as itself -> its sensitivity never varies
    assert res.ci["sensitivity/nodule"] == (1.0, 1.0)


def test_class_missing_from_y_true_gives_nan_with_warning_not_a_crash():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([[0.6, 0.3, 0.1]] * 3 + [[0.2, 0.7, 0.1]] * 3)
    with pytest.warns(RuntimeWarning, match=r"no images of class\(es\) \['c'\]"):
        res = compute_metrics(y, p, ["a", "b", "c"], n_bootstrap=50)
    assert math.isnan(res.values["auroc"]) and math.isnan(res.values["sensitivity/c"])
    assert res.values["specificity/c"] == 1.0
    assert all(math.isnan(x) for x in res.ci["auroc"])
    assert res.values["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert "undefined (a class has no images in y_true): auroc, sensitivity/c" in res.table()


def test_single_image_does_not_crash():
    with pytest.warns(RuntimeWarning, match="no images of class"):
        res = compute_metrics([1], _binary([0.9]), ["neg", "pos"], n_bootstrap=20)
    assert res.values["accuracy"] == 1.0
    assert math.isnan(res.values["auroc"])


def test_to_dict_and_table():
    y, p = _synthetic(80, 2, seed=6)
    res = compute_metrics(y, p, ["normal", "pneumonia"], n_bootstrap=50)
    d = res.to_dict()
    expected = set(res.values) | {f"{k}_ci_{s}" for k in res.ci for s in ("low", "high")}
    assert set(d) - expected <= {f"{k}_ci_skipped" for k in res.ci}
    assert expected <= set(d)
    assert d["auroc_ci_low"] == res.ci["auroc"][0]
    assert all(isinstance(v, float) for v in d.values())
    table = res.table(title="test set")
    lines = table.splitlines()
    assert lines[0].startswith("test set") and "n=80" in lines[0]
    assert "95% CI" in lines[1]
    for key in res.ci:
        row = next(line for line in lines if line.split()[0] == key)
        assert f"{res.values[key]:.4f}" in row and f"[{res.ci[key][0]:.4f}, {res.ci[key][1]:.4f}]" in row
    # aligned: every CI column starts at the same offset
    assert len({line.index("[") for line in lines if line.split() and line.split()[0] in res.ci}) == 1
    assert "95% CI" not in compute_metrics(y, p, ["normal", "pneumonia"], n_bootstrap=0).table()
    assert isinstance(res, MetricsResult)


def test_float_labels_and_float32_probs_accepted():
    y, p = _synthetic(50, 3, seed=7)
    v1 = compute_metrics(y, p, ["a", "b", "c"], n_bootstrap=0).values
    v2 = compute_metrics(y.astype(float), p.astype(np.float32), ["a", "b", "c"], n_bootstrap=0).values
    assert v1["auroc"] == pytest.approx(v2["auroc"], abs=1e-6)


@pytest.mark.parametrize(
    "y,p,classes,kwargs,match",
    [
        ([0, 1], [[2.0, -1.0], [0.5, 0.3]], ["a", "b"], {}, r"outside \[0, 1\].*logits"),
        ([0, 1], [[0.5, 0.3], [0.5, 0.5]], ["a", "b"], {}, r"row 0 sums to 0\.8"),
        ([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {}, r"2 rows but y_true has 3"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {}, r"y_true\[1\] = 2 is not a class index: expected 0\.\.1"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a"], {}, r"classes has 1 names"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "a"], {}, r"duplicates \['a'\]"),
        ([0, 1], [0.2, 0.7], ["a", "b"], {}, r"shape \(N, K\).*np\.stack"),
        ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {}, r"integer class indices"),
        ([0, 1], [[0.5, 0.5], [np.nan, 0.5]], ["a", "b"], {}, r"probs\[1, 0\] = nan is not finite"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {"ci": 95}, r"ci must be .* between 0 and 1"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {"n_bootstrap": -1}, r"n_bootstrap must be an integer >= 0"),
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"], {"ece_bins": 0}, r"ECE bins must be an integer >= 1"),
        ([], np.zeros((0, 2)), ["a", "b"], {}, r"y_true is empty"),
    ],
)
def test_bad_input_errors_name_the_problem(y, p, classes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, p, classes, **kwargs)


# ---------------------------------------------------------------- bootstrap_ci
def test_bootstrap_ci_matches_compute_metrics_resamples():
    y, p = _synthetic(60, 2, seed=8)
    low, high = bootstrap_ci(lambda yy, pp: roc_auc_score(yy, pp[:, 1]), y, p, n_bootstrap=200, seed=3)
    res = compute_metrics(y, p, ["n", "p"], n_bootstrap=200, seed=3)
    assert (low, high) == pytest.approx(res.ci["auroc"])


@pytest.mark.parametrize("level", [0.95, 0.5])
def test_bootstrap_ci_is_the_percentile_interval_of_the_resampled_metric(level):
    y, p = _synthetic(50, 2, seed=12)
    seen = []

    def accuracy(yy, pp):
        seen.append(float(np.mean(pp.argmax(1) == yy)))
        return seen[-1]

    low, high = bootstrap_ci(accuracy, y, p, n_bootstrap=400, ci=level, seed=2)
    tail = 100 * (1 - level) / 2
    assert len(seen) == 400
    assert (low, high) == pytest.approx(tuple(np.percentile(seen, [tail, 100 - tail])))
    res = compute_metrics(y, p, ["n", "p"], n_bootstrap=400, ci=level, seed=2)
    assert res.ci["accuracy"] == pytest.approx((low, high))
    assert "50% CI" in res.table() if level == 0.5 else "95% CI" in res.table()


def test_bootstrap_ci_skips_undefined_resamples_with_warning():
    y = np.array([0] * 9 + [1])
    p = _binary(np.linspace(0.1, 0.9, 10))
    with pytest.warns(RuntimeWarning, match=r"undefined on \d+ of 200 resamples"):
        low, high = bootstrap_ci(lambda yy, pp: roc_auc_score(yy, pp[:, 1]), y, p, n_bootstrap=200)
    assert math.isfinite(low) and low <= high <= 1.0


def test_bootstrap_ci_raises_when_metric_fails_everywhere():
    def broken(yy, pp):
        raise ValueError("bad metric")

    with pytest.raises(RuntimeError, match="failed on every one of 10 resamples; first error: bad metric"):
        bootstrap_ci(broken, [0, 1], [[0.5, 0.5], [0.5, 0.5]], n_bootstrap=10)


# ---------------------------------------------------------------- paired bootstrap
def test_paired_bootstrap_identical_models_has_no_difference():
    y, p = _synthetic(100, 2, seed=9)
    d = paired_bootstrap_delta(y, p, p.copy(), "auroc", n_bootstrap=100)
    assert d["delta"] == 0.0 and d["ci_low"] == 0.0 and d["ci_high"] == 0.0
    assert d["p_value"] == 1.0


def test_paired_bootstrap_detects_a_better_model():
    y, good = _synthetic(300, 2, signal=2.0, seed=10)
    rng = np.random.default_rng(0)
    noisy = np.log(good) + rng.normal(0, 1.5, good.shape)  # same model with noise added: worse
    worse = np.exp(noisy) / np.exp(noisy).sum(1, keepdims=True)
    d = paired_bootstrap_delta(y, good, worse, "auroc", n_bootstrap=300, seed=1)
    a = compute_metrics(y, good, ["n", "p"], n_bootstrap=0).values["auroc"]
    b = compute_metrics(y, worse, ["n", "p"], n_bootstrap=0).values["auroc"]
    assert d["delta"] == pytest.approx(a - b)
    assert 0 < d["ci_low"] <= d["delta"] <= d["ci_high"]
    assert d["p_value"] < 0.01
    back = paired_bootstrap_delta(y, worse, good, "auroc", n_bootstrap=300, seed=1)
    assert back["ci_high"] < 0 and back["p_value"] == pytest.approx(d["p_value"])


def test_paired_bootstrap_other_metrics_and_errors():
    y, p = _synthetic(80, 3, seed=11)
    q = np.roll(p, 1, axis=0)
    for metric in ("accuracy", "balanced_accuracy", "f1", "ece"):
        d = paired_bootstrap_delta(y, p, q, metric, n_bootstrap=30)
        va = compute_metrics(y, p, ["a", "b", "c"], n_bootstrap=0).values[metric]
        vb = compute_metrics(y, q, ["a", "b", "c"], n_bootstrap=0).values[metric]
        assert d["delta"] == pytest.approx(va - vb), metric
        assert d["ci_low"] <= d["ci_high"]
    d = paired_bootstrap_delta(y, p, q, lambda yy, pp: float(np.mean(pp.argmax(1) == yy)), n_bootstrap=30)
    assert d["delta"] == pytest.approx(paired_bootstrap_delta(y, p, q, "accuracy", n_bootstrap=0)["delta"])
    with pytest.raises(ValueError, match=r"metric must be one of \['accuracy'"):
        paired_bootstrap_delta(y, p, q, "precision")
    with pytest.raises(ValueError, match=r"probs_b has 79 rows but y_true has 80"):
        paired_bootstrap_delta(y, p, q[:-1])
