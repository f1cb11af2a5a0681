"""Classification metrics with percentile-bootstrap confidence intervals.

Everything takes plain arrays (numpy or CPU tensors): ``y_true`` ``(N,)`` integer labels in ``[0, K)`` and ``probs``
``(N, K)`` softmax probabilities (rows summing to 1); predictions are ``probs.argmax(1)``.

* accuracy, balanced accuracy, macro F1, per-class sensitivity/specificity: from one
  ``sklearn.metrics.confusion_matrix`` (same definitions as sklearn's ``accuracy_score``,
  ``balanced_accuracy_score``, ``f1_score(average="macro", zero_division=0)``, ``recall_score``);
* AUROC: ``sklearn.metrics.roc_auc_score`` — binary: the positive class ``classes[1]``;
  multiclass: macro one-vs-rest;
* ECE: top-label expected calibration error (Guo et al., ICML 2017) with equal-width bins, binned by
  MONAI's ``calibration_binning``: confidence = max probability, correct = (argmax == label).

Confidence intervals resample images with replacement (optionally within each class) and take
percentiles of the resampled metric. A resample in which a metric is undefined — it lacks a class
that the evaluation set has (AUROC, balanced accuracy, F1, that class's sensitivity) or has no
negatives for a class (its specificity) — is skipped for that metric and counted in
``MetricsResult.n_skipped``; it never raises.

The input checks are :mod:`medtricks.evaluate.metric_inputs`; the resampling and :func:`bootstrap_ci`
are :mod:`medtricks.evaluate.bootstrap` (still importable from here).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn import config_context
from sklearn.metrics import confusion_matrix, roc_auc_score

from medtricks.errors import ConfigError
from medtricks.evaluate.bootstrap import _percentile_interval, _resample_indices, bootstrap_ci
from medtricks.evaluate.metric_inputs import _check_bootstrap_args, _check_classes, _check_labels, _check_probs

__all__ = [
    "MetricsResult",
    "compute_metrics",
    "bootstrap_ci",
    "paired_bootstrap_delta",
    "expected_calibration_error",
    "calibration_bins",
    "SCALAR_METRICS",
]

# Metrics that are one number for the whole set (usable in paired_bootstrap_delta by name).
SCALAR_METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1", "ece")
# Metrics that average over classes: undefined in a resample that lost one of the set's classes.
_CLASS_AVERAGED = ("balanced_accuracy", "auroc", "f1")
# Inputs are validated once up front; sklearn's per-call re-validation was ~40% of bootstrap time.
_FAST_SKLEARN = {"assume_finite": True, "skip_parameter_validation": True}


# --------------------------------------------------------------------------------------------
# metric pieces (shared by point estimates and resamples, so the CI is about the same quantity)
# --------------------------------------------------------------------------------------------
def calibration_bins(y_true: Any, probs: Any, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-label reliability bins: ``(mean_confidence, accuracy, count)``, each ``(n_bins,)``.

    Bins are equal-width on ``[0, 1]``; empty bins have ``nan`` confidence and accuracy. Uses
    ``monai.metrics.calibration_binning`` on the confidence ``probs.max(1)`` and the 0/1 correctness
    of ``probs.argmax(1)``.
    """
    y = _check_labels(y_true)
    p = _check_probs(probs, len(y))
    return _calibration_bins(y, p, n_bins)


def _calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ConfigError(f"ECE bins must be an integer >= 1, got {n_bins!r}")
    # Heavy imports only when calibration is actually computed.
    import torch

    try:
        from monai.metrics import calibration_binning
    except ImportError as err:  # added to MONAI in the 1.6 series
        import monai

        raise ImportError(
            f"the ECE uses monai.metrics.calibration_binning, which monai {monai.__version__} lacks; "
            "install monai>=1.6 (pip install -U 'monai>=1.6')"
        ) from err

    conf = torch.as_tensor(p.max(axis=1), dtype=torch.float32).view(1, 1, -1)
    correct = torch.as_tensor(p.argmax(axis=1) == y, dtype=torch.float32).view(1, 1, -1)
    mean_p, mean_acc, counts = calibration_binning(conf, correct, num_bins=int(n_bins))
    return (mean_p[0, 0].double().numpy(), mean_acc[0, 0].double().numpy(), counts[0, 0].double().numpy())


