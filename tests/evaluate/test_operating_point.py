"""Operating points (medtricks.evaluate.operating_point) on synthetic scores with known answers."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtricks.evaluate.operating_point import (
    OperatingPoint,
    class_priors,
    prior_shift,
    probs_at_threshold,
    select_threshold,
)


def _binary(scores):
    s = np.asarray(scores, dtype=float)
    return np.c_[1 - s, s]


def _odds(p):
    return p / (1 - p)


# ------------------------------------------------------------------------------ select_threshold
def test_youden_on_a_perfectly_separable_set_is_the_lowest_positive_score():
    neg, pos = [0.05, 0.1, 0.2, 0.3], [0.6, 0.7, 0.8, 0.9]
    y = np.r_[np.zeros(4), np.ones(4)].astype(int)
    op = select_threshold(y, _binary(neg + pos), method="youden", train_priors=[0.5, 0.5])
    # J = 1 only where every positive and no negative is >= t: t = 0.6 among the observed scores
    assert op.threshold == pytest.approx(0.6)
    assert (op.val_sensitivity, op.val_specificity) == (1.0, 1.0)
    assert op.method == "youden" and op.train_priors == [0.5, 0.5]
    assert np.array_equal(np.array(neg + pos) >= op.threshold, y.astype(bool))


def test_target_sensitivity_takes_the_most_specific_threshold_that_reaches_it():
    # descending: 0.9P 0.8P 0.7N 0.6P 0.5N 0.4P 0.3N 0.2N
    pos, neg = [0.9, 0.8, 0.6, 0.4], [0.7, 0.5, 0.3, 0.2]
    y = np.r_[np.ones(4), np.zeros(4)].astype(int)
    op = select_threshold(y, _binary(pos + neg), method="sensitivity", target_sensitivity=0.75)
    assert op.threshold == pytest.approx(0.6)  # 3 of 4 positives, 1 of 4 negatives above it
    assert op.val_sensitivity == pytest.approx(0.75) and op.val_specificity == pytest.approx(0.75)
    full = select_threshold(y, _binary(pos + neg), method="sensitivity", target_sensitivity=1.0)
    assert full.threshold == pytest.approx(0.4) and full.val_specificity == pytest.approx(0.5)


def test_target_sensitivity_inside_a_run_of_positives_keeps_the_best_specificity():
    pos, neg = list(np.linspace(0.95, 0.5, 10)), [0.4, 0.3, 0.2, 0.1]
    y = np.r_[np.ones(10), np.zeros(4)].astype(int)
    op = select_threshold(y, _binary(pos + neg), method="sensitivity", target_sensitivity=0.8)
    assert op.val_sensitivity >= 0.8 and op.val_specificity == 1.0
    assert np.mean(np.array(pos) >= op.threshold) >= 0.8


def test_target_sensitivity_is_the_highest_threshold_that_reaches_it():
    pos, neg = list(np.linspace(0.95, 0.5, 10)), [0.4, 0.3, 0.2, 0.1]
    y = np.r_[np.ones(10), np.zeros(4)].astype(int)
    op = select_threshold(y, _binary(pos + neg), method="sensitivity", target_sensitivity=0.8)
    assert op.threshold == pytest.approx(0.6) and op.val_sensitivity == pytest.approx(0.8)


def test_select_threshold_positive_index_zero_mirrors_the_scores():
    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.35, 0.7, 0.8, 0.9])
    op = select_threshold(1 - y, _binary(p1)[:, ::-1], positive_index=0)  # class 0 is now the "positive" one
    assert op.positive_index == 0 and op.threshold == pytest.approx(0.7)


# ----------------------------------------------------------------------------------- prior_shift
def test_prior_shift_with_equal_priors_is_the_identity():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], 20)
    assert np.allclose(prior_shift(p, [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]), p)
    b = _binary(rng.uniform(0.01, 0.99, 20))
    assert np.allclose(prior_shift(b, [0.3, 0.7], 0.7), b)


@pytest.mark.parametrize("pi, pi_new", [(0.5, 0.8), (0.3, 0.1), (0.75, 0.25)])
def test_binary_prior_shift_multiplies_the_odds(pi, pi_new):
    p = np.linspace(0.05, 0.95, 11)
    shifted = prior_shift(_binary(p), [1 - pi, pi], pi_new)
    factor = (pi_new / (1 - pi_new)) / (pi / (1 - pi))
    assert np.allclose(_odds(shifted[:, 1]), _odds(p) * factor)
    assert np.allclose(shifted.sum(1), 1.0)


def test_prior_shift_closed_form_examples():
    # a 50/50 model's "don't know" becomes the new prevalence
    assert prior_shift(_binary([0.5]), [0.5, 0.5], 0.8)[0, 1] == pytest.approx(0.8)
    # multiclass: p'(k) ∝ p(k) pi'(k) / pi(k)
    p = np.array([[0.2, 0.3, 0.5]])
    out = prior_shift(p, [0.5, 0.25, 0.25], [0.25, 0.25, 0.5])
    w = p * np.array([0.5, 1.0, 2.0])
    assert np.allclose(out, w / w.sum())


def test_prior_shift_rejects_bad_priors_naming_them():
    with pytest.raises(ValueError, match=r"train_priors .*\[0.6, 0.6\]"):
        prior_shift(_binary([0.5]), [0.6, 0.6], 0.5)
    with pytest.raises(ValueError, match=r"target priors .*1.0"):
        prior_shift(_binary([0.5]), [0.5, 0.5], 1.0)
    with pytest.raises(ValueError, match="single prevalence"):
        prior_shift(np.full((2, 3), 1 / 3), [1 / 3] * 3, 0.5)
    with pytest.raises(ValueError, match="3 probabilities"):
        prior_shift(np.full((2, 3), 1 / 3), [0.5, 0.5], [0.5, 0.5])


# ---------------------------------------------------------------------------- probs_at_threshold
@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.62, 0.9])
def test_probs_at_threshold_argmax_is_p_at_least_t(t):
    p = np.r_[np.arange(1, 100) / 100, [t, t]]  # exact ties included: they go to the positive class
    out = probs_at_threshold(_binary(p), t)
    assert np.array_equal(out.argmax(1) == 1, p >= t)
    assert np.allclose(out.sum(1), 1.0)
    y = (np.arange(len(p)) % 3 == 0).astype(int)
    assert roc_auc_score(y, out[:, 1]) == pytest.approx(roc_auc_score(y, p))  # ranking kept


@pytest.mark.parametrize("t", [0.3, 0.362, 0.5, 0.81])
def test_probs_at_threshold_decides_rows_a_rounding_error_from_t_by_the_comparison(t):
    # a probability 1e-12..1e-9 below t once counted as a tie (np.isclose) and was called positive
    offsets = np.array([0.0, 1e-12, -1e-12, 1e-10, -1e-10, 1e-9, -1e-9, 3e-8, -3e-8])
    p = np.clip(t + offsets, 0.0, 1.0)
    out = probs_at_threshold(_binary(p), t)
    assert ((out.argmax(axis=1) == 1) == (p >= t)).all()


def test_probs_at_threshold_for_positive_class_zero():
    p0 = np.array([0.1, 0.4, 0.6, 0.8])
    out = probs_at_threshold(np.c_[p0, 1 - p0], 0.5 + 0.05, positive_index=0)
    assert np.array_equal(out.argmax(1) == 0, p0 >= 0.55)


@pytest.mark.parametrize("t", [0.0, 1.0, 1.5, -0.2])
def test_probs_at_threshold_rejects_thresholds_outside_0_1_naming_them(t):
    with pytest.raises(ValueError, match=rf"threshold must be in \(0, 1\), got {t}"):
        probs_at_threshold(_binary([0.5]), t)


def test_bad_inputs_raise_value_errors_naming_the_value():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        probs_at_threshold(np.full((4, 3), 1 / 3), 0.5)
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        select_threshold(y, np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="'f1'"):
        select_threshold(y, _binary([0.1, 0.9, 0.2, 0.8]), method="f1")
    with pytest.raises(ValueError, match="1.5"):
        select_threshold(y, _binary([0.1, 0.9, 0.2, 0.8]), method="sensitivity", target_sensitivity=1.5)
    with pytest.raises(ValueError, match="None"):
        select_threshold(y, _binary([0.1, 0.9, 0.2, 0.8]), method="sensitivity")
    with pytest.raises(ValueError, match="both classes"):
        select_threshold(np.ones(4, int), _binary([0.1, 0.9, 0.2, 0.8]))
    with pytest.raises(ValueError, match=r"\(3\) and probs \(4\)"):
        select_threshold(y[:3], _binary([0.1, 0.9, 0.2, 0.8]))
    with pytest.raises(ValueError, match="got 2"):
        select_threshold(y, _binary([0.1, 0.9, 0.2, 0.8]), positive_index=2)


# --------------------------------------------------------------------------- OperatingPoint, priors
def test_operating_point_json_round_trip_and_bad_file(tmp_path):
    op = OperatingPoint(
        threshold=0.37,
        method="sensitivity",
        target_sensitivity=0.9,
        val_sensitivity=0.91,
        val_specificity=0.6,
        train_priors=[0.25, 0.75],
    )
    path = tmp_path / "operating_point.json"
    op.to_json(path)
    assert OperatingPoint.from_json(path) == op
    assert json.loads(path.read_text())["train_priors"] == [0.25, 0.75]
    assert "0.3700" in op.describe() and "sensitivity >= 0.9" in op.describe()
    bad = tmp_path / "bad.json"
    bad.write_text('{"threshold": 0.5, "colour": "red"}')
    with pytest.raises(ValueError, match="bad.json"):
        OperatingPoint.from_json(bad)


def test_class_priors_are_the_label_frequencies():
    assert class_priors([0, 1, 1, 1], 2) == [0.25, 0.75]
    assert class_priors([2, 2], 3) == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="no labels"):
        class_priors([], 2)
