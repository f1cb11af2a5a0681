"""Fits on a site's predictions: temperature, threshold, prevalence (labelled) and the EM prior
(unlabelled), with patient-level bootstrap intervals and a patient-level cross-fitted check.

Plain arrays in, plain data out; nothing here loads a model or reads a file.

- :func:`apply_temperature` / :func:`fit_temperature` — temperature scaling (Guo et al., ICML 2017)
  on the log-probabilities a model outputs (softmax is unchanged by a per-row constant, so
  ``log p`` stands for the logits).
- :func:`em_prior` — Saerens, Latinne & Decaestecker (Neural Computation 2002): the class priors of
  unlabelled data by EM, with the training priors as the start.
- :func:`fit_site` — threshold (Youden or target sensitivity) on the temperature-scaled site
  probabilities, the temperature, the sample prevalence; :func:`bootstrap_site` their intervals
  (resampling patients); :func:`cross_fit` fits on some patients and measures on the others.

Example::

    fitted = fit_site(y, probs, method="youden")
    print(fitted["threshold"], fitted["temperature"], fitted["prevalence"])
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np

from medtricks.errors import ConfigError
from medtricks.evaluate.operating_point import select_threshold

__all__ = [
    "patient_folds",
    "apply_temperature",
    "fit_temperature",
    "em_prior",
    "fit_site",
    "bootstrap_site",
    "cross_fit",
    "patient_bootstrap_indices",
    "decision_metrics",
    "expected_calibration_error",
    "nll",
]

_EPS = 1e-12
_LOG_T_BOUNDS = (-3.0, 3.0)  # temperatures in [0.05, 20]


def apply_temperature(probs: Any, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: probabilities as a model with logits divided by ``temperature`` gives them."""
    p = np.asarray(probs, dtype=np.float64)
    t = float(temperature)
    if not t > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    if t == 1.0:
        return p
    z = np.log(np.clip(p, _EPS, 1.0)) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(y: Any, probs: Any) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(int)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], _EPS, 1.0))))