def _ece(y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    mean_p, mean_acc, counts = _calibration_bins(y, p, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(mean_p[filled] - mean_acc[filled])) / counts.sum())


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 15) -> float:
    """Top-label ECE: ``sum_b |B_b|/N * |accuracy(B_b) - confidence(B_b)|`` over equal-width bins.

    >>> round(expected_calibration_error([0, 1], [[0.9, 0.1], [0.2, 0.8]], n_bins=10), 4)
    0.15
    """
    y = _check_labels(y_true)
    return _ece(y, _check_probs(probs, len(y)), n_bins)


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    k = p.shape[1]
    if np.unique(y).size < k:  # a class without images: some one-vs-rest AUROC is undefined
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if k == 2:
            return float(roc_auc_score(y == 1, p[:, 1]))
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(k))))


def _confusion_metrics(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, Any]:
    cm = confusion_matrix(y, pred, labels=list(range(k))).astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)  # images of each class
    predicted = cm.sum(axis=0)
    n = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(support > 0, tp / support, np.nan)
        neg = n - support
        spec = np.where(neg > 0, (neg - (predicted - tp)) / neg, np.nan)
        f1_den = support + predicted  # = 2TP + FP + FN
        f1 = np.where(f1_den > 0, 2 * tp / f1_den, 0.0)  # sklearn zero_division=0
    present = support > 0
    return {
        "accuracy": float(tp.sum() / n),
        # sklearn's balanced_accuracy_score: mean recall over the classes present in y_true
        "balanced_accuracy": float(np.mean(sens[present])),
        "f1": float(np.mean(f1)),
        "sensitivity": sens,
        "specificity": spec,
    }


def _all_metrics(y: np.ndarray, p: np.ndarray, classes: list[str], ece_bins: int) -> dict[str, float]:
    conf = _confusion_metrics(y, p.argmax(axis=1), len(classes))
    values = {
        "accuracy": conf["accuracy"],
        "balanced_accuracy": conf["balanced_accuracy"],
        "auroc": _auroc(y, p),
        "f1": conf["f1"],
        "ece": _ece(y, p, ece_bins),
    }
    for i, name in enumerate(classes):
        values[f"sensitivity/{name}"] = float(conf["sensitivity"][i])
    for i, name in enumerate(classes):
        values[f"specificity/{name}"] = float(conf["specificity"][i])
    return values


def _scalar_metric_fn(metric: str | Callable, k: int, ece_bins: int) -> Callable[[np.ndarray, np.ndarray], float]:
    if callable(metric):
        return metric
    if metric == "auroc":
        return _auroc
    if metric == "ece":
        return lambda y, p: _ece(y, p, ece_bins)
    if metric in ("accuracy", "balanced_accuracy", "f1"):
        return lambda y, p: _confusion_metrics(y, p.argmax(axis=1), k)[metric]
    raise ConfigError(
        f"metric must be one of {list(SCALAR_METRICS)} or a callable(y_true, probs) -> float, got {metric!r}"
    )


