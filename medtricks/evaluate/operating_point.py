"""Operating points: the decision threshold chosen on validation, and prior-shift correction.

A binary classifier's ``argmax`` is a threshold of 0.5 on the positive class probability, which is
right only when the deployment prevalence equals the training one and the costs of both errors are
equal. Here the threshold is chosen on the *validation* split (never on test) and stored with the
model; ``evaluate``/``predict`` apply it and report metrics at 0.5 and at the stored point.

- :func:`select_threshold` — Youden's J (max sensitivity + specificity − 1, sklearn's ROC curve) or
  the highest threshold that reaches a target sensitivity.
- :func:`prior_shift` — Saerens, Latinne & Decaestecker (Neural Computation 2002): with training
  class priors π and deployment priors π', the posterior becomes p'(y|x) ∝ p(y|x)·π'(y)/π(y).
- :func:`probs_at_threshold` — the same odds reweighting that moves threshold ``t`` to 0.5, so every
  ``argmax``-based metric (``compute_metrics``) is computed at the operating point; ranking metrics
  (AUROC) are unchanged by it.

Example::

    op = select_threshold(y_val, probs_val, method="youden")
    print(op.threshold)
    metrics_at_op = compute_metrics(y_test, probs_at_threshold(probs_test, op.threshold), classes)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medtricks.errors import ConfigError

__all__ = [
    "OperatingPoint",
    "select_threshold",
    "prior_shift",
    "probs_at_threshold",
    "class_priors",
    "parse_threshold",
    "OPERATING_POINT_FILE",
]

# Written next to model_state.pt in a run's model/ folder.
OPERATING_POINT_FILE = "operating_point.json"
_EPS = 1e-12


@dataclass
class OperatingPoint:
    """A decision threshold on ``probs[:, positive_index]`` chosen on validation, with its provenance."""

    threshold: float
    method: str  # "youden" | "sensitivity" | "fixed"
    positive_index: int = 1
    target_sensitivity: Optional[float] = None
    val_sensitivity: Optional[float] = None
    val_specificity: Optional[float] = None
    train_priors: list[float] = field(default_factory=list)  # class frequencies the model was trained on

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_json(cls, path: str | Path) -> "OperatingPoint":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise ConfigError(f"{path}: not a medtricks operating point ({err})") from err

    def describe(self) -> str:
        how = {
            "youden": "Youden's J on validation",
            "sensitivity": f"sensitivity >= {self.target_sensitivity} on validation",
            "fixed": "fixed",
        }.get(self.method, self.method)
        val = ""
        if self.val_sensitivity is not None:
            val = f"; on validation: sensitivity {self.val_sensitivity:.3f}, specificity {self.val_specificity:.3f}"
        return f"threshold {self.threshold:.4f} ({how}){val}"


def _binary(y_true: Any, probs: Any, positive_index: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ConfigError(f"operating points are for binary models: probs must be (N, 2), got {p.shape}")
    if len(y) != len(p):
        raise ConfigError(f"y_true ({len(y)}) and probs ({len(p)}) differ in length")
    if not 0 <= positive_index < 2:
        raise ConfigError(f"positive_index must be 0 or 1, got {positive_index}")
    positives = y == positive_index
    if positives.all() or not positives.any():
        raise ConfigError("choosing a threshold needs both classes in y_true (validation split has one class)")
    return positives.astype(int), p[:, positive_index]


def select_threshold(
    y_true: Any,
    probs: Any,
    *,
    method: str = "youden",
    target_sensitivity: Optional[float] = None,
    positive_index: int = 1,
    train_priors: Optional[Sequence[float]] = None,
) -> OperatingPoint:
    """Choose the decision threshold on validation predictions.

    ``method="youden"`` maximises sensitivity + specificity − 1 (ties: the threshold closest to 0.5);
    ``method="sensitivity"`` takes the highest threshold whose sensitivity is at least
    ``target_sensitivity`` (the most specific such point).
    """
    from sklearn.metrics import roc_curve

    y, score = _binary(y_true, probs, positive_index)
    # every distinct score is a candidate: the default drops points a target sensitivity may need
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # sklearn's first threshold is +inf (nothing positive)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if method == "youden":
        j = tpr - fpr
        best = np.flatnonzero(np.isclose(j, j.max()))
        i = int(best[np.argmin(np.abs(thresholds[best] - 0.5))])
    elif method == "sensitivity":
        if target_sensitivity is None or not 0.0 < float(target_sensitivity) <= 1.0:
            raise ConfigError(f"method 'sensitivity' needs target_sensitivity in (0, 1], got {target_sensitivity!r}")
        reach = np.flatnonzero(tpr >= float(target_sensitivity) - 1e-12)
        i = int(reach[0])  # thresholds decrease along the curve: the first one that reaches it
    else:
        raise ConfigError(f"unknown threshold method {method!r}; expected 'youden' or 'sensitivity'")
    return OperatingPoint(
        threshold=float(min(max(thresholds[i], 0.0), 1.0)),
        method=method,
        positive_index=positive_index,
        target_sensitivity=None if target_sensitivity is None else float(target_sensitivity),
        val_sensitivity=float(tpr[i]),
        val_specificity=float(1.0 - fpr[i]),
        train_priors=[float(v) for v in train_priors] if train_priors is not None else [],
    )


def parse_threshold(threshold: Any) -> tuple[str, Optional[float]]:
    """A ``--threshold`` of ``evaluate`` or ``predict``: ``stored`` | ``youden`` | ``sens=0.95`` (also
    ``sensitivity=0.95``) | a number in (0, 1) -> ``(kind, value)``: ``("stored", None)``,
    ``("youden", None)``, ``("sensitivity", 0.95)`` or ``("given", 0.3)``."""
    spec = "stored" if threshold is None else str(threshold).strip().lower()
    if spec in ("stored", "youden"):
        return spec, None
    if "=" in spec:
        key, _, value = spec.partition("=")
        if key.strip() in ("sens", "sensitivity"):
            try:
                target = float(value)
            except ValueError:
                target = math.nan
            if not 0.0 < target <= 1.0:
                raise ConfigError(
                    f"--threshold {threshold!r}: the target sensitivity must be a number in (0, 1], e.g. sens=0.95"
                )
            return "sensitivity", target
    try:
        number = float(spec)
    except ValueError:
        number = math.nan
    if not 0.0 < number < 1.0:  # also rejects nan
        raise ConfigError(
            f"--threshold must be stored, youden, sens=S (a target sensitivity such as sens=0.95) or "
            f"a number in (0, 1) such as 0.5; got {threshold!r}"
        )
    return "given", number


def class_priors(y: Any, n_classes: int) -> list[float]:
    """Class frequencies of integer labels ``y`` (what a model's posteriors were trained against)."""
    counts = np.bincount(np.asarray(y).astype(int), minlength=n_classes).astype(float)
    if counts.sum() == 0:
        raise ConfigError("no labels to count class priors from")
    return list(counts / counts.sum())


def prior_shift(probs: Any, train_priors: Sequence[float], target_priors: Sequence[float]) -> np.ndarray:
    """Posteriors re-weighted from training priors to deployment priors (Saerens et al. 2002).

    For a binary model ``target_priors`` may be a single number: the deployment prevalence of the
    positive class ``classes[1]``.
    """
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[1] if p.ndim == 2 else 0
    src = np.asarray(train_priors, dtype=np.float64)
    if np.ndim(target_priors) == 0:
        if k != 2:
            raise ConfigError("a single prevalence is only meaningful for a binary model; give one prior per class")
        prevalence = float(target_priors)
        dst = np.array([1.0 - prevalence, prevalence])
    else:
        dst = np.asarray(target_priors, dtype=np.float64)
    for name, v in (("train_priors", src), ("target priors", dst)):
        if v.shape != (k,) or (v <= 0).any() or (v >= 1).any() or not np.isclose(v.sum(), 1.0):
            raise ConfigError(f"{name} must be {k} probabilities in (0, 1) summing to 1, got {v.tolist()}")
    weighted = p * (dst / src)[None, :]
    return weighted / np.maximum(weighted.sum(axis=1, keepdims=True), _EPS)


def probs_at_threshold(probs: Any, threshold: float, positive_index: int = 1) -> np.ndarray:
    """Binary probabilities re-weighted so that ``argmax`` predicts positive exactly when
    ``probs[:, positive_index] >= threshold``. Ranking (AUROC) is unchanged."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ConfigError(f"thresholds apply to binary models: probs must be (N, 2), got {p.shape}")
    t = float(threshold)
    if not 0.0 < t < 1.0:
        raise ConfigError(f"threshold must be in (0, 1), got {threshold!r}")
    w = np.ones(2)
    w[positive_index] = (1.0 - t) / t
    out = p * w[None, :]
    out /= np.maximum(out.sum(axis=1, keepdims=True), _EPS)
    # Near p == t both columns round to about 0.5, and rounding may put a row on either side: the
    # comparison with t itself decides (ties go to the positive class), as the docstring promises.
    positive = p[:, positive_index] >= t
    margin = out[:, positive_index] - out[:, 1 - positive_index]
    for rows, sign in ((positive & (margin <= 0), 1.0), (~positive & (margin >= 0), -1.0)):
        out[rows, positive_index] = 0.5 + sign * 1e-9
        out[rows, 1 - positive_index] = 0.5 - sign * 1e-9
    return out
