"""Score a model on a dataset whose class names differ: map the card's classes onto the model's.

``{"covid": "pneumonia", "pneumonia": "pneumonia", "normal": "normal"}`` evaluates a Kermany
normal-vs-pneumonia model on the ieee8023 card (covid / pneumonia / normal); ``"drop"`` leaves a card
class out on purpose (its images are counted, not scored). A card class that is neither mapped nor a
class of the model is an error naming it -- nothing is scored under a guessed name.

    >>> parse_class_map("covid=pneumonia, normal=normal")
    {'covid': 'pneumonia', 'normal': 'normal'}
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import pandas as pd

from medtricks.errors import ConfigError

__all__ = ["DROP", "parse_class_map", "resolve_class_map", "apply_class_map"]

#: The target that leaves a card class out of the evaluation.
DROP = "drop"


def parse_class_map(text: Optional[str]) -> dict[str, str]:
    """``"a=x,b=y,c=drop"`` -> ``{"a": "x", "b": "y", "c": "drop"}``; ``None`` -> ``{}``. A map with no entry
    (``""``, ``",,,"``) or an empty entry (``"a=x,,b=y"``) is an error: it would score as if none was given."""
    if text is None:
        return {}
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(
            f"--class-map {text!r} maps no class: give CARD_CLASS=MODEL_CLASS pairs separated by "
            f"commas (e.g. covid=pneumonia,normal=normal; covid={DROP} leaves a class out), or leave "
            "--class-map out"
        )
    if not all(parts):
        raise ConfigError(
            f"--class-map {text!r} has an empty entry (two commas in a row, or one at an end): give "
            "CARD_CLASS=MODEL_CLASS pairs separated by single commas"
        )
    out: dict[str, str] = {}
    for part in parts:
        source, sep, target = part.partition("=")
        source, target = source.strip(), target.strip()
        if not sep or not source or not target:
            raise ConfigError(
                f"--class-map: {part!r} is not CARD_CLASS=MODEL_CLASS (e.g. covid=pneumonia, or "
                f"covid={DROP} to leave a class out)"
            )
        if source in out and out[source] != target:
            raise ConfigError(f"--class-map maps {source!r} twice ({out[source]!r} and {target!r})")
        out[source] = target
    return out


def resolve_class_map(
    card_name: str,
    card_classes: Sequence[str],
    model_classes: Sequence[str],
    class_map: Optional[Mapping[str, str]],
    option: Optional[str] = "--class-map",
) -> dict[str, str]:
    """Every card class -> a model class or :data:`DROP`. Without a map the names must match one to one
    (same set); with one, unmapped card classes keep their name if the model has it, else it is an error.
    ``option``: how the calling command takes a map, suggested in the error (None: it takes none)."""
    card_classes, model_classes = list(card_classes), list(model_classes)
    class_map = dict(class_map or {})
    unknown_source = sorted(set(class_map) - set(card_classes))
    if unknown_source:
        raise ConfigError(
            f"class map names {unknown_source}, which card {card_name!r} does not have; its classes are {card_classes}"
        )
    bad_target = sorted({t for t in class_map.values() if t != DROP and t not in model_classes})
    if bad_target:
        raise ConfigError(f"class map targets {bad_target} are not classes of the model {model_classes} (or '{DROP}')")
    if not class_map and set(card_classes) != set(model_classes) and option is None:
        raise ConfigError(
            f"card {card_name!r} has classes {card_classes} but the model was trained on "
            f"{model_classes}; this command scores a card with the model's classes only "
            "(`medtricks evaluate --class-map` scores one whose classes differ)"
        )
    if not class_map and set(card_classes) != set(model_classes):
        example = ",".join(f"{c}={c if c in model_classes else model_classes[-1]}" for c in card_classes)
        raise ConfigError(
            f"card {card_name!r} has classes {card_classes} but the model was trained on "
            f"{model_classes}; map them with --class-map CARD_CLASS=MODEL_CLASS,... (e.g. "
            f"--class-map {example}; '{DROP}' leaves a class out)"
        )
    resolved = {}
    unmapped = []
    for name in card_classes:
        if name in class_map:
            resolved[name] = class_map[name]
        elif name in model_classes:
            resolved[name] = name
        else:
            unmapped.append(name)
    if unmapped:
        raise ConfigError(
            f"card {card_name!r} classes {unmapped} are not mapped to a class of the model "
            f"{model_classes}: add them to --class-map (e.g. {unmapped[0]}={model_classes[-1]}) or "
            f"leave them out on purpose ({unmapped[0]}={DROP})"
        )
    return resolved


def apply_class_map(
    manifest: pd.DataFrame, resolved: Mapping[str, str], model_classes: Sequence[str]
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The manifest with ``label``/``target`` in the model's classes, and the count of images dropped per
    card class (``"drop"``)."""
    labels = manifest["label"].map(dict(resolved))
    dropped = manifest.loc[labels == DROP, "label"].value_counts().to_dict()
    kept = manifest.loc[labels != DROP].copy()
    kept["label"] = labels[labels != DROP]
    kept["target"] = kept["label"].map({c: i for i, c in enumerate(model_classes)}).astype("int64")
    kept.attrs.update(manifest.attrs)
    return kept, {str(k): int(v) for k, v in dropped.items()}