# --------------------------------------------------------------------------------------------
# public result + entry point
# --------------------------------------------------------------------------------------------
@dataclass
class MetricsResult:
    """Point metrics with bootstrap confidence intervals.

    Attributes:
        values: metric name -> value: ``accuracy``, ``balanced_accuracy``, ``auroc``, ``f1``,
            ``ece``, ``sensitivity/<class>``, ``specificity/<class>`` and ``n`` (number of images).
        ci: metric name -> ``(low, high)`` for every key of ``values`` except ``n``; empty when
            ``n_bootstrap == 0``. ``(nan, nan)`` where the metric is undefined.
        n_skipped: metric name -> resamples in which that metric was undefined (skipped).
        n_bootstrap, ci_level: how the intervals were made.
    """

    values: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    n_skipped: dict[str, int] = field(default_factory=dict)
    n_bootstrap: int = 0
    ci_level: float = 0.95
    seed: int | None = None  # the resampling seed (None: not recorded / no bootstrap)

    def to_dict(self) -> dict[str, float]:
        """Flat dict for logging: every value, ``<key>_ci_low``/``<key>_ci_high`` for every CI, and
        ``<key>_ci_skipped`` for metrics whose CI skipped some resamples."""
        out: dict[str, float] = dict(self.values)
        for key, (low, high) in self.ci.items():
            out[f"{key}_ci_low"] = low
            out[f"{key}_ci_high"] = high
        for key, count in self.n_skipped.items():
            if count and math.isfinite(self.values.get(key, math.nan)):
                out[f"{key}_ci_skipped"] = float(count)
        return out

    def table(self, title: str | None = None, *, ci_note: bool = True) -> str:
        """Aligned plain-text table: metric, value, CI (and notes on skipped resamples). The header says
        how the CIs were made (bootstrap, resamples, seed); ``ci_note=False`` says "CIs as above" instead,
        for a table printed under another one with the same bootstrap."""
        ci_head = f"{100 * self.ci_level:g}% CI"
        keys = [k for k in self.values if k != "n"]
        rows = [("metric", "value", ci_head if self.ci else "")]
        for key in keys:
            low, high = self.ci.get(key, (math.nan, math.nan))
            ci_text = f"[{low:.4f}, {high:.4f}]" if self.ci and math.isfinite(low) else ("-" if self.ci else "")
            rows.append((key, _fmt(self.values[key]), ci_text))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = []
        n = int(self.values.get("n", 0))
        head = f"{title}  " if title else ""
        seed = f", seed {self.seed}" if self.seed is not None else ""
        how = f"percentile bootstrap, {self.n_bootstrap} resamples{seed}" if self.ci else "no bootstrap"
        if self.ci and not ci_note:
            how = "CIs as above"
        lines.append(f"{head}(n={n} images, {how})")
        for i, (a, b, c) in enumerate(rows):
            lines.append(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip())
            if i == 0:
                lines.append("-" * (w0 + w1 + 4 + max(len(r[2]) for r in rows)))
        notes = [
            f"  {key}: CI from {self.n_bootstrap - cnt} of {self.n_bootstrap} resamples ({cnt} lacked a needed class)"
            for key, cnt in self.n_skipped.items()
            if cnt and math.isfinite(self.values.get(key, math.nan))
        ]
        undefined = [k for k in keys if not math.isfinite(self.values[k])]
        if undefined:
            notes.append(f"  undefined (a class has no images in y_true): {', '.join(undefined)}")
        if notes:
            lines.append("notes:")
            lines.extend(notes)
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def compute_metrics(
    y_true: Any,
    probs: Any,
    classes: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    ece_bins: int = 15,
    stratified: bool = False,
) -> MetricsResult:
    """All evaluation metrics with percentile-bootstrap confidence intervals.

    Args:
        y_true: ``(N,)`` integer labels in ``[0, K)``.
        probs: ``(N, K)`` softmax probabilities; the prediction is ``probs.argmax(1)``.
        classes: the ``K`` class names; binary AUROC is for the positive class ``classes[1]``.
        n_bootstrap: resamples for the CIs; ``0`` skips them (fast, e.g. for per-epoch validation).
        ci: confidence level of the intervals.
        seed: seed of the resampling (same seed -> same intervals).
        ece_bins: equal-width bins of the expected calibration error.
        stratified: resample within each class (class counts fixed) instead of over all images.

    A class without images in ``y_true`` makes its sensitivity and the AUROC ``nan`` (with a
    warning); nothing raises for it.

    Example::

        res = compute_metrics(y, probs, ["normal", "pneumonia"], n_bootstrap=1000)
        print(res.table("test"))
        res.values["auroc"], res.ci["auroc"]
    """
    y = _check_labels(y_true)
    p = _check_probs(probs, len(y))
    names = _check_classes(classes, p.shape[1])
    y = _check_labels(y, len(names))
    _check_bootstrap_args(n_bootstrap, ci)

    missing = [names[c] for c in range(len(names)) if not np.any(y == c)]
    if missing:
        warnings.warn(
            f"compute_metrics: no images of class(es) {missing} in y_true (n={len(y)}): their sensitivity "
            "and the AUROC are undefined (nan); balanced_accuracy averages the classes present",
            RuntimeWarning,
            stacklevel=2,
        )
    values = _all_metrics(y, p, names, ece_bins)

    result = MetricsResult(
        values={**values, "n": float(len(y))},
        n_bootstrap=int(n_bootstrap),
        ci_level=float(ci),
        seed=int(seed) if n_bootstrap else None,
    )
    if n_bootstrap == 0:
        return result

    present = np.unique(y)
    samples = {key: np.full(n_bootstrap, np.nan) for key in values}
    with config_context(**_FAST_SKLEARN):
        for b, idx in enumerate(_resample_indices(y, n_bootstrap, seed, stratified)):
            yb, pb = y[idx], p[idx]
            resampled = _all_metrics(yb, pb, names, ece_bins)
            if np.unique(yb).size < present.size:  # lost a class: class averages change meaning
                for key in _CLASS_AVERAGED:
                    resampled[key] = math.nan
            for key, value in resampled.items():
                samples[key][b] = value
    for key, arr in samples.items():
        if math.isfinite(values[key]):
            result.ci[key] = _percentile_interval(arr, ci)
            result.n_skipped[key] = int(np.sum(~np.isfinite(arr)))
        else:  # undefined on the full set: no interval, nothing "skipped"
            result.ci[key] = (math.nan, math.nan)
            result.n_skipped[key] = 0
    return result


