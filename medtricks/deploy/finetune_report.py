"""The cross-fitted report of ``adapt --method finetune``: metrics on plain arrays, the printed table, the
flat metrics logged to the run store, and :class:`FinetuneResult`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medtricks.evaluate.metrics import compute_metrics
from medtricks.evaluate.operating_point import probs_at_threshold
from medtricks.evaluate.paired import image_bootstrap_delta

__all__ = ["RULES", "clamp_threshold", "crossfit_metrics", "format_crossfit", "flat_metrics", "FinetuneResult"]

#: Decision rules of the cross-fitted report, in the order printed.
RULES = ("stored", "0.5", "youden")
_RULE_NAMES = {
    "stored": "parent's stored threshold",
    "0.5": "threshold 0.5",
    "youden": "Youden on each fold's validation part",
}
_THRESHOLD_EPS = 1e-6


def _interval(result, key: str) -> Optional[list[float]]:
    bounds = result.ci.get(key)
    if not bounds or not all(math.isfinite(b) for b in bounds):
        return None
    return [float(bounds[0]), float(bounds[1])]


def _entry(result, key: str) -> dict[str, Any]:
    value = result.values.get(key, math.nan)
    return {"value": float(value) if math.isfinite(value) else None, "ci": _interval(result, key)}


def _decide(probs: np.ndarray, thresholds: np.ndarray, positive_index: int) -> np.ndarray:
    """Probabilities whose argmax is ``probs[:, positive] >= threshold`` (one threshold per image)."""
    out = np.empty_like(probs, dtype=np.float64)
    for t in np.unique(thresholds):
        rows = thresholds == t
        out[rows] = probs_at_threshold(probs[rows], float(t), positive_index)
    return out


def clamp_threshold(threshold: float) -> float:
    """``threshold`` kept within ``[1e-6, 1 - 1e-6]``."""
    return float(min(max(float(threshold), _THRESHOLD_EPS), 1.0 - _THRESHOLD_EPS))


def crossfit_metrics(
    y: Any,
    probs: Any,
    parent_probs: Any,
    fold_of: Any,
    *,
    fold_thresholds: Sequence[float],
    parent_fold_thresholds: Sequence[float],
    stored_threshold: float,
    classes: Sequence[str],
    positive_index: int = 1,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """The cross-fitted report on plain arrays: ``probs`` (out-of-fold, fine-tuned) and ``parent_probs``
    (out-of-the-box) on the same images; ``fold_of``: each image's fold; ``fold_thresholds[k]`` /
    ``parent_fold_thresholds[k]``: the Youden threshold of fold ``k``'s model / of the parent, chosen on fold
    ``k``'s validation part. Both models are bootstrapped on the same resamples (same ``seed``)."""
    y = np.asarray(y).astype(int)
    fold_of = np.asarray(fold_of).astype(int)
    positive = list(classes)[positive_index]
    out: dict[str, Any] = {
        "n_images": int(len(y)),
        "n_bootstrap": int(n_bootstrap),
        "ci_level": float(ci),
        "bootstrap": "images (percentile)",
        "seed": int(seed),
        "positive_class": positive,
        "models": {},
    }
    for name, p, per_fold in (("finetuned", probs, fold_thresholds), ("parent", parent_probs, parent_fold_thresholds)):
        p = np.asarray(p, dtype=np.float64)
        base = compute_metrics(y, p, list(classes), n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        entry: dict[str, Any] = {"auroc": _entry(base, "auroc"), "ece": _entry(base, "ece"), "rules": {}}
        per_image = np.asarray([clamp_threshold(per_fold[k]) for k in fold_of])
        for rule, thresholds in (
            ("stored", np.full(len(y), clamp_threshold(stored_threshold))),
            ("0.5", np.full(len(y), 0.5)),
            ("youden", per_image),
        ):
            decided = compute_metrics(
                y, _decide(p, thresholds, positive_index), list(classes), n_bootstrap=n_bootstrap, ci=ci, seed=seed
            )
            entry["rules"][rule] = {
                "threshold": float(thresholds[0]) if rule != "youden" else [float(t) for t in per_fold],
                "accuracy": _entry(decided, "accuracy"),
                "sensitivity": _entry(decided, f"sensitivity/{positive}"),
                "specificity": _entry(decided, f"specificity/{positive}"),
            }
        out["models"][name] = entry
    delta = image_bootstrap_delta(
        y,
        [np.asarray(probs, dtype=np.float64)],
        [np.asarray(parent_probs, dtype=np.float64)],
        "auroc",
        n_bootstrap=max(int(n_bootstrap), 1),
        ci=ci,
        seed=seed,
    )
    low, high = delta.get("ci_low"), delta.get("ci_high")
    finite = low is not None and high is not None and math.isfinite(low) and math.isfinite(high)
    out["delta_auroc"] = {
        "value": float(delta["delta"]),
        "ci": [float(low), float(high)] if finite else None,
        "p_value": float(delta["p_value"]) if delta.get("p_value") is not None else None,
        "decided": bool(finite and (low > 0 or high < 0)),
        "what": "fine-tuned (cross-fitted) minus out-of-the-box, paired image bootstrap",
    }
    per_fold = []
    for k in range(int(fold_of.max()) + 1):
        rows = fold_of == k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a fold with one class: AUROC nan, said as null
            ft = compute_metrics(y[rows], np.asarray(probs)[rows], list(classes), n_bootstrap=0).values["auroc"]
            pa = compute_metrics(y[rows], np.asarray(parent_probs)[rows], list(classes), n_bootstrap=0).values["auroc"]
        per_fold.append(
            {
                "fold": k + 1,
                "n_images": int(rows.sum()),
                "auroc_finetuned": float(ft) if math.isfinite(ft) else None,
                "auroc_parent": float(pa) if math.isfinite(pa) else None,
            }
        )
    out["per_fold"] = per_fold
    return out


def _cell(entry: Optional[dict]) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    ci = entry.get("ci")
    return f"{entry['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def format_crossfit(metrics: dict[str, Any]) -> str:
    """The cross-fitted report as a text table: out-of-the-box vs fine-tuned at every decision rule."""
    models = (("out-of-the-box", "parent"), ("fine-tuned", "finetuned"))
    head = ("rule", "model", "AUROC", "accuracy", "sensitivity", "specificity")
    rows = [
        ("any threshold" if i == 0 else "", label, _cell(metrics["models"][key]["auroc"]), "", "", "")
        for i, (label, key) in enumerate(models)
    ]
    for rule in RULES:
        for i, (label, key) in enumerate(models):
            r = metrics["models"][key]["rules"][rule]
            name = _RULE_NAMES[rule] + (f" {r['threshold']:.4f}" if rule == "stored" else "")
            label += " *" if rule == "youden" and key == "parent" else ""
            rows.append(
                (
                    name if i == 0 else "",
                    label,
                    "",
                    _cell(r["accuracy"]),
                    _cell(r["sensitivity"]),
                    _cell(r["specificity"]),
                )
            )
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(head, widths)).rstrip(),
        "-" * (sum(widths) + 2 * (len(widths) - 1)),
    ]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(
        "* the parent's threshold re-chosen (Youden) on the same validation parts: a threshold recalibration "
        "without fine-tuning"
    )
    d = metrics["delta_auroc"]
    if d["ci"]:
        verdict = (
            "the interval excludes 0"
            if d["decided"]
            else "the interval includes 0: this sample cannot decide whether fine-tuning changes AUROC"
        )
        lines.append(
            f"Δ AUROC fine-tuned − out-of-the-box: {d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
            f" (paired image bootstrap, p = {d['p_value']:.3f}); {verdict}"
        )
    else:
        lines.append(f"Δ AUROC fine-tuned − out-of-the-box: {d['value']:+.3f} (no interval)")
    lines.append(
        f"intervals: {metrics['ci_level']:.0%} percentile bootstrap over images, {metrics['n_bootstrap']} "
        f"resamples (seed {metrics['seed']}), both models on the same resamples; they hold the fold models "
        "fixed (the spread of training on other patients is not in them); the pooled AUROC pools "
        "the scores of the fold models"
    )
    return "\n".join(lines)


