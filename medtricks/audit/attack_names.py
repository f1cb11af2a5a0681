"""Attack names, importable without torch (the recipe schema checks ``audit.attacks`` with them)."""

from __future__ import annotations

__all__ = ["ATTACKS", "ATTACK_ALIASES", "RENAMED_ATTACKS", "check_attack_name"]

#: Attack names accepted by :func:`medtricks.audit.run_audit`.
ATTACKS = ("fgsm", "pgd_linf", "pgd_l2", "apgd_ce", "apgd_square", "square", "transfer")
#: Attack names that no longer exist, with why and what to use instead.
RENAMED_ATTACKS = {
    "autoattack": "'autoattack' was renamed 'apgd_square': medtricks runs APGD-CE (+ APGD-DLR with >= 3 classes) and "
    "Square with the AutoAttack per-image worst case, but not the standard AutoAttack (APGD-T and "
    "FAB-T are left out: ART has no FAB and the targeted DLR loss needs >= 4 classes; Square uses "
    "audit.square_queries, 1000 by default vs 5000 in the standard). Use attacks: [apgd_square]"
}
#: Short names accepted for an attack.
ATTACK_ALIASES = {"pgd": "pgd_linf", "apgd": "apgd_ce"}


def check_attack_name(name: str) -> str:
    """The canonical attack name for ``name`` (aliases resolved); ``ValueError`` naming the choices."""
    key = str(name).strip().lower()
    key = ATTACK_ALIASES.get(key, key)
    if key in RENAMED_ATTACKS:
        raise ValueError(RENAMED_ATTACKS[key])
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}: expected any of {list(ATTACKS)} (or aliases {ATTACK_ALIASES})")
    return key