def paired_bootstrap_delta(
    y_true: Any,
    probs_a: Any,
    probs_b: Any,
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "auroc",
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """Paired bootstrap over images of ``metric(a) - metric(b)`` on the same test images.

    Both models are scored on the *same* resampled images each time, so image difficulty cancels.
    ``metric`` is one of ``accuracy``, ``balanced_accuracy``, ``auroc``, ``f1``, ``ece`` or a
    callable ``(y_true, probs) -> float``.

    Returns:
        ``{"metric", "value_a", "value_b", "delta", "ci_low", "ci_high", "p_value", "n_bootstrap",
        "n_skipped"}``. ``p_value`` is two-sided, from the bootstrap distribution shifted to the null
        (Hall & Wilson 1991): ``(1 + #{|d* - d| >= |d|}) / (1 + valid resamples)``.

    Example::

        d = paired_bootstrap_delta(y, probs_trick, probs_baseline, "auroc", n_bootstrap=2000)
        d["delta"], (d["ci_low"], d["ci_high"]), d["p_value"]
    """
    y = _check_labels(y_true)
    pa = _check_probs(probs_a, len(y), name="probs_a")
    pb = _check_probs(probs_b, len(y), name="probs_b")
    if pa.shape != pb.shape:
        raise ConfigError(
            f"probs_a {pa.shape} and probs_b {pb.shape} must have the same shape (same images, same classes)"
        )
    y = _check_labels(y, pa.shape[1])
    _check_bootstrap_args(n_bootstrap, ci)
    fn = _scalar_metric_fn(metric, pa.shape[1], ece_bins)
    # A callable decides itself (nan / ValueError = undefined); named class averages need all classes.
    needs_all_classes = isinstance(metric, str) and metric in _CLASS_AVERAGED

    def score(yy: np.ndarray, pp: np.ndarray) -> float:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return float(fn(yy, pp))
        except ValueError:
            return math.nan

    value_a, value_b = score(y, pa), score(y, pb)
    delta = value_a - value_b
    out: dict[str, Any] = {
        "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
        "value_a": value_a,
        "value_b": value_b,
        "delta": delta,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "p_value": math.nan,
        "n_bootstrap": int(n_bootstrap),
        "n_skipped": 0,
    }
    if n_bootstrap == 0 or not math.isfinite(delta):
        return out
    n_present = np.unique(y).size
    deltas = np.full(n_bootstrap, np.nan)
    with config_context(**_FAST_SKLEARN):
        for b, idx in enumerate(_resample_indices(y, n_bootstrap, seed, stratified=False)):
            yb = y[idx]
            if needs_all_classes and np.unique(yb).size < n_present:
                continue
            deltas[b] = score(yb, pa[idx]) - score(yb, pb[idx])
    valid = deltas[np.isfinite(deltas)]
    out["n_skipped"] = int(n_bootstrap - valid.size)
    if valid.size == 0:
        return out
    out["ci_low"], out["ci_high"] = _percentile_interval(valid, ci)
    out["p_value"] = float((1 + np.sum(np.abs(valid - delta) >= abs(delta))) / (1 + valid.size))
    return out
