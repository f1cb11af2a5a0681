"""``run_audit``'s arguments, checked into one :class:`AuditPlan` that the sweep and the scoring read.

Every bad value is a :class:`~medtricks.errors.ConfigError` naming the argument and what is allowed;
the checks run in the order of ``run_audit``'s signature, before any image is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from torch import nn

from medtricks.audit.adversarial import _check_mean_std
from medtricks.audit.attack_names import ATTACK_ALIASES as _ALIASES
from medtricks.audit.attack_names import ATTACKS, RENAMED_ATTACKS
from medtricks.audit.corruptions import CORRUPTION_PARAMS, list_corruptions
from medtricks.audit.report import safe_name
from medtricks.errors import ConfigError

__all__ = ["AuditPlan", "plan_audit"]


@dataclass(frozen=True)
class AuditPlan:
    """What one audit does, checked: handed unchanged from ``run_audit`` to the sweep and the scoring."""

    names: list[str]  # class names, logit order
    attacks: list[str]  # canonical attack names
    labels: dict[str, str]  # attack -> its report label (``<attack>_to_<class>`` when targeted)
    eps: list[float]  # sorted budgets; empty without attacks
    pgd_steps: int
    corruptions: list[str]
    severities: list[int]  # sorted; empty without corruptions
    target: Optional[int]  # class index of a targeted audit
    seed: int
    square_queries: int
    masking: bool  # run the gradient-masking probes
    n: Optional[int]  # images to audit (None = all)
    n_bootstrap: int
    mean: list[float]
    std: list[float]


def plan_audit(
    *,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    attacks: Union[str, Sequence[str]],
    eps: Sequence[float],
    pgd_steps: int,
    corruptions: Union[str, Sequence[str]],
    severities: Sequence[int],
    n: Optional[int],
    surrogate: Optional[nn.Module],
    target_class: Optional[Union[int, str]],
    seed: int,
    n_bootstrap: int,
    square_queries: int,
    masking: bool,
) -> AuditPlan:
    """Check ``run_audit``'s arguments (see its docstring) and resolve them into an :class:`AuditPlan`."""
    names = _check_classes(classes)
    attack_list = _check_attacks(attacks, surrogate)
    eps_list = _check_eps(eps)
    corruption_list = _check_corruptions(corruptions)
    severity_list = _check_severities(severities)
    if not attack_list:
        eps_list = []
    if not corruption_list:
        severity_list = []
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ConfigError(f"pgd_steps must be an integer >= 1, got {pgd_steps!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
        raise ConfigError(f"n must be an integer >= 1 (images to audit) or None for all, got {n!r}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    if isinstance(square_queries, bool) or not isinstance(square_queries, (int, np.integer)) or square_queries < 1:
        raise ConfigError(f"square_queries must be an integer >= 1, got {square_queries!r}")
    target = _check_target(target_class, names)
    mean_l, std_l = _check_mean_std(mean, std)
    labels = {a: (a if target is None else f"{a}_to_{safe_name(names[target])}") for a in attack_list}
    return AuditPlan(
        names=names,
        attacks=attack_list,
        labels=labels,
        eps=eps_list,
        pgd_steps=pgd_steps,
        corruptions=corruption_list,
        severities=severity_list,
        target=target,
        seed=seed,
        square_queries=int(square_queries),
        masking=bool(masking) and target is None and "pgd_linf" in attack_list and any(e > 0 for e in eps_list),
        n=n,
        n_bootstrap=n_bootstrap,
        mean=mean_l,
        std=std_l,
    )


def _as_names(value: Union[str, Sequence[str]], what: str) -> list[str]:
    if isinstance(value, str):  # "a,b" or "none" (the CLI's way to say: no attacks / no corruptions)
        value = [] if value.strip().lower() == "none" else [v for v in (s.strip() for s in value.split(",")) if v]
    try:
        return [str(v).strip().lower() for v in value]
    except TypeError as err:
        raise ConfigError(f"{what} must be a list of names or a comma-separated string, got {value!r}") from err


def _check_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str) or not isinstance(classes, Sequence) or len(classes) < 2:
        raise ConfigError(f"classes must be a list of >= 2 class names (logit order), got {classes!r}")
    names = [str(c) for c in classes]
    safe = [safe_name(c) for c in names]
    if len(set(safe)) != len(safe):
        raise ConfigError(f"class names {names} are not unique once made MLflow-safe ({safe}); rename the classes")
    return names


def _check_attacks(attacks: Union[str, Sequence[str]], surrogate: Optional[nn.Module]) -> list[str]:
    out = []
    for name in _as_names(attacks, "attacks"):
        name = _ALIASES.get(name, name)
        if name in RENAMED_ATTACKS:
            raise ConfigError(RENAMED_ATTACKS[name])
        if name not in ATTACKS:
            raise ConfigError(f"unknown attack {name!r}: expected any of {list(ATTACKS)} (or aliases {_ALIASES})")
        if name in out:
            raise ConfigError(f"attack {name!r} is listed twice in attacks={attacks!r}")
        out.append(name)
    if "transfer" in out and surrogate is None:
        raise ConfigError("attack 'transfer' needs a surrogate model (surrogate=..., e.g. another run's checkpoint)")
    if "transfer" in out and not isinstance(surrogate, nn.Module):
        raise ConfigError(
            f"surrogate must be a torch.nn.Module taking normalized images, got {type(surrogate).__name__}"
        )
    return out


def _check_eps(eps: Sequence[float]) -> list[float]:
    if isinstance(eps, (int, float)):
        eps = [eps]
    values = []
    for e in eps:
        if (
            isinstance(e, bool)
            or not isinstance(e, (int, float, np.floating, np.integer))
            or not (0.0 <= float(e) <= 1.0)
        ):
            raise ConfigError(
                f"eps values must be numbers in [0, 1] (pixel intensity; 4/255 = 0.0157), got {e!r} in {list(eps)}"
            )
        values.append(float(e))
    if not values:
        raise ConfigError("eps is empty: give at least one budget, e.g. eps=(0, 1/255, 4/255)")
    labels = [f"{e:.4f}" for e in values]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ConfigError(f"eps values {values} collide in the 4-decimal metric keys ({dupes}); use distinct budgets")
    return sorted(values)


def _check_corruptions(corruptions: Union[str, Sequence[str]]) -> list[str]:
    names = _as_names(corruptions, "corruptions")
    if "all" in names:
        return list_corruptions()
    unknown = [c for c in names if c not in CORRUPTION_PARAMS]
    if unknown:
        raise ConfigError(f"unknown corruption(s) {unknown}: expected 'all' or any of {list_corruptions()}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a corruption is listed twice in corruptions={corruptions!r}")
    return names


def _check_severities(severities: Sequence[int]) -> list[int]:
    values = list(severities) if not isinstance(severities, int) else [severities]
    bad = [s for s in values if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= 5]
    if bad or not values or len(set(values)) != len(values):
        raise ConfigError(f"severities must be distinct integers 0..5 (0 = identity), got {severities!r}")
    return sorted(int(s) for s in values)


def _check_target(target_class: Optional[Union[int, str]], names: list[str]) -> Optional[int]:
    if target_class is None:
        return None
    if isinstance(target_class, str):
        if target_class not in names:
            raise ConfigError(f"target_class {target_class!r} is not a class: expected an index or one of {names}")
        return names.index(target_class)
    if (
        isinstance(target_class, bool)
        or not isinstance(target_class, (int, np.integer))
        or not 0 <= target_class < len(names)
    ):
        raise ConfigError(
            f"target_class must be None or a class index 0..{len(names) - 1} ({names}), got {target_class!r}"
        )
    return int(target_class)
