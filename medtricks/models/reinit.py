"""Re-initialise parts of a built model the way timm initialises them, from a seed of their own.

Two users:

* ``tricks.reinit_late`` (Transfusion-style partial reuse, Raghu et al. 2019): forget the pretrained
  weights of the last stages after the load (:func:`reinit_modules`);
* common random numbers in ablations: the new classifier head is drawn from a generator derived from
  ``experiment.seed`` alone (:func:`init_new_head`), so every variant of one seed starts from the same
  head whatever the tricks built or drew before it.

The initialisation per family (what timm's model constructor does, applied to the chosen modules only):

* timm ResNet family (ResNet, ResNet-D, SE-ResNet, ResNeXt: ``timm.models.resnet.ResNet``): each module's
  own ``reset_parameters()`` (BatchNorm: γ=1, β=0, running stats reset; Linear: PyTorch default), then
  ``ResNet.init_weights``' rule: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` on every Conv2d;
  the blocks' ``zero_init_last()`` only when asked (timm's default for training from scratch).
* timm EfficientNet / MobileNet family (``EfficientNet``, ``MobileNetV3``...):
  ``timm.models._efficientnet_builder.efficientnet_init_weights`` (``_init_weight_goog``: Conv2d
  normal(0, √(2/fan_out)), BN γ=1 β=0, Linear uniform ±1/√fan_out) plus BN running stats reset
  (``_init_weight_goog`` leaves those alone; a fresh model has mean 0, var 1).
* anything else: each module's ``reset_parameters()`` / ``reset_running_stats()`` (PyTorch defaults).

Every draw happens inside ``torch.random.fork_rng`` seeded from :func:`derive_seed`, so the global RNG
stream is left as it was and the same seed gives the same weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn

from medtricks.models.layout import classifier_names, find_backbone

__all__ = ["derive_seed", "init_family", "reinit_modules", "init_new_head"]


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose (``"head"``, ``"reinit_late"``...) derived from ``seed``: independent streams.

    >>> derive_seed(0, "head") == derive_seed(0, "head") != derive_seed(0, "reinit_late")
    True
    """
    import numpy as np

    state = np.random.SeedSequence([int(seed) % (2**32), zlib.crc32(purpose.encode())]).generate_state(1, np.uint64)
    return int(state[0] >> 1)  # torch.manual_seed takes < 2**63


def init_family(model: nn.Module) -> str:
    """``"resnet"``, ``"efficientnet"`` or ``"torch_default"``: which initialisation :func:`reinit_modules` uses."""
    _, backbone = find_backbone(model) if _has_backbone(model) else ("", model)
    names = {f"{c.__module__}.{c.__name__}" for c in type(backbone).__mro__}
    if "timm.models.resnet.ResNet" in names:
        return "resnet"
    if names & {"timm.models.efficientnet.EfficientNet", "timm.models.mobilenetv3.MobileNetV3"}:
        return "efficientnet"
    return "torch_default"


def _has_backbone(model: nn.Module) -> bool:
    return any(hasattr(m, "medtricks_info") or hasattr(m, "group_matcher") for m in model.modules())


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif hasattr(m, "reset_running_stats"):
            m.reset_running_stats()


def _init(module: nn.Module, family: str, zero_init_last: bool) -> None:
    if family == "resnet":
        _reset(module)
        for m in module.modules():  # timm ResNet.init_weights
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in module.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()
    elif family == "efficientnet":
        from timm.models._efficientnet_builder import efficientnet_init_weights

        efficientnet_init_weights(module)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    else:
        _reset(module)


def reinit_modules(
    model: nn.Module, names: Iterable[str], *, seed: int, family: Optional[str] = None, zero_init_last: bool = False
) -> str:
    """Re-initialise the named submodules of ``model`` in place (see the module docstring); returns the family.

    ``seed`` is used as given (derive it with :func:`derive_seed` for a purpose of its own).
    """
    family = family or init_family(model)
    modules = [(name, model.get_submodule(name)) for name in names]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        with torch.no_grad():
            for _, module in modules:
                _init(module, family, zero_init_last)
    return family


def init_new_head(model: nn.Module, seed: int) -> list[str]:
    """Draw a newly made classifier head from ``derive_seed(seed, "head")`` (common random numbers).

    Only when the model's head is new (``medtricks_info["head"]`` is ``"new"`` or ``"random"``); a
    pretrained head that already fits is left alone. Returns the qualified names re-drawn.

    The head keeps the distribution it was built with: a head made after a pretrained load (``"new"``) is
    what timm's ``reset_classifier`` makes, a plain ``nn.Linear`` with PyTorch's default init (weight std
    ≈ 1/√(3·fan_in)); a model without pretrained weights (``"random"``) gets its family's constructor init.
    (EfficientNet's constructor init, uniform ±1/√fan_out, is ~20x wider for a 3-class head on 1280
    features: on top of pretrained features it blows the first logits up.)
    """
    prefix, backbone = find_backbone(model)
    info = getattr(backbone, "medtricks_info", {})
    if info.get("head") not in ("new", "random"):
        return []
    dot = f"{prefix}." if prefix else ""
    names = [f"{dot}{c}" for c in classifier_names(backbone, info.get("name", ""))]
    names = [n for n in names if any(True for _ in model.get_submodule(n).parameters())]
    if names:
        family = init_family(model) if info.get("head") == "random" else "torch_default"
        reinit_modules(model, names, seed=derive_seed(seed, "head"), family=family)
    return names
