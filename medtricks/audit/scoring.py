"""Scoring of a finished audit sweep: metrics with bootstrap CIs per attack × ε and corruption × severity,
the ``worst_case`` row, attack success rates, the corruption summary and the report's config.

Every number goes through ``medtricks.evaluate.compute_metrics`` (or its bootstrap), so every audit
number comes with its CI and means what the evaluation's number of the same name means.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn import config_context

from medtricks.audit.adversarial import l2_radius
from medtricks.audit.corruptions import CORRUPTION_PARAMS
from medtricks.audit.masking import masking_checks
from medtricks.audit.plan import AuditPlan
from medtricks.audit.report import AuditResult, safe_name
from medtricks.audit.sweep import AuditSweep

# _auroc is the AUROC compute_metrics reports (binary on class 1, else macro one-vs-rest; nan when a
# class is absent, which bootstrap_ci skips), reused so the corruption summary means the same.
from medtricks.evaluate.metrics import _auroc, bootstrap_ci, compute_metrics

__all__ = ["score_sweep"]

_CI = 0.95
_ATTACK_METRICS = ("accuracy", "auroc")
_CORRUPTION_METRICS = ("accuracy", "auroc")


def score_sweep(sweep: AuditSweep, *, device) -> AuditResult:
    """The :class:`AuditResult` of a collected sweep."""
    plan = sweep.plan
    n_bootstrap = plan.n_bootstrap
    y = np.concatenate(sweep.y)
    clean_p = np.concatenate(sweep.clean)

    def scored(probs, keys):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from y: reported as nan
            res = compute_metrics(y, probs, plan.names, n_bootstrap=int(n_bootstrap), ci=_CI, seed=plan.seed)
        return _flat(res, keys, plan.names)

    per_class = [f"{kind}/{c}" for kind in ("sensitivity", "specificity") for c in plan.names]
    clean = scored(clean_p, list(_ATTACK_METRICS) + per_class)
    attacks: dict[str, dict[float, dict[str, float]]] = {}
    for attack in plan.attacks:
        rows = attacks.setdefault(plan.labels[attack], {})
        for eps in plan.eps:
            probs = clean_p if eps == 0 else np.concatenate(sweep.adv[(attack, eps)])
            row = scored(probs, list(_ATTACK_METRICS) + per_class)
            row.update(_success_rate(plan, y, clean_p, probs))
            rows[eps] = row
    if len(plan.attacks) >= 2:
        worst = {}
        for eps in plan.eps:
            probs = (
                clean_p
                if eps == 0
                else _worst_case(plan, [np.concatenate(sweep.adv[(a, eps)]) for a in plan.attacks], y)
            )
            row = scored(probs, list(_ATTACK_METRICS) + per_class)
            row.update(_success_rate(plan, y, clean_p, probs))
            worst[eps] = row
        attacks["worst_case" if plan.target is None else f"worst_case_to_{safe_name(plan.names[plan.target])}"] = worst
    masking = [c.as_dict() for c in _masking_checks(sweep, y)] if plan.masking else []
    corruptions: dict[str, dict[int, dict[str, float]]] = {}
    cells = []
    for name in plan.corruptions:
        rows = corruptions.setdefault(name, {})
        for severity in plan.severities:
            probs = clean_p if severity == 0 else np.concatenate(sweep.corrupted[(name, severity)])
            rows[severity] = scored(probs, _CORRUPTION_METRICS)
            cells.append(probs)
    summary = _corruption_summary(y, clean_p, cells, clean, corruptions, n_bootstrap, plan.seed) if cells else {}
    return AuditResult(
        classes=list(plan.names),
        config=_config(sweep, len(y), device),
        clean=clean,
        attacks=attacks,
        corruptions=corruptions,
        corruption_summary=summary,
        examples=sweep.examples,
        masking=masking,
    )


def _worst_case(plan: AuditPlan, per_attack: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Per image, the probabilities of the attack that did the most damage: one that fooled the model
    (untargeted: wrong class; targeted: the target class) over one that did not, then the lowest
    true-class (highest target-class) probability."""
    stack = np.stack(per_attack)  # (attacks, N, K)
    rows = np.arange(len(y))
    if plan.target is None:
        fooled = stack.argmax(2) != y[None, :]
        score = fooled * 2.0 + (1.0 - stack[:, rows, y])
    else:
        fooled = stack.argmax(2) == plan.target
        score = fooled * 2.0 + stack[:, :, plan.target]
    return stack[score.argmax(0), rows]


