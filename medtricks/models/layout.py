"""Where things sit in a built model: the backbone, its input conv(s), classifier and stages.

Shared by the model factory (:mod:`medtricks.models.backbones`), freezing
(:mod:`medtricks.models.freeze`) and attention insertion (:mod:`medtricks.models.tweaks`); depends
only on :mod:`medtricks.models.model_names`, so none of those modules import each other for it.

Example::

    >>> from medtricks.models import create_model
    >>> from medtricks.models.layout import stage_of_parameter
    >>> stage_of_parameter(create_model("resnet18"))["layer4.1.bn2.weight"]
    4
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medtricks.errors import ConfigError
from medtricks.models.model_names import MONAI_ARCHS

__all__ = ["find_backbone", "stage_of_parameter", "first_convs", "classifier_names"]


def first_convs(model: nn.Module, name: str) -> tuple[str, ...]:
    """Module names of the input convolution(s) of model ``name`` (timm's ``pretrained_cfg``)."""
    if name.startswith("monai:"):
        return (MONAI_ARCHS[name]["first_conv"],)
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if not first:
        return ()
    return (first,) if isinstance(first, str) else tuple(first)


def classifier_names(model: nn.Module, name: str) -> tuple[str, ...]:
    """Module names of the classifier head(s) of model ``name`` (timm's ``pretrained_cfg``)."""
    if name.startswith("monai:"):
        return (MONAI_ARCHS[name]["classifier"],)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not classifier:
        return ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def find_backbone(model: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, module)`` of the backbone inside ``model``: the first module carrying
    ``medtricks_info`` (or a timm ``group_matcher``); ``("", model)`` for a bare backbone.

    Wrappers such as ``ResizerModel`` (``resizer.*`` + ``backbone.*``) are looked through.
    """
    for prefix, module in model.named_modules():
        if hasattr(module, "medtricks_info"):
            return prefix, module
    for prefix, module in model.named_modules():
        if hasattr(module, "group_matcher"):
            return prefix, module
    raise ConfigError(
        f"{type(model).__name__} holds no medtricks/timm backbone; build it with medtricks.models.create_model"
    )


def _matcher(prefix: str, backbone: nn.Module) -> Any:
    name = getattr(backbone, "medtricks_info", {}).get("name", "")
    if name.startswith("monai:"):
        return MONAI_ARCHS[name]["matcher"]
    if hasattr(backbone, "group_matcher"):
        return backbone.group_matcher(coarse=True)
    raise ConfigError(f"no stage layout known for {type(backbone).__name__} at {prefix or 'the root'!r}")


def stage_of_parameter(model: nn.Module, *, coarse: bool = True) -> dict[str, int]:
    """Stage index of every parameter: 0 = stem, last = classifier head.

    Stages come from timm's ``group_matcher(coarse=True)`` (ResNet: stem, layer1..4, head;
    EfficientNet: stem, blocks.0..6 (+conv_head), head), or medtricks' matchers for MONAI nets.
    The classifier always gets its own last stage. Parameters outside the backbone (e.g. a
    learnable resizer in front of it) are stage 0. ``coarse=False`` gives per-block stages
    (timm's layer-decay granularity). Frozen BN layers hold buffers, not parameters, and are absent.

    Example: ``stage_of_parameter(create_model("resnet18"))["layer4.1.bn2.weight"]`` → ``4``.
    """
    # timm takes seconds to import; this module is imported by freeze/tweaks, which do not need it.
    from timm.models import group_parameters

    prefix, backbone = find_backbone(model)
    if coarse or not hasattr(backbone, "group_matcher"):
        matcher = _matcher(prefix, backbone)  # MONAI nets: always by stage
    else:
        matcher = backbone.group_matcher(coarse=False)
    groups = group_parameters(backbone, matcher, reverse=True)
    name = getattr(backbone, "medtricks_info", {}).get("name", "")
    classifiers = classifier_names(backbone, name)
    head = {n for n in groups for c in classifiers if n == c or n.startswith(c + ".")}
    body = {n: s for n, s in groups.items() if n not in head}
    # Renumber body stages contiguously from 0, then put the head last.
    order = {s: i for i, s in enumerate(sorted(set(body.values())))}
    stages = {n: order[s] for n, s in body.items()}
    head_stage = len(order)
    stages.update({n: head_stage for n in head})
    full = {}
    dot = f"{prefix}." if prefix else ""
    for pname, _ in model.named_parameters():
        inner = pname[len(dot) :] if dot and pname.startswith(dot) else (pname if not dot else None)
        full[pname] = stages[inner] if inner is not None and inner in stages else 0
    return full
