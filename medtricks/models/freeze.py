"""Freeze parts of a backbone for linear probing or partial fine-tuning.

Frozen parameters get ``requires_grad=False`` and every BatchNorm inside a frozen module is
converted to timm's ``FrozenBatchNorm2d`` (``timm.utils.freeze``): it always normalizes with its
stored running statistics, never updates them, and its affine terms become buffers, so a frozen
layer behaves exactly as in eval mode even while the model trains. Call this after
``create_model`` (and after BN-gamma initialisation) and before building the optimizer/EMA, since
it replaces BN modules.

Example::

    >>> from medtricks.models import create_model, freeze_model
    >>> model = create_model("resnet18", num_classes=2)
    >>> frozen = freeze_model(model, "all_but_head")        # linear probe
    >>> [n for n, p in model.named_parameters() if p.requires_grad]
    ['fc.weight', 'fc.bias']
"""

from __future__ import annotations

import fnmatch
from typing import Optional, Sequence, Union

from torch import nn

from medtricks.errors import ConfigError
from medtricks.models.layout import find_backbone, stage_of_parameter

__all__ = ["freeze_model", "FREEZE_KEYWORDS"]

FREEZE_KEYWORDS = ("none", "stem", "all_but_head")

FreezeSpec = Optional[Union[str, int, Sequence[Union[int, str]]]]


def _as_items(freeze: FreezeSpec) -> list[Union[int, str]]:
    if freeze is None:
        return []
    if isinstance(freeze, (str, int)) and not isinstance(freeze, bool):
        return [freeze]
    if isinstance(freeze, (list, tuple)):
        return list(freeze)
    raise ConfigError(
        f"model.freeze must be null, {', '.join(map(repr, FREEZE_KEYWORDS))}, or a list "
        f"of stage indices / module-name patterns, got {freeze!r}"
    )


def _params_of_patterns(model: nn.Module, pattern: str) -> set[str]:
    matched = [name for name, _ in model.named_modules() if name and fnmatch.fnmatchcase(name, pattern)]
    if not matched:
        top = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(
            f"model.freeze pattern {pattern!r} matches no module; module names look like "
            f"{top} (and dotted children such as layer1.0.conv1; fnmatch wildcards allowed)"
        )
    names = set()
    for module_name in matched:
        names |= {f"{module_name}.{p}" for p, _ in model.get_submodule(module_name).named_parameters()}
    return names


def _selected(model: nn.Module, freeze: FreezeSpec) -> set[str]:
    items = _as_items(freeze)
    if not items or items == ["none"]:
        return set()
    prefix, _ = find_backbone(model)
    dot = f"{prefix}." if prefix else ""
    stages = {n: s for n, s in stage_of_parameter(model).items() if n.startswith(dot)}
    head = max(stages.values())
    selected: set[str] = set()
    for item in items:
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        if isinstance(item, bool):
            raise ConfigError(f"model.freeze: {item!r} is not a stage index or pattern")
        if isinstance(item, int):
            if not 0 <= item <= head:
                raise ConfigError(
                    f"model.freeze stage {item} out of range: this model has stages 0 (stem) to {head} (head)"
                )
            selected |= {n for n, s in stages.items() if s == item}
        elif item == "stem":
            selected |= {n for n, s in stages.items() if s == 0}
        elif item == "all_but_head":
            selected |= {n for n, s in stages.items() if s != head}
        elif item == "none":
            raise ConfigError("model.freeze: 'none' cannot be combined with other entries")
        elif isinstance(item, str):
            selected |= _params_of_patterns(model, item)
        else:
            raise ConfigError(
                f"model.freeze entry {item!r}: expected a stage index, "
                f"{', '.join(map(repr, FREEZE_KEYWORDS))} or a module-name pattern"
            )
    return selected


def freeze_model(model: nn.Module, freeze: FreezeSpec) -> list[str]:
    """Freeze parameters of ``model`` in place and return their names (in model order).

    Args:
        model: a model from :func:`medtricks.models.create_model` (or a wrapper holding one).
        freeze: ``None``/``"none"`` (nothing), ``"stem"`` (stage 0), ``"all_but_head"`` (all of the
            backbone except its classifier: a linear probe), or a list mixing stage indices (as in
            :func:`medtricks.models.stage_of_parameter`: 0 = stem, 1.. = stages) and fnmatch
            patterns on module names (``"layer1*"``, ``"backbone.conv1"``). Keywords and stages
            refer to the backbone only (a resizer in front stays trainable).

    Returns:
        Names of the frozen parameters as they were before freezing (BN affine terms among them
        become buffers of ``FrozenBatchNorm2d``).
    """
    from timm.utils.model import freeze as timm_freeze

    selected = _selected(model, freeze)
    if not selected:
        return []
    order = [name for name, _ in model.named_parameters() if name in selected]
    # Freeze whole modules where possible (so their BN layers are converted too): the outermost
    # modules whose parameters are all selected.
    whole: list[str] = []
    covered: set[str] = set()
    if set(order) == {name for name, _ in model.named_parameters()}:
        whole, covered = [""], set(order)
    else:
        for name, module in model.named_modules():
            if not name or any(name.startswith(w + ".") for w in whole):
                continue
            params = {f"{name}.{p}" for p, _ in module.named_parameters()}
            if params and params <= selected:
                whole.append(name)
                covered |= params
    if whole == [""]:
        timm_freeze(model)
    elif whole:
        timm_freeze(model, whole)
    params = dict(model.named_parameters())
    for name in selected - covered:  # parts of partially selected modules
        params[name].requires_grad_(False)
    return order
