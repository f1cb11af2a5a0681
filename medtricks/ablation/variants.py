"""Ablation variants: a base recipe plus tricks, as named lists of ``--set`` overrides.

A *trick spec* is a short name (``warmup``, ``bn_gamma=zero_late``, ``mixup=0.2`` ...) or any raw
``section.key=value`` override. :func:`make_variants` turns a list of them into the variants of an
ablation table:

* ``cumulative``: the baseline, then each trick added on top of the previous row (the paper's table);
* ``one_at_a_time``: the baseline, then each trick alone against the baseline;
* ``grid``: every combination. Tricks that set the same recipe key (``bn_gamma=zero_late`` and
  ``bn_gamma=zero_all``) are alternative levels of one factor, never switched on together.

A *bundle* joins specs with ``+`` (``warmup+cosine+label_smoothing=0.1``) into one step of the table:
"the bag of tricks" as one row instead of four, which saves a full set of seeded trainings per trick.

Example::

    >>> from medtricks.recipe import Recipe
    >>> make_variants(Recipe(), ["warmup", "label_smoothing=0.1"])  # doctest: +NORMALIZE_WHITESPACE
    [('baseline', []), ('+warmup', ['schedule.warmup_epochs=1']),
     ('+warmup +label_smoothing=0.1', ['schedule.warmup_epochs=1', 'tricks.label_smoothing=0.1'])]
"""

from __future__ import annotations

import itertools
import re

from medtricks.errors import ConfigError
from medtricks.recipe import Recipe, apply_overrides, recipe_from_dict
from medtricks.tricks.registry import ablation_names

__all__ = ["TRICKS", "MODES", "trick_overrides", "make_variants", "variant_recipe"]  # noqa: F822 - TRICKS via __getattr__

MODES = ("cumulative", "one_at_a_time", "grid")
# A grid of k on/off tricks has 2**k variants, each trained for every seed: keep it small.
MAX_GRID_VARIANTS = 32


