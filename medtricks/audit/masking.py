"""Gradient-masking checks: is a "robust" audit result real, or did the gradients just stop helping?

Athalye, Carlini & Wagner (ICML 2018) and Carlini et al.'s "On evaluating adversarial robustness"
(2019) list the signs of masked or obfuscated gradients; three of them are cheap enough to run with
every audit that has a white-box PGD-L∞ (untargeted):

``more_steps``  PGD with more steps must not leave *more* images correct than PGD with fewer steps
                (the audit's ``pgd_steps`` vs ``max(1, pgd_steps // 5)``, at the largest ε).
``black_box``   a black-box attack (Square, transfer, or random sign noise at the ε-ball's corners)
                must not break images PGD cannot: its accuracy must not be below PGD's, at every
                shared ε.
``large_eps``   at a large budget (ε = 64/255, where the image itself can be repainted) PGD must take
                accuracy to ~0 (≤ 5%).

Each comparison is on the same images; a difference counts only when it exceeds the larger of one
image and 1.96 standard errors of the paired difference, so sampling noise does not fire a warning.
A failed check does not prove masking, and passing them does not prove robustness; a failure says:
do not trust this robust accuracy until a stronger or adaptive attack confirms it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

__all__ = ["MaskingCheck", "masking_checks", "LARGE_EPS", "LARGE_EPS_MAX_ACCURACY", "fewer_steps"]

#: The "unbounded-ish" budget of the ``large_eps`` check (64 grey levels).
LARGE_EPS = 64 / 255
#: Accuracy PGD must reach at :data:`LARGE_EPS` for the check to pass.
LARGE_EPS_MAX_ACCURACY = 0.05


def fewer_steps(pgd_steps: int) -> int:
    """The step count the ``more_steps`` check compares the audit's PGD with."""
    return max(1, pgd_steps // 5)


@dataclass
class MaskingCheck:
    """One check's verdict: ``passed`` and the numbers behind it, in words."""

    check: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"{'ok  ' if self.passed else 'WARNING'} gradient-masking check {self.check}: {self.detail}"


def _tolerance(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest accuracy difference between two paired correctness vectors that is not noise."""
    d = a.astype(np.float64) - b.astype(np.float64)
    n = len(d)
    se = float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return max(1.0 / n, 1.96 * se)


def masking_checks(
    correct_pgd: dict[float, np.ndarray],
    *,
    pgd_steps: int,
    correct_fewer: Optional[np.ndarray] = None,
    black_box: Optional[dict[str, dict[float, np.ndarray]]] = None,
    correct_large: Optional[np.ndarray] = None,
) -> list[MaskingCheck]:
    """The checks above from per-image correctness (``True`` = still correctly classified).

    Args:
        correct_pgd: ε -> per-image correctness under the audit's PGD-L∞ (``pgd_steps`` steps).
        correct_fewer: under PGD with :func:`fewer_steps` steps at the largest ε of ``correct_pgd``.
        black_box: attack name -> ε -> per-image correctness of a black-box attack.
        correct_large: under PGD at :data:`LARGE_EPS`.
    """
    checks: list[MaskingCheck] = []
    eps_max = max(correct_pgd)
    if correct_fewer is not None:
        many, few = correct_pgd[eps_max], correct_fewer
        gap = float(many.mean() - few.mean())
        tol = _tolerance(many, few)
        checks.append(
            MaskingCheck(
                "more_steps",
                gap <= tol,
                f"at eps {eps_max * 255:.3g}/255 PGD-{pgd_steps} leaves accuracy {many.mean():.3f}, PGD-"
                f"{fewer_steps(pgd_steps)} {few.mean():.3f} (more steps must not do better; tolerance {tol:.3f})",
            )
        )
    for name, by_eps in (black_box or {}).items():
        worst = None
        for eps, correct in sorted(by_eps.items()):
            if eps not in correct_pgd or eps == 0:
                continue
            gap = float(correct_pgd[eps].mean() - correct.mean())
            tol = _tolerance(correct_pgd[eps], correct)
            if worst is None or gap - tol > worst[0] - worst[1]:
                worst = (gap, tol, eps, float(correct.mean()), float(correct_pgd[eps].mean()))
        if worst is None:
            continue
        gap, tol, eps, acc_bb, acc_pgd = worst
        checks.append(
            MaskingCheck(
                f"black_box:{name}",
                gap <= tol,
                f"at eps {eps * 255:.3g}/255 {name} leaves accuracy {acc_bb:.3f}, white-box PGD {acc_pgd:.3f} "
                f"(black-box must not beat white-box; tolerance {tol:.3f})",
            )
        )
    if correct_large is not None:
        acc = float(correct_large.mean())
        limit = LARGE_EPS_MAX_ACCURACY + 1.0 / len(correct_large)
        checks.append(
            MaskingCheck(
                "large_eps",
                acc <= limit,
                f"at eps {LARGE_EPS * 255:.0f}/255 PGD-{pgd_steps} leaves accuracy {acc:.3f} (must fall to ~0: "
                f"<= {limit:.3f})",
            )
        )
    return checks