def fit_temperature(y: Any, probs: Any) -> float:
    """The temperature that minimises the NLL of ``y`` under :func:`apply_temperature` (bounded search
    over ``log T`` in [-3, 3])."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    res = minimize_scalar(
        lambda log_t: nll(y, apply_temperature(p, float(np.exp(log_t)))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(res.x))


def expected_calibration_error(y: Any, probs: Any, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(int)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        m = bins == b
        ece += m.mean() * abs(float((pred[m] == y[m]).mean()) - float(conf[m].mean()))
    return float(ece)


def em_prior(
    probs: Any, train_priors: Sequence[float], *, max_iter: int = 1000, tol: float = 1e-8
) -> tuple[np.ndarray, int]:
    """Class priors of unlabelled data by EM (Saerens et al. 2002) → ``(priors, iterations)``.

    ``probs``: posteriors of a model trained at ``train_priors``. Each step re-weights them to the current
    prior estimate (``p(y|x) π'(y)/π(y)``, normalised) and takes their mean as the next estimate.
    """
    p = np.asarray(probs, dtype=np.float64)
    src = np.asarray(train_priors, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ConfigError(f"em_prior needs posteriors of shape (N, K) with N > 0, got {p.shape}")
    if src.shape != (p.shape[1],) or (src <= 0).any() or not np.isclose(src.sum(), 1.0):
        raise ConfigError(f"train_priors must be {p.shape[1]} positive probabilities summing to 1, got {src.tolist()}")
    prior = src.copy()
    for it in range(1, max_iter + 1):
        w = p * (prior / src)[None, :]
        w /= np.maximum(w.sum(axis=1, keepdims=True), _EPS)
        new = w.mean(axis=0)
        if np.max(np.abs(new - prior)) < tol:
            return new, it
        prior = new
    return prior, max_iter


def decision_metrics(y: Any, positive: Any, positive_index: int = 1) -> dict[str, float]:
    """Sensitivity, specificity and accuracy of binary decisions (``positive``: bool per image)."""
    y = np.asarray(y).astype(int) == positive_index
    d = np.asarray(positive, dtype=bool)
    out = {"accuracy": float((y == d).mean()) if len(y) else float("nan")}
    out["sensitivity"] = float(d[y].mean()) if y.any() else float("nan")
    out["specificity"] = float((~d[~y]).mean()) if (~y).any() else float("nan")
    return out


def fit_site(
    y: Any, probs: Any, *, method: str = "youden", target_sensitivity: Optional[float] = None, positive_index: int = 1
) -> dict[str, float]:
    """Temperature, then the threshold on the temperature-scaled probabilities, and the sample prevalence."""
    y = np.asarray(y).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    t = fit_temperature(y, p)
    op = select_threshold(
        y, apply_temperature(p, t), method=method, target_sensitivity=target_sensitivity, positive_index=positive_index
    )
    # a threshold of exactly 0 or 1 cannot be applied as odds; keep it strictly inside (0, 1)
    thr = float(min(max(op.threshold, 1e-6), 1 - 1e-6))
    return {"temperature": t, "threshold": thr, "prevalence": float((y == positive_index).mean())}


def patient_bootstrap_indices(groups: Any, rng: np.random.Generator) -> np.ndarray:
    """Image indices of one bootstrap sample that draws *patients* with replacement."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    drawn = rng.integers(0, len(counts), len(counts))
    return np.concatenate([order[starts[g] : starts[g] + counts[g]] for g in drawn])


def _interval(values: list[float], ci: float) -> Optional[list[float]]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if len(v) < 2:
        return None
    a = (1.0 - ci) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def bootstrap_site(
    y: Any,
    probs: Any,
    groups: Any,
    *,
    method: str = "youden",
    target_sensitivity: Optional[float] = None,
    positive_index: int = 1,
    n_bootstrap: int = 200,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Optional[list[float]]]:
    """Percentile intervals of :func:`fit_site`'s values over ``n_bootstrap`` patient-level resamples
    (resamples with one class only are skipped)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"temperature": [], "threshold": [], "prevalence": []}
    for _ in range(int(n_bootstrap)):
        idx = patient_bootstrap_indices(groups, rng)
        if len(np.unique(y[idx])) < 2:
            continue
        fitted = fit_site(
            y[idx], p[idx], method=method, target_sensitivity=target_sensitivity, positive_index=positive_index
        )
        for k in draws:
            draws[k].append(fitted[k])
    return {k: _interval(v, ci) for k, v in draws.items()}


def patient_folds(y: Any, groups: Any, folds: int, seed: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of every image: whole patients per fold, stratified by class where possible
    (scikit-learn's ``StratifiedGroupKFold``, shuffled with ``seed``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y, groups = np.asarray(y).astype(int), np.asarray(groups).astype(str)
    if int(folds) < 2:
        raise ConfigError(f"folds must be >= 2, got {folds!r}")
    fold_of = np.full(len(y), -1)
    splitter = StratifiedGroupKFold(n_splits=int(folds), shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class": stratification is best-effort
        for k, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            fold_of[held] = k
    return fold_of


def cross_fit(
    y: Any,
    probs: Any,
    groups: Any,
    *,
    method: str = "youden",
    target_sensitivity: Optional[float] = None,
    positive_index: int = 1,
    stored_threshold: Optional[float] = None,
    folds: int = 5,
    seed: int = 0,
    n_bootstrap: int = 200,
    ci: float = 0.95,
) -> dict[str, Any]:
    """How well a site calibration holds on patients it was not fitted on.

    Patients are split into ``folds`` (stratified by class where possible); each fold is predicted with
    the temperature and threshold fitted on the other folds. The pooled held-out decisions give
    sensitivity, specificity, accuracy, ECE and NLL, with patient-bootstrap intervals; the same numbers
    for the run's own ``stored_threshold`` (no temperature) on the same images are the comparison.
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    groups = np.asarray(groups)
    held_pos = np.zeros(len(y), dtype=bool)
    held_probs = np.zeros_like(p)
    fold_of = patient_folds(y, groups, folds, seed)
    for k in range(int(folds)):
        fit_idx, out_idx = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        if len(np.unique(y[fit_idx])) < 2:
            raise ConfigError(
                f"cross-fitting fold {k + 1} of {folds} has one class only in its fitting part: "
                "too few patients of a class for this many folds"
            )
        fitted = fit_site(
            y[fit_idx], p[fit_idx], method=method, target_sensitivity=target_sensitivity, positive_index=positive_index
        )
        scaled = apply_temperature(p[out_idx], fitted["temperature"])
        held_probs[out_idx] = scaled
        held_pos[out_idx] = scaled[:, positive_index] >= fitted["threshold"]
        fold_of[out_idx] = k

    def summary(yy: np.ndarray, pos: np.ndarray, calibrated: Optional[np.ndarray]) -> dict[str, float]:
        out = decision_metrics(yy, pos, positive_index)
        if calibrated is not None:
            out["ece"] = expected_calibration_error(yy, calibrated)
            out["nll"] = nll(yy, calibrated)
        return out

    stored_pos = p[:, positive_index] >= stored_threshold if stored_threshold is not None else None
    result: dict[str, Any] = {
        "folds": int(folds),
        "n_images": int(len(y)),
        "site": summary(y, held_pos, held_probs),
        "uncalibrated": {"ece": expected_calibration_error(y, p), "nll": nll(y, p)},
    }
    if stored_pos is not None:
        result["stored"] = {"threshold": float(stored_threshold), **decision_metrics(y, stored_pos, positive_index)}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(int(n_bootstrap)):
        idx = patient_bootstrap_indices(groups, rng)
        for key, value in summary(y[idx], held_pos[idx], held_probs[idx]).items():
            draws.setdefault(f"site/{key}", []).append(value)
        if stored_pos is not None:
            for key, value in decision_metrics(y[idx], stored_pos[idx], positive_index).items():
                draws.setdefault(f"stored/{key}", []).append(value)
    result["ci"] = {k: _interval(v, ci) for k, v in draws.items()}
    result["ci_level"] = ci
    return result