def __getattr__(name: str):
    # TRICKS is read from the trick registry each time, so plug-ins registered later are included.
    if name == "TRICKS":
        return ablation_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trick_overrides(spec: str) -> list[str]:
    """The ``--set`` overrides of one trick spec.

    >>> trick_overrides("bn_gamma=zero_late")
    ['tricks.bn_gamma.strategy=zero_late']
    >>> trick_overrides("optim.lr=0.05")
    ['optim.lr=0.05']
    >>> trick_overrides("warmup+label_smoothing=0.1")  # a bundle: one step, several tricks
    ['schedule.warmup_epochs=1', 'tricks.label_smoothing=0.1']
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"trick spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    # Split a bundle on '+' before a name only, so a value such as 1e+3 stays whole.
    parts = [p.strip() for p in _BUNDLE_SPLIT.split(spec)]
    if len(parts) > 1:
        if any(not p for p in parts):
            raise ConfigError(f"trick bundle {spec!r} has an empty member; join specs as a+b+c")
        per_part = [_single_trick_overrides(p) for p in parts]
        keys = [k for overrides in per_part for k in _override_keys(overrides)]
        clashes = sorted({k for k in keys if keys.count(k) > 1})
        if clashes:
            raise ConfigError(
                f"trick bundle {spec!r} sets {clashes} twice; a bundle's members must touch different keys"
            )
        return _combine(per_part)
    return _single_trick_overrides(spec)


_BUNDLE_SPLIT = re.compile(r"\+(?=\s*[A-Za-z_])")


def _single_trick_overrides(spec: str) -> list[str]:
    name, sep, value = spec.partition("=")
    name, value = name.strip(), value.strip()
    tricks = ablation_names()
    if name in tricks:
        trick = tricks[name]
        if sep and not value:
            raise ConfigError(f"trick {spec!r}: empty value after '='")
        if not sep:
            if trick.default is None:
                raise ConfigError(f"trick {spec!r} needs a value: {name}=VALUE ({trick.help})")
            value = trick.default
        return [f"{trick.key}={value}"]
    if sep and "." in name:  # a raw recipe override: validated when the variant recipe is built
        return [f"{name}={value}"]
    known = ", ".join(sorted(tricks))
    raise ConfigError(
        f"unknown trick {spec!r}: expected one of {known} (optionally NAME=VALUE), "
        "or a raw recipe override section.key=value (e.g. optim.lr=0.05)"
    )


def _override_keys(overrides: list[str]) -> set[str]:
    return {item.split("=", 1)[0] for item in overrides}


def variant_recipe(base: Recipe, overrides: list[str], *, name: str = "variant") -> Recipe:
    """``base`` with ``overrides`` applied, validated (errors name the variant and the key)."""
    data = apply_overrides(base.model_dump(mode="json"), overrides)
    return recipe_from_dict(data, source=f"ablation variant {name!r} (overrides {overrides})")


def _combine(overrides_lists: list[list[str]]) -> list[str]:
    """Concatenate override lists; a later value for the same key replaces the earlier one."""
    merged: dict[str, str] = {}
    for overrides in overrides_lists:
        for item in overrides:
            key = item.split("=", 1)[0]
            merged.pop(key, None)  # re-insert so the order shows the latest trick last
            merged[key] = item
    return list(merged.values())


def _grid_factors(specs: list[str], per_trick: list[list[str]]) -> list[list[int]]:
    """Group tricks that touch the same recipe keys into one factor (alternative levels)."""
    factors: list[tuple[set[str], list[int]]] = []
    for i, overrides in enumerate(per_trick):
        keys = _override_keys(overrides)
        touching = [f for f in factors if f[0] & keys]
        if not touching:
            factors.append((set(keys), [i]))
            continue
        first = touching[0]
        for other in touching[1:]:  # a trick that bridges two factors merges them
            first[0].update(other[0])
            first[1].extend(other[1])
            factors.remove(other)
        first[0].update(keys)
        first[1].append(i)
    return [sorted(members) for _, members in factors]


def make_variants(base: Recipe, tricks: list[str], mode: str = "cumulative") -> list[tuple[str, list[str]]]:
    """The variants of an ablation as ``(name, overrides)`` pairs; the first is ``("baseline", [])``.

    Every variant is validated against ``base`` (a bad value fails here, before any training), and
    a variant whose recipe equals an earlier one (a trick the base recipe already has) is an error:
    it would spend compute to show a difference of zero.

    Args:
        base: the resolved baseline recipe.
        tricks: trick specs (the ``ablation`` names of the registered tricks, see
            :func:`medtricks.tricks.registry.ablation_names`), or raw ``section.key=value`` overrides.
        mode: ``cumulative`` | ``one_at_a_time`` | ``grid``.
    """
    if mode not in MODES:
        raise ConfigError(f"ablation mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(tricks, str):
        tricks = [t for t in tricks.split(",") if t.strip()]
    specs = [str(t).strip() for t in tricks]
    if not specs:
        raise ConfigError("an ablation needs at least one trick, e.g. --tricks warmup,bn_gamma=zero_late")
    dupes = sorted({s for s in specs if specs.count(s) > 1})
    if dupes:
        raise ConfigError(f"trick(s) listed more than once: {dupes}")
    per_trick = [trick_overrides(s) for s in specs]

    variants: list[tuple[str, list[str]]] = [("baseline", [])]
    if mode == "cumulative":
        for i in range(len(specs)):
            name = " ".join(f"+{s}" for s in specs[: i + 1])
            variants.append((name, _combine(per_trick[: i + 1])))
    elif mode == "one_at_a_time":
        variants.extend((f"+{s}", list(o)) for s, o in zip(specs, per_trick))
    else:
        factors = _grid_factors(specs, per_trick)
        n_variants = 1
        for members in factors:
            n_variants *= len(members) + 1
        if n_variants > MAX_GRID_VARIANTS:
            raise ConfigError(
                f"grid of {len(specs)} tricks gives {n_variants} variants (more than "
                f"{MAX_GRID_VARIANTS}); use mode cumulative or one_at_a_time, or fewer tricks"
            )
        # Each factor is off (None) or one of its tricks; the all-off combination is the baseline.
        combos = [
            sorted(i for i in choice if i is not None)
            for choice in itertools.product(*[[None, *members] for members in factors])
        ]
        # Baseline, then single tricks, then pairs ... (each in the order the tricks were given).
        for chosen in sorted((c for c in combos if c), key=lambda c: (len(c), c)):
            variants.append((" ".join(f"+{specs[i]}" for i in chosen), _combine([per_trick[i] for i in chosen])))

    # Validate every variant and refuse duplicates (a no-op trick).
    seen: dict[str, str] = {}
    for name, overrides in variants:
        recipe = variant_recipe(base, overrides, name=name)
        key = recipe.model_dump_json()
        if key in seen:
            raise ConfigError(
                f"ablation variant {name!r} (overrides {overrides}) trains exactly the same recipe as "
                f"{seen[key]!r}: the base recipe already has that trick. Start from a recipe without it "
                "(e.g. recipes/paper_baseline.yaml) or switch it off with --set"
            )
        seen[key] = name
    return variants
