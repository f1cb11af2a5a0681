"""The table's metric: which keys of a run's logged metrics it reads (value, CI, split, image-level name)
and which direction is better. Shared by the ablation runner, its executors and ``medtricks compare``.
"""

from __future__ import annotations

from typing import Optional

from medtricks.errors import ConfigError
from medtricks.evaluate.metrics import SCALAR_METRICS
from medtricks.rundir import best_key, ci_keys

__all__ = ["metric_keys", "higher_is_better"]

_LOWER_IS_BETTER = ("loss", "ece")


def metric_keys(metric: str, *, allow_eval: bool = False) -> dict[str, Optional[str]]:
    """How a table metric maps onto what a run logged.

    ``val/auroc`` → value ``best/val/auroc`` (the best checkpoint, evaluated with bootstrap CIs),
    CI ``best/val/auroc_ci_low`` / ``_ci_high``, split ``val``, image-level name ``auroc``.
    A key already starting with ``best/`` is taken as is. With ``allow_eval`` (``compare``, not
    ``ablate``: an ablation trains, it does not evaluate) ``eval/<m>`` and ``eval/op/<m>`` name
    what ``medtricks evaluate`` / ``ensemble`` runs logged, paired through their
    ``predictions_eval.npz`` (``probs``, or ``probs_op`` at the operating point).

    >>> metric_keys("val/auroc")["value"]
    'best/val/auroc'
    >>> metric_keys("eval/op/accuracy", allow_eval=True)["probs_key"]
    'probs_op'
    """
    if allow_eval and isinstance(metric, str) and metric.startswith("eval/"):
        parts = metric.split("/")
        at_op = len(parts) > 2 and parts[1] == "op"
        name = "/".join(parts[2:] if at_op else parts[1:])
        if not name or not all(parts[1:]):
            raise ConfigError(f"metric must be eval/<name> or eval/op/<name> (e.g. eval/auroc), got {metric!r}")
        # eval/drop/<m> compares two image sets: no image-level pairing between runs
        image_level = name in SCALAR_METRICS and not (at_op and name == "ece")
        low, high = ci_keys(metric)
        return {
            "value": metric,
            "ci_low": low,
            "ci_high": high,
            "split": "eval",
            "name": "/".join(parts[1:]),
            "scalar": name if image_level else None,
            "probs_key": "probs_op" if at_op else "probs",
        }
    if isinstance(metric, str) and metric.startswith("eval/") and not allow_eval:
        raise ConfigError(
            f"metric {metric!r} is logged by evaluation runs (medtricks evaluate / ensemble), which "
            "an ablation does not make; use val/<name> or test/<name> here, and medtricks compare "
            "--runs EVAL_RUN ... --metric eval/<name> for evaluation runs"
        )
    key = metric if isinstance(metric, str) and metric.startswith("best/") else f"best/{metric}"
    parts = key.split("/")
    if not isinstance(metric, str) or len(parts) < 3 or parts[1] not in ("val", "test") or not parts[2]:
        also = ", or eval/<name> / eval/op/<name> for evaluation runs" if allow_eval else ""
        raise ConfigError(
            f"metric must be val/<name> or test/<name> (the best checkpoint's value, e.g. "
            f"val/auroc, test/accuracy, val/sensitivity/covid){also}, got {metric!r}"
        )

    name = "/".join(parts[2:])
    key = best_key(parts[1], name)
    low, high = ci_keys(key)
    return {
        "value": key,
        "ci_low": low,
        "ci_high": high,
        "split": parts[1],
        "name": name,
        "scalar": name if name in SCALAR_METRICS else None,
        "probs_key": "probs",
    }


def higher_is_better(metric: str) -> bool:
    """``False`` for losses and calibration error, ``True`` for everything else."""
    name = metric.rsplit("/", 1)[-1]
    return not any(name == m or name.endswith(m) for m in _LOWER_IS_BETTER)
