"""Image-level comparisons of saved predictions: read a run's predictions file, and bootstrap the
seed-averaged difference of two variants over the same images.

A run leaves its per-image predictions on an evaluation split as an .npz with ``y_true`` (N,) int
labels and ``probs`` (N, K) softmax probabilities (an evaluation also ``probs_op``, the probabilities
at its operating point, and ``image_set``, a digest of the ordered image list); file and artifact
names live in :mod:`medtricks.rundir`.

Example::

    y, probs_a = load_predictions("runs/a/…/artifacts/predictions_val.npz")
    _, probs_b = load_predictions("runs/b/…/artifacts/predictions_val.npz")
    d = image_bootstrap_delta(y, [probs_a], [probs_b], "auroc", n_bootstrap=2000)
    print(f"Δ AUROC {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p = {d['p_value']:.3f}")
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medtricks.errors import ConfigError
from medtricks.evaluate.metrics import _scalar_metric_fn, paired_bootstrap_delta

__all__ = ["image_bootstrap_delta", "load_predictions", "stored_image_set"]


def _per_seed_metric(name: str, n_classes: int) -> Callable[[np.ndarray, np.ndarray], float]:
    # The same metric definitions as compute_metrics (one place defines AUROC, ECE, ...).
    return _scalar_metric_fn(name, n_classes, 15)


def image_bootstrap_delta(
    y_true: np.ndarray,
    probs_a: Sequence[np.ndarray],
    probs_b: Sequence[np.ndarray],
    metric: str,
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired bootstrap over images of ``mean over seeds of metric(a_s) - metric(b_s)``.

    ``probs_a[s]`` and ``probs_b[s]`` are ``(N, K)`` predictions of seed ``s`` of the two variants on
    the same ``N`` images (same fixed split). Each resample draws one set of image indices and
    scores every seed of both variants on it, so image difficulty cancels and the seeds' deltas are
    averaged as in the seed-level table. Returns the dict of
    :func:`medtricks.evaluate.metrics.paired_bootstrap_delta` (``delta``, ``ci_low``, ``ci_high``,
    ``p_value``, ...) plus ``n_seeds``.
    """
    if len(probs_a) != len(probs_b) or not probs_a:
        raise ConfigError(
            f"need the same non-zero number of seeds for both variants, got {len(probs_a)} and {len(probs_b)}"
        )
    y = np.asarray(y_true)
    shapes = {np.shape(p) for p in (*probs_a, *probs_b)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != len(y):
        raise ConfigError(f"every probs array must be (N, K) with N = {len(y)} images; got shapes {sorted(shapes)}")
    n_seeds, k = len(probs_a), next(iter(shapes))[1]
    fn = _per_seed_metric(metric, k)
    n_present = np.unique(y).size
    class_averaged = metric in ("auroc", "balanced_accuracy", "f1")

    # The library bootstraps one (N, C) probability array per variant. Seeds go side by side as
    # (N, S*K), scaled by 1/S so rows still sum to 1; the metric below splits them again.
    def stack(probs: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(p, dtype=np.float64) for p in probs], axis=1) / n_seeds

    def seed_mean(yy: np.ndarray, pp: np.ndarray) -> float:
        if class_averaged and np.unique(yy).size < n_present:
            return math.nan  # a resample that lost a class: the average changes meaning, skip it
        per_seed = pp.reshape(len(yy), n_seeds, k) * n_seeds
        return float(np.mean([fn(yy, per_seed[:, s, :]) for s in range(n_seeds)]))

    seed_mean.__name__ = metric
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = paired_bootstrap_delta(
            y, stack(probs_a), stack(probs_b), seed_mean, n_bootstrap=n_bootstrap, ci=ci, seed=seed
        )
    out["n_seeds"] = n_seeds
    return out


def load_predictions(path: str | Path, probs_key: str = "probs") -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, probs)`` from a run's predictions .npz (see :data:`medtricks.rundir.PREDICTIONS_FILE`);
    ``probs_key="probs_op"`` reads an evaluation's probabilities at its operating point."""
    with np.load(path) as data:
        missing = {"y_true", probs_key} - set(data.files)
        if missing:
            raise ConfigError(f"{path}: predictions file lacks array(s) {sorted(missing)}; has {data.files}")
        return np.asarray(data["y_true"]), np.asarray(data[probs_key])


def stored_image_set(path: str | Path) -> Optional[str]:
    """The ordered-image-list digest an evaluation stores with its predictions, if any."""
    with np.load(path) as data:
        return str(data["image_set"]) if "image_set" in data.files else None
