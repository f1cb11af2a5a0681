"""Input checks of the evaluation functions: integer labels, softmax probabilities, class names and
bootstrap settings, each failing with a message that names the bad value and what was expected.

Shared by :mod:`medtricks.evaluate.metrics`, :mod:`medtricks.evaluate.bootstrap` and the plots, so every
entry point accepts the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medtricks.errors import ConfigError

# Softmax rows from float32/bf16 models sum to 1 only approximately; beyond this we assume logits.
_ROW_SUM_ATOL = 1e-3


def _check_labels(y_true: Any, n_classes: int | None = None, name: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D array of integer labels, got shape {y.shape}")
    if y.size == 0:
        raise ConfigError(f"{name} is empty: need at least one image to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.bool_):
            y = y.astype(np.int64)
        elif np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ConfigError(f"{name} must hold integer class indices, got dtype {y.dtype} (e.g. {y[:3]!r})")
    y = y.astype(np.int64, copy=False)
    if n_classes is not None:
        bad = np.flatnonzero((y < 0) | (y >= n_classes))
        if bad.size:
            i = int(bad[0])
            raise ConfigError(
                f"{name}[{i}] = {int(y[i])} is not a class index: expected 0..{n_classes - 1} "
                f"for {n_classes} classes ({bad.size} bad label(s) in total)"
            )
    return y


def _check_probs(probs: Any, n: int, name: str = "probs") -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        hint = " (binary: pass np.stack([1 - p, p], axis=1))" if p.ndim == 1 else ""
        raise ConfigError(f"{name} must have shape (N, K) with one column per class, got {p.shape}{hint}")
    if p.shape[0] != n:
        raise ConfigError(f"{name} has {p.shape[0]} rows but y_true has {n} labels; expected one row per image")
    if p.shape[1] < 2:
        raise ConfigError(f"{name} must have K >= 2 columns (one per class), got {p.shape[1]}")
    bad = np.argwhere(~np.isfinite(p))
    if bad.size:
        i, j = (int(v) for v in bad[0])
        raise ConfigError(f"{name}[{i}, {j}] = {p[i, j]} is not finite ({len(bad)} non-finite value(s))")
    if p.min() < -_ROW_SUM_ATOL or p.max() > 1 + _ROW_SUM_ATOL:
        i, j = np.unravel_index(int(np.argmax(np.abs(p - 0.5))), p.shape)
        raise ConfigError(
            f"{name}[{i}, {j}] = {p[i, j]:.4g} is outside [0, 1]: expected softmax probabilities; "
            "did you pass logits? apply torch.softmax(logits, dim=1) first"
        )
    sums = p.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > _ROW_SUM_ATOL)
    if off.size:
        i = int(off[0])
        raise ConfigError(
            f"{name} row {i} sums to {sums[i]:.6g}, expected 1 (softmax probabilities; {off.size} row(s) off); "
            "did you pass logits or sigmoid outputs? apply torch.softmax(logits, dim=1) first"
        )
    # Remove float32 round-off so sklearn's own sum-to-one check never trips.
    p = np.clip(p, 0.0, None)
    return p / p.sum(axis=1, keepdims=True)


def _check_classes(classes: Sequence[str], n_classes: int) -> list[str]:
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ConfigError(f"classes must be a list of class names, got {classes!r}")
    names = [str(c) for c in classes]
    if len(names) != n_classes:
        raise ConfigError(
            f"classes has {len(names)} names {names} but probs has {n_classes} columns; expected one name per column"
        )
    if len(set(names)) != len(names):
        dupes = sorted({c for c in names if names.count(c) > 1})
        raise ConfigError(f"classes must be unique, got duplicates {dupes} in {names}")
    return names


def _check_bootstrap_args(n_bootstrap: int, ci: float) -> None:
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap must be an integer >= 0 (0 = no confidence intervals), got {n_bootstrap!r}")
    if not (0.0 < float(ci) < 1.0):
        raise ConfigError(f"ci must be a confidence level strictly between 0 and 1 (e.g. 0.95), got {ci!r}")