def flat_metrics(metrics: dict[str, Any], prefix: str = "finetune/crossfit/") -> dict[str, float]:
    flat: dict[str, float] = {}

    def put(key: str, entry: Optional[dict]) -> None:
        if entry and entry.get("value") is not None:
            flat[f"{prefix}{key}"] = entry["value"]
            if entry.get("ci"):
                flat[f"{prefix}{key}_ci_low"], flat[f"{prefix}{key}_ci_high"] = entry["ci"]

    for model, entry in metrics["models"].items():
        put(f"{model}/auroc", entry["auroc"])
        for rule, values in entry["rules"].items():
            for key in ("accuracy", "sensitivity", "specificity"):
                put(f"{model}/{rule}/{key}", values[key])
    put("delta_auroc", metrics["delta_auroc"])
    return flat


@dataclass
class FinetuneResult:
    """What :func:`~medtricks.deploy.finetune.finetune_run` returns: the final run, the cross-fit folder and the adaptation record."""

    run_dir: Path
    run_id: Optional[str]
    crossfit_dir: Path
    record: dict[str, Any]
    trained_folds: int = 0  # fold runs trained or continued in this call (the others were finished already)
    final_reused: bool = False  # the final run was finished already (not trained again)
    logged_to: Optional[str] = None
    warnings: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record["crossfit"]["metrics"]

    def summary(self) -> str:
        r = self.record
        cf, sample, op = r["crossfit"], r["sample"], r["operating_point"]
        lines = [
            f"adapt --method finetune: run {r['parent_run_id'] or r['parent_run_dir']} fine-tuned on site sample "
            f"{r['site_root']} (card {sample['card']}: {sample['n_images']} images, {sample['n_patients']} patients, "
            f"{sample['per_class']})",
            f"cross-fitted by patient in {cf['folds']} folds (fold seed {cf['seed']}; training seed "
            f"{r['settings']['experiment_seed']}): every image scored by a model fine-tuned without its patient; "
            f"{self.trained_folds} fold run(s) trained in this call, the others were finished already",
            "",
            format_crossfit(cf["metrics"]),
            "",
            f"final run: {self.run_dir}"
            + (f" (run id {self.run_id})" if self.run_id else "")
            + (" — finished already, reused" if self.final_reused else ""),
            f"  fine-tuned on the {sample['n_images']} site images less its own validation part "
            f"({r['settings']['val_fraction']:.0%} of the patients, as in every fold); checkpoint by "
            f"{r['settings']['checkpoint']}",
            f"  stored operating point {op['threshold']:.4f} = the mean of the fold Youden thresholds "
            f"{', '.join(f'{t:.4f}' for t in op['fold_thresholds'])}",
            f"  cross-fit folder: {self.crossfit_dir}",
        ]
        if self.logged_to:
            lines.append(f"  logged to {self.logged_to}")
        lines += [f"note: {w}" for w in self.warnings]
        return "\n".join(lines)
