"""Evaluation: metrics with bootstrap CIs, statistics over seeds, and PNG-ready figures.

Names are loaded on first use (PEP 562), so ``import medtricks.evaluate`` stays cheap and sklearn,
scipy and matplotlib are imported only by code that needs them.

Example (``y_true`` integer labels, ``probs`` softmax outputs)::

    from medtricks.evaluate import compute_metrics, plot_roc_curves
    res = compute_metrics(y_true, probs, ["normal", "pneumonia"])
    print(res.table("test"))
    plot_roc_curves(y_true, probs, ["normal", "pneumonia"]).savefig("roc.png")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "compute_metrics": "metrics",
    "MetricsResult": "metrics",
    "bootstrap_ci": "bootstrap",
    "paired_bootstrap_delta": "metrics",
    "expected_calibration_error": "metrics",
    "calibration_bins": "metrics",
    "mean_ci": "stats",
    "paired_comparison": "stats",
    "plot_confusion_matrix": "plots",
    "plot_roc_curves": "plots",
    "plot_reliability_diagram": "plots",
    "plot_lr_schedule": "plots",
    "plot_forest": "plots",
    "plot_cka": "plots",
    "linear_cka": "cka",
    "minibatch_cka": "cka",
    "MinibatchCKA": "cka",
    "OperatingPoint": "operating_point",
    "select_threshold": "operating_point",
    "prior_shift": "operating_point",
    "probs_at_threshold": "operating_point",
    "performance_drop": "drop",
    "unpaired_bootstrap_delta": "drop",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from medtricks.evaluate.bootstrap import bootstrap_ci
    from medtricks.evaluate.metrics import (
        MetricsResult,
        calibration_bins,
        compute_metrics,
        expected_calibration_error,
        paired_bootstrap_delta,
    )
    from medtricks.evaluate.plots import (
        plot_confusion_matrix,
        plot_forest,
        plot_lr_schedule,
        plot_reliability_diagram,
        plot_roc_curves,
    )
    from medtricks.evaluate.stats import mean_ci, paired_comparison


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medtricks.evaluate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"medtricks.evaluate.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
