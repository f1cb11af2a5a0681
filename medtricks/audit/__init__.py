"""Robustness audits: adversarial attacks and image corruptions, scored with bootstrap CIs.

Names are loaded on first use (PEP 562), so ``import medtricks.audit`` is cheap; torch-heavy code,
ART and matplotlib load only when an audit runs.

Example:
    >>> from medtricks.audit import run_audit
    >>> res = run_audit(model, val_loader, classes=["normal", "pneumonia"], mean=(0.5,), std=(0.25,),
    ...                 attacks=("fgsm", "pgd_linf"), corruptions=("all",), n=500)
    >>> print(res.table())
    >>> tracker.log_metrics(res.metrics)
    >>> for path, fig in res.figures().items():
    ...     tracker.log_figure(fig, path)
    >>> tracker.log_text(res.to_json(), "audit/report.json")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from medtricks.audit.attack_names import RENAMED_ATTACKS as _RENAMED  # no torch: the names only

_EXPORTS = {
    "run_audit": "runner",
    "DEFAULT_EPS": "runner",
    "AuditResult": "report",
    "AuditExamples": "report",
    "corruption_error": "report",
    "list_corruptions": "corruptions",
    "corrupt": "corruptions",
    "CORRUPTION_PARAMS": "corruptions",
    "ATTACKS": "adversarial",
    "PerturbationBudgetError": "adversarial",
    "normalized_model": "adversarial",
    "check_perturbation": "adversarial",
    "l2_radius": "adversarial",
    "fgsm": "adversarial",
    "pgd": "adversarial",
    "apgd": "adversarial",
    "square": "adversarial",
    "apgd_square": "adversarial",
    "RENAMED_ATTACKS": "adversarial",
    "masking_checks": "masking",
    "MaskingCheck": "masking",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from medtricks.audit.adversarial import (
        ATTACKS,
        PerturbationBudgetError,
        RENAMED_ATTACKS,
        apgd,
        apgd_square,
        check_perturbation,
        fgsm,
        l2_radius,
        normalized_model,
        pgd,
        square,
    )
    from medtricks.audit.masking import MaskingCheck, masking_checks
    from medtricks.audit.corruptions import CORRUPTION_PARAMS, corrupt, list_corruptions
    from medtricks.audit.report import AuditExamples, AuditResult, corruption_error
    from medtricks.audit.runner import DEFAULT_EPS, run_audit


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if name in _RENAMED:
        raise AttributeError(_RENAMED[name])
    if module is None:
        raise AttributeError(f"module 'medtricks.audit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"medtricks.audit.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
