"""Percentile bootstrap over images: resampling (optionally within each class), percentile intervals,
and :func:`bootstrap_ci` for any metric function.

A resample on which a metric is undefined is skipped and counted (see
:mod:`medtricks.evaluate.metrics`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from medtricks.errors import ConfigError, ResourceError
from medtricks.evaluate.metric_inputs import _check_bootstrap_args

__all__ = ["bootstrap_ci"]


def _resample_indices(y: np.ndarray, n_bootstrap: int, seed: int, stratified: bool) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(y)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if stratified else None
    for _ in range(n_bootstrap):
        if groups is None:
            yield rng.integers(0, n, size=n)
        else:  # keep every class's count fixed: resample within each class
            yield np.concatenate([g[rng.integers(0, len(g), size=len(g))] for g in groups])


def _percentile_interval(samples: np.ndarray, ci: float) -> tuple[float, float]:
    valid = samples[np.isfinite(samples)]
    if valid.size == 0:
        return (math.nan, math.nan)
    alpha = (1.0 - ci) / 2.0
    low, high = np.percentile(valid, [100 * alpha, 100 * (1 - alpha)])
    return (float(low), float(high))


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: Any,
    probs: Any,
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of ``metric_fn(y_true, probs)`` over images.

    Images (rows) are resampled with replacement ``n_bootstrap`` times. A resample where
    ``metric_fn`` returns a non-finite value or raises ``ValueError`` (e.g. AUROC on a resample with
    one class) is skipped; the number skipped is reported in a warning. If every resample is
    undefined the interval is ``(nan, nan)``.

    Example::

        from sklearn.metrics import roc_auc_score
        low, high = bootstrap_ci(lambda y, p: roc_auc_score(y, p[:, 1]), y, probs, n_bootstrap=500)
    """
    _check_bootstrap_args(n_bootstrap, ci)
    y = np.asarray(y_true)
    p = np.asarray(probs)
    if y.ndim < 1 or len(y) == 0:
        raise ConfigError(f"y_true must be a non-empty array, got shape {y.shape}")
    if p.shape[:1] != y.shape[:1]:
        raise ConfigError(
            f"probs has {p.shape[0] if p.ndim else 0} rows but y_true has {len(y)}; expected one row per image"
        )
    if n_bootstrap == 0:
        return (math.nan, math.nan)
    samples = np.full(n_bootstrap, np.nan)
    first_error: Exception | None = None
    for b, idx in enumerate(_resample_indices(y, n_bootstrap, seed, stratified=False)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn's UndefinedMetricWarning per resample
                samples[b] = float(metric_fn(y[idx], p[idx]))
        except ValueError as err:  # undefined on this resample: skip it, count it
            first_error = first_error or err
    n_skipped = int(np.sum(~np.isfinite(samples)))
    if n_skipped == n_bootstrap and first_error is not None:
        raise ResourceError(
            f"bootstrap_ci: metric_fn failed on every one of {n_bootstrap} resamples; first error: {first_error}"
        ) from first_error
    if n_skipped:
        warnings.warn(
            f"bootstrap_ci: metric undefined on {n_skipped} of {n_bootstrap} resamples (skipped); "
            f"the interval uses the other {n_bootstrap - n_skipped}",
            RuntimeWarning,
            stacklevel=2,
        )
    return _percentile_interval(samples, ci)
