"""The ``tricks.bn_gamma`` and ``tricks.layerscale_gamma`` sections' rules, checked without a model (and
without torch): one place for the recipe schema (:mod:`medtricks.tricks.keys`) and the functional API
(:mod:`medtricks.gamma.bn`, :mod:`medtricks.gamma.layerscale`). Every error names the key, the value and
what was expected."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from medtricks.errors import ConfigError, ConfigTypeError

__all__ = ["STRATEGIES", "BRANCHES", "GammaPlan", "check_gamma_config", "LayerScalePlan", "check_layerscale_config"]

STRATEGIES: tuple[str, ...] = ("none", "zero_all", "zero_late", "one_late", "zero_late_one_rest", "rules")
_WHICH = ("last", "all")
_SELECTORS = ("stages", "blocks", "last_n_blocks", "names")
_CONFIG_KEYS = ("strategy", *_SELECTORS, "which", "beta", "rules")
_RULE_KEYS = ("value", *_SELECTORS, "which", "beta")
_KEEP = "keep"
#: LayerScale's residual branches: ``attn`` (``ls1`` / ``gamma_1``), ``mlp`` (``ls2`` / ``gamma_2``) or both.
BRANCHES: tuple[str, ...] = ("both", "attn", "mlp")
_LS_SELECTORS = ("blocks", "last_n_blocks", "names")
_LS_CONFIG_KEYS = ("strategy", *_LS_SELECTORS, "branch", "insert", "rules")
_LS_RULE_KEYS = ("value", *_LS_SELECTORS, "branch")
LAYERSCALE_WHERE = "tricks.layerscale_gamma."


# --------------------------------------------------------------------------------------------
# argument parsing (every error names the key, the value and what was expected)
# --------------------------------------------------------------------------------------------
def _bad(where: str, key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{where}{key} = {value!r}: expected {expected}")


def _as_float(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise _bad(where, key, value, "a finite number (0.0 and 1.0 are the usual values)")
    return float(value)


def _as_int_list(value: Any, where: str, key: str) -> list[int] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, numbers.Integral) else value
    if (
        isinstance(items, (str, bytes))
        or not isinstance(items, Sequence)
        or not items
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items)
    ):
        raise _bad(
            where, key, value, "an integer or a non-empty list of integers (negative counts from the end), or null"
        )
    return [int(v) for v in items]


def _as_patterns(value: Any, where: str, key: str) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not items or not all(isinstance(v, str) and v for v in items):
        raise _bad(where, key, value, "a non-empty list of fnmatch patterns such as ['layer4.*.bn3'], or null")
    return list(items)


def _as_last_n(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise _bad(where, "last_n_blocks", value, "a positive integer or null")
    return int(value)


def _as_which(value: Any, where: str) -> str:
    if value not in _WHICH:
        raise _bad(where, "which", value, "'last' (the norm ending each residual branch) or 'all' (every norm on it)")
    return value


def _as_branch(value: Any, where: str) -> str:
    if value not in BRANCHES:
        raise _bad(where, "branch", value, "'both', 'attn' (ls1 / gamma_1) or 'mlp' (ls2 / gamma_2)")
    return value


def _as_beta(value: Any, where: str, key: str = "beta") -> float | str | None:
    """None (strategy default), 'keep', or a finite float."""
    if value is None or value == _KEEP:
        return value
    if isinstance(value, str):
        raise _bad(where, key, value, "a number, 'keep' or null")
    return _as_float(value, where, key)


# --------------------------------------------------------------------------------------------
# the parts every gamma-strategy section shares (tricks.bn_gamma, tricks.layerscale_gamma)
# --------------------------------------------------------------------------------------------
def section_mapping(config: Any, section: str, allowed: Sequence[str]) -> Mapping:
    """The section as a mapping (a recipe's typed section is dumped); unknown keys are an error naming them."""
    if hasattr(config, "model_dump"):
        config = config.model_dump()
    if not isinstance(config, Mapping):
        raise ConfigTypeError(f"{section}: expected a mapping (dict), got {type(config).__name__}")
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ConfigError(f"{section}: unknown keys {unknown}; allowed keys: {', '.join(allowed)}")
    return config


def section_strategy(config: Mapping, where: str) -> tuple[str, Any]:
    """``(strategy, rules)``: the strategy defaults to ``rules`` when rules are given, else ``none``."""
    rules = config.get("rules") or []
    strategy = config.get("strategy") or ("rules" if rules else "none")
    if strategy not in STRATEGIES:
        raise _bad(where, "strategy", strategy, f"one of {', '.join(STRATEGIES)}")
    return strategy, rules


def check_selection(
    section: str, strategy: str, rules: Any, given: list[str], also_set: list[str], *, zero_all_acts_on: str
) -> None:
    """What a strategy may be combined with: rules only with ``rules`` (which takes its selectors inside
    each rule), nothing with ``none`` (``also_set``: other keys that would change something), no
    selectors with ``zero_all``."""
    where = f"{section}."
    if rules and strategy != "rules":
        raise _bad(where, "rules", rules, f"no rules with strategy '{strategy}' (use strategy: rules)")
    if strategy == "none" and (given or also_set):
        raise ConfigError(f"{section}: strategy 'none' changes nothing, but {given + also_set} are set")
    if strategy == "zero_all" and given:
        raise ConfigError(
            f"{section}: strategy 'zero_all' acts on {zero_all_acts_on}, but {given} are set; "
            "use 'zero_late' or 'rules' to select blocks"
        )
    if strategy == "rules" and (given or not rules):
        raise ConfigError(
            f"{section}: strategy 'rules' needs a non-empty 'rules' list and takes its selectors "
            f"inside each rule (got top-level {given or 'no rules'})"
        )


def rule_mappings(rules: Any, where: str, allowed: Sequence[str], value_hint: str):
    """``(rule, its key prefix)`` for every rule of a ``rules`` list, each checked to be a mapping of known
    keys with a ``value``."""
    if not isinstance(rules, Sequence) or isinstance(rules, (str, bytes)):
        raise _bad(where, "rules", rules, "a list of rule mappings")
    for i, rule in enumerate(rules):
        if not isinstance(rule, Mapping):
            raise ConfigError(f"{where}rules[{i}] = {rule!r}: expected a mapping with 'value' and selectors")
        unknown = sorted(set(rule) - set(allowed))
        if unknown:
            raise ConfigError(f"{where}rules[{i}]: unknown keys {unknown}; allowed keys: {', '.join(allowed)}")
        if rule.get("value") is None:
            raise ConfigError(f"{where}rules[{i}].value is missing: expected the gamma value to set, e.g. {value_hint}")
        yield rule, f"{where}rules[{i}]."


def block_selectors(config: Mapping, where: str, *, stages: bool) -> dict:
    """The block selectors of a section or rule, parsed (``stages`` only where the model has stages)."""
    sel = {"stages": _as_int_list(config.get("stages"), where, "stages")} if stages else {}
    sel.update(
        {
            "blocks": _as_int_list(config.get("blocks"), where, "blocks"),
            "last_n_blocks": _as_last_n(config.get("last_n_blocks"), where),
            "names": _as_patterns(config.get("names"), where, "names"),
        }
    )
    return sel


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GammaRule:
    value: float
    selectors: dict
    which: str
    beta: Any
    where: str


@dataclass(frozen=True)
class GammaPlan:
    """A checked ``tricks.bn_gamma`` section: what :func:`apply_gamma_strategy` will do (no model needed)."""

    strategy: str
    selectors: dict
    which: str
    beta: Any
    rules: tuple = ()
    where: str = "tricks.bn_gamma."


def check_gamma_config(config: Any) -> GammaPlan:
    """Check a ``tricks.bn_gamma`` section (a mapping, or the recipe's typed section) without a model.

    The one place the section's rules live: the recipe validates with it, and
    :func:`apply_gamma_strategy` applies what it returns. Raises ``ValueError`` naming the key.
    """
    where = "tricks.bn_gamma."
    config = section_mapping(config, "tricks.bn_gamma", _CONFIG_KEYS)
    strategy, rules = section_strategy(config, where)
    sel = block_selectors(config, where, stages=True)
    which = _as_which(config.get("which") or "last", where)
    beta = _as_beta(config.get("beta"), where)
    given = [k for k, v in sel.items() if v is not None]
    check_selection(
        "tricks.bn_gamma",
        strategy,
        rules,
        given,
        ["beta"] if beta is not None else [],
        zero_all_acts_on="every residual block",
    )
    parsed = []
    if strategy == "rules":
        for rule, rwhere in rule_mappings(rules, where, _RULE_KEYS, "0.0 or 1.0"):
            rule_beta = _as_beta(rule.get("beta"), rwhere)
            parsed.append(
                _GammaRule(
                    value=_as_float(rule["value"], rwhere, "value"),
                    selectors=block_selectors(rule, rwhere, stages=True),
                    which=_as_which(rule.get("which") or which, rwhere),
                    beta=beta if rule_beta is None else rule_beta,  # fall back to the section's beta
                    where=rwhere,
                )
            )
    return GammaPlan(strategy=strategy, selectors=sel, which=which, beta=beta, rules=tuple(parsed), where=where)


@dataclass(frozen=True)
class _LayerScaleRule:
    value: float
    selectors: dict
    branch: str
    where: str


@dataclass(frozen=True)
class LayerScalePlan:
    """A checked ``tricks.layerscale_gamma`` section (no model needed)."""

    strategy: str
    selectors: dict
    branch: str
    insert: bool
    rules: tuple = ()


def check_layerscale_config(config: Any) -> LayerScalePlan:
    """Check a ``tricks.layerscale_gamma`` section (a mapping or the recipe's typed section) without a
    model; raises ``ValueError`` naming the key. Keys: ``strategy`` (one of :data:`STRATEGIES`),
    ``blocks``, ``last_n_blocks``, ``names``, ``branch``, ``insert`` and ``rules`` (a list of dicts
    with ``value`` and the same selectors, applied in order)."""
    where = LAYERSCALE_WHERE
    config = section_mapping(config, "tricks.layerscale_gamma", _LS_CONFIG_KEYS)
    strategy, rules = section_strategy(config, where)
    sel = block_selectors(config, where, stages=False)
    branch = _as_branch(config.get("branch") or "both", where)
    insert = config.get("insert", False)
    if not isinstance(insert, bool):
        raise _bad(where, "insert", insert, "true or false")
    given = [k for k, v in sel.items() if v is not None]
    check_selection(
        "tricks.layerscale_gamma", strategy, rules, given, ["insert"] if insert else [], zero_all_acts_on="every block"
    )
    parsed = []
    if strategy == "rules":
        for rule, rwhere in rule_mappings(rules, where, _LS_RULE_KEYS, "0.0"):
            parsed.append(
                _LayerScaleRule(
                    value=_as_float(rule["value"], rwhere, "value"),
                    selectors=block_selectors(rule, rwhere, stages=False),
                    branch=_as_branch(rule.get("branch") or branch, rwhere),
                    where=rwhere,
                )
            )
    return LayerScalePlan(strategy=strategy, selectors=sel, branch=branch, insert=insert, rules=tuple(parsed))
