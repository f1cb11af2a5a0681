"""The drop from a run's own test split to external data: an unpaired bootstrap over two image sets.

``performance_drop(y_internal, probs_internal, y_external, probs_external, classes)`` gives, for
accuracy, AUROC, sensitivity and specificity, internal − external with a 95% CI from resampling each
set on its own (the sets hold different images, so a paired bootstrap does not apply).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn import config_context

from medtricks.errors import ConfigError
from medtricks.evaluate.markdown import fmt_delta_ci, fmt_num, markdown_table
from medtricks.evaluate.bootstrap import _percentile_interval
from medtricks.evaluate.metric_inputs import _check_bootstrap_args
from medtricks.evaluate.metrics import _CLASS_AVERAGED, _FAST_SKLEARN, _auroc, _scalar_metric_fn

__all__ = ["drop_metric_fns", "unpaired_bootstrap_delta", "PerformanceDrop", "performance_drop"]


# ------------------------------------------------------------------------ drop vs internal test
def drop_metric_fns(classes: list[str]) -> dict[str, Any]:
    """``{name: fn(y_true, probs) -> float}`` compared between internal and external test sets:
    accuracy, AUROC and, for a binary model, sensitivity and specificity of the positive class
    ``classes[1]`` (per class, ``sensitivity/<class>``, for multiclass). Decisions are ``argmax``."""

    def recall(c: int, of_class: bool):
        def fn(y: np.ndarray, p: np.ndarray) -> float:
            mask = (y == c) if of_class else (y != c)
            if not mask.any():
                return math.nan
            return float(np.mean((p[mask].argmax(1) == c) == of_class))

        return fn

    fns: dict[str, Any] = {"accuracy": lambda y, p: float(np.mean(p.argmax(1) == y)), "auroc": _auroc}
    if len(classes) == 2:
        fns.update(sensitivity=recall(1, True), specificity=recall(1, False))
    else:
        fns.update({f"sensitivity/{c}": recall(i, True) for i, c in enumerate(classes)})
        fns.update({f"specificity/{c}": recall(i, False) for i, c in enumerate(classes)})
    return fns


def _unpaired_bootstrap(
    y_a: np.ndarray,
    p_a: np.ndarray,
    y_b: np.ndarray,
    p_b: np.ndarray,
    fns: dict[str, Any],
    *,
    n_bootstrap: int,
    ci: float,
    seed: int,
    needs_all_classes=(),
) -> dict[str, dict[str, Any]]:
    def scores(y: np.ndarray, p: np.ndarray, n_classes: int) -> dict[str, float]:
        out = {}
        for name, fn in fns.items():
            if name in needs_all_classes and np.unique(y).size < n_classes:
                out[name] = math.nan  # a resample that lost a class: the class average changes meaning
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[name] = float(fn(y, p))
            except ValueError:
                out[name] = math.nan
        return out

    na, nb = np.unique(y_a).size, np.unique(y_b).size
    full_a, full_b = scores(y_a, p_a, na), scores(y_b, p_b, nb)
    deltas = {name: np.full(n_bootstrap, np.nan) for name in fns}
    rng = np.random.default_rng(seed)
    with config_context(**_FAST_SKLEARN):  # inputs were checked once above
        for i in range(n_bootstrap):
            # Unpaired: the two sets hold different images, so each is resampled on its own.
            ia, ib = rng.integers(0, len(y_a), len(y_a)), rng.integers(0, len(y_b), len(y_b))
            sa, sb = scores(y_a[ia], p_a[ia], na), scores(y_b[ib], p_b[ib], nb)
            for name in fns:
                deltas[name][i] = sa[name] - sb[name]
    out = {}
    for name in fns:
        delta = full_a[name] - full_b[name]
        valid = deltas[name][np.isfinite(deltas[name])]
        low, high = _percentile_interval(valid, ci) if math.isfinite(delta) and valid.size else (math.nan, math.nan)
        out[name] = {
            "metric": name,
            "value_a": full_a[name],
            "value_b": full_b[name],
            "delta": delta,
            "ci_low": low,
            "ci_high": high,
            "n_bootstrap": int(n_bootstrap),
            "n_skipped": int(n_bootstrap - valid.size),
        }
    return out


def _check_pair(y: Any, probs: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y).astype(int), np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p) or not len(y):
        raise ConfigError(f"{name}: need y_true (N,) and probs (N, K) with N > 0, got shapes {y.shape} and {p.shape}")
    return y, p


def unpaired_bootstrap_delta(
    y_a: Any,
    probs_a: Any,
    y_b: Any,
    probs_b: Any,
    metric: Any = "auroc",
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """``metric(a) − metric(b)`` for two sets of *different* images, with an unpaired percentile
    bootstrap CI (each set resampled independently, ``n_bootstrap`` times, seeded).

    Use it where :func:`medtricks.evaluate.paired_bootstrap_delta` does not apply: the same model on
    an internal and an external test set. ``metric``: ``accuracy``, ``balanced_accuracy``, ``auroc``,
    ``f1``, ``ece`` or a callable ``(y_true, probs) -> float``. Resamples where the metric is undefined
    on either side are skipped and counted (``n_skipped``).

    Returns ``{"metric", "value_a", "value_b", "delta", "ci_low", "ci_high", "n_bootstrap", "n_skipped"}``.

    Example::

        d = unpaired_bootstrap_delta(y_internal, p_internal, y_external, p_external, "auroc")
        print(f"AUROC drop {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
    """
    ya, pa = _check_pair(y_a, probs_a, "set a")
    yb, pb = _check_pair(y_b, probs_b, "set b")
    if pa.shape[1] != pb.shape[1]:
        raise ConfigError(f"probs_a has {pa.shape[1]} classes but probs_b has {pb.shape[1]}")
    _check_bootstrap_args(n_bootstrap, ci)
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")
    fn = _scalar_metric_fn(metric, pa.shape[1], 15)
    needs = (name,) if isinstance(metric, str) and metric in _CLASS_AVERAGED else ()
    return _unpaired_bootstrap(
        ya, pa, yb, pb, {name: fn}, n_bootstrap=n_bootstrap, ci=ci, seed=seed, needs_all_classes=needs
    )[name]


@dataclass
class PerformanceDrop:
    """Internal test value, external value and ``drop = internal − external`` (positive: worse on the
    external data) with an unpaired bootstrap CI, per metric."""

    rows: list[dict[str, Any]]
    n_internal: int
    n_external: int
    n_bootstrap: int
    ci: float
    rule: str = "argmax"

    def to_metrics(self, prefix: str = "eval/drop/") -> dict[str, float]:
        out = {}
        for r in self.rows:
            out[f"{prefix}{r['metric']}"] = r["delta"]
            out[f"{prefix}{r['metric']}_ci_low"] = r["ci_low"]
            out[f"{prefix}{r['metric']}_ci_high"] = r["ci_high"]
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}

    def table(self) -> str:
        pct = f"{100 * self.ci:g}%"
        rows = [
            [
                r["metric"],
                fmt_num(r["value_a"]),
                fmt_num(r["value_b"]),
                fmt_delta_ci(r["delta"], r["ci_low"], r["ci_high"]),
            ]
            for r in self.rows
        ]
        head = (
            f"Drop vs the run's internal test split ({self.n_internal} images) on this data ({self.n_external} "
            f"images), decisions at {self.rule}; drop = internal − external (positive: worse here), {pct} CI "
            f"from an unpaired bootstrap ({self.n_bootstrap} resamples of each set)"
        )
        return head + "\n" + markdown_table(["metric", "internal test", "external", f"drop [{pct} CI]"], rows)


def performance_drop(
    y_internal: Any,
    probs_internal: Any,
    y_external: Any,
    probs_external: Any,
    classes: list[str],
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    rule: str = "argmax",
) -> PerformanceDrop:
    """:class:`PerformanceDrop` of the metrics of :func:`drop_metric_fns` (all from one set of resamples)."""
    ya, pa = _check_pair(y_internal, probs_internal, "internal test predictions")
    yb, pb = _check_pair(y_external, probs_external, "external predictions")
    if pa.shape[1] != len(classes) or pb.shape[1] != len(classes):
        raise ConfigError(
            f"internal ({pa.shape[1]}) and external ({pb.shape[1]}) predictions must both have "
            f"{len(classes)} class columns ({classes})"
        )
    _check_bootstrap_args(n_bootstrap, ci)
    results = _unpaired_bootstrap(ya, pa, yb, pb, drop_metric_fns(classes), n_bootstrap=n_bootstrap, ci=ci, seed=seed)
    return PerformanceDrop(
        rows=list(results.values()), n_internal=len(ya), n_external=len(yb), n_bootstrap=n_bootstrap, ci=ci, rule=rule
    )