def _masking_checks(sweep: AuditSweep, y: np.ndarray):
    def correct(probs):
        return probs.argmax(1) == y

    plan = sweep.plan
    pgd_rows = {e: correct(np.concatenate(sweep.adv[("pgd_linf", e)])) for e in plan.eps if e > 0}
    black_box = {
        a: {e: correct(np.concatenate(sweep.adv[(a, e)])) for e in plan.eps if e > 0}
        for a in ("square", "transfer")
        if a in plan.attacks
    }
    black_box["random_noise"] = {e: np.concatenate(v) for e, v in sweep.probe_noise.items()}
    return masking_checks(
        pgd_rows,
        pgd_steps=plan.pgd_steps,
        correct_fewer=np.concatenate(sweep.probe_fewer),
        black_box=black_box,
        correct_large=np.concatenate(sweep.probe_large),
    )


def _success_rate(plan: AuditPlan, y, clean_p, probs) -> dict[str, float]:
    """Share of originally correct images the attack flips (targeted: to the target class,
    counted over images whose true class is not the target)."""
    n_bootstrap = plan.n_bootstrap
    correct = clean_p.argmax(1) == y
    pred = probs.argmax(1)
    if plan.target is None:
        eligible, success = correct, pred != y
    else:
        eligible, success = correct & (y != plan.target), pred == plan.target
    s = success[eligible].astype(np.float64)
    out = {
        "attack_success_rate": float(s.mean()) if s.size else math.nan,
        "attack_success_rate_ci_low": math.nan,
        "attack_success_rate_ci_high": math.nan,
    }
    if s.size and n_bootstrap:
        low, high = bootstrap_ci(
            lambda v, _: float(v.mean()), s, s[:, None], n_bootstrap=int(n_bootstrap), ci=_CI, seed=plan.seed
        )
        out["attack_success_rate_ci_low"], out["attack_success_rate_ci_high"] = low, high
    return out


def _config(sweep: AuditSweep, n_images, device) -> dict[str, Any]:
    plan = sweep.plan
    notes = []
    if "pgd_l2" in plan.attacks and sweep.image_shape:
        notes.append(
            f"pgd_l2: eps is the per-pixel RMS; L2 radius = eps*sqrt({int(np.prod(sweep.image_shape))}) "
            f"(e.g. eps 1/255 -> {l2_radius(1 / 255, sweep.image_shape):.3f})"
        )
    if "apgd_square" in plan.attacks:
        dlr = "APGD-DLR, " if len(plan.names) >= 3 and plan.target is None else ""
        notes.append(
            f"apgd_square: APGD-CE ({sweep.apgd_steps} it.), {dlr}Square ({plan.square_queries} queries), "
            "L-inf, per-image worst case; a reduced AutoAttack: no APGD-T, no FAB-T"
            f"{'' if plan.square_queries >= 5000 else ', fewer Square queries than the standard 5000'}"
        )
    if len(plan.attacks) >= 2:
        notes.append("worst_case: an image counts as correct only if every attack failed on it (AutoAttack rule)")
    if "transfer" in plan.attacks:
        notes.append(f"transfer: PGD-L-inf-{plan.pgd_steps} crafted on the surrogate, scored on the model")
    return {
        "attacks": [plan.labels[a] for a in plan.attacks],
        "eps": list(plan.eps),
        "pgd_steps": plan.pgd_steps,
        "pgd_step_size": "2.5 * eps / pgd_steps, random start, best iterate kept",
        "apgd_steps": sweep.apgd_steps,
        "square_queries": plan.square_queries,
        "target_class": None if plan.target is None else plan.names[plan.target],
        "corruptions": list(plan.corruptions),
        "severities": list(plan.severities),
        "corruption_params": {c: list(CORRUPTION_PARAMS[c]) for c in plan.corruptions},
        "n_requested": plan.n,
        "n_images": int(n_images),
        "image_shape": list(sweep.image_shape or ()),
        "max_perturbation_norm": {f"{plan.labels[a]}/{e:.4f}": v for (a, e), v in sweep.max_norm.items()},
        "seed": plan.seed,
        "n_bootstrap": int(plan.n_bootstrap),
        "ci": _CI,
        "device": str(device),
        "notes": notes,
    }


def _flat(res, keys, names) -> dict[str, float]:
    """Selected metrics of a MetricsResult as ``{key, key_ci_low, key_ci_high}`` with MLflow-safe class names."""
    out: dict[str, float] = {}
    for key in keys:
        value = float(res.values.get(key, math.nan))
        low, high = res.ci.get(key, (math.nan, math.nan))
        kind, _, cls = key.partition("/")
        name = f"{kind}/{safe_name(cls)}" if cls else key
        out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = value, float(low), float(high)
    return out


def _corruption_summary(y, clean_p, cells, clean, corruptions, n_bootstrap, seed) -> dict[str, float]:
    """Mean accuracy / AUROC over all corruption cells and the relative drop vs clean, with paired
    bootstrap CIs (the same resampled images for clean and every cell)."""
    stack = np.stack([clean_p] + cells, axis=1).astype(np.float64)  # (N, 1 + cells, K)
    stack /= stack.sum(axis=2, keepdims=True)
    accs = [v["accuracy"] for rows in corruptions.values() for v in rows.values()]
    aurocs = [v["auroc"] for rows in corruptions.values() for v in rows.values()]

    def mean_acc(yy, pp):
        return float((pp[:, 1:].argmax(2) == yy[:, None]).mean())

    def mean_auroc(yy, pp):
        return float(np.mean([_auroc(yy, pp[:, j]) for j in range(1, pp.shape[1])]))

    def drop_acc(yy, pp):
        base = float((pp[:, 0].argmax(1) == yy).mean())
        return (base - mean_acc(yy, pp)) / base if base > 0 else math.nan

    def drop_auroc(yy, pp):
        base = _auroc(yy, pp[:, 0])
        return (base - mean_auroc(yy, pp)) / base

    values = {
        "mean/accuracy": float(np.mean(accs)),
        "mean/auroc": float(np.mean(aurocs)),
        "relative_drop/accuracy": (clean["accuracy"] - float(np.mean(accs))) / clean["accuracy"]
        if clean["accuracy"] > 0
        else math.nan,
        "relative_drop/auroc": (clean["auroc"] - float(np.mean(aurocs))) / clean["auroc"],
    }
    fns = {
        "mean/accuracy": mean_acc,
        "mean/auroc": mean_auroc,
        "relative_drop/accuracy": drop_acc,
        "relative_drop/auroc": drop_auroc,
    }
    out: dict[str, float] = {}
    for key, value in values.items():
        out[key], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = value, math.nan, math.nan
        if n_bootstrap and math.isfinite(value):
            with warnings.catch_warnings(), config_context(assume_finite=True, skip_parameter_validation=True):
                warnings.simplefilter("ignore", RuntimeWarning)  # resamples missing a class are skipped
                try:
                    out[f"{key}_ci_low"], out[f"{key}_ci_high"] = bootstrap_ci(
                        fns[key], y, stack, n_bootstrap=int(n_bootstrap), ci=_CI, seed=seed
                    )
                except RuntimeError:  # undefined on every resample (tiny sets): no interval
                    pass
    return out
