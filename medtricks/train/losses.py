"""Losses: label smoothing, and mixup/cutmix with soft targets (timm)."""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

from torch import nn

from medtricks.errors import ConfigError

__all__ = ["build_loss", "build_mixup", "MixupLesionWarning"]


class MixupLesionWarning(UserWarning):
    """Mixup/CutMix can paste away or blend out small lesions on chest X-rays."""


def build_mixup(*, mixup_alpha: float, cutmix_alpha: float, prob: float, label_smoothing: float, num_classes: int):
    """timm's ``Mixup`` when mixup or cutmix is on, else None (warns: lesions can be erased)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    warnings.warn(
        "mixup/cutmix is on: on chest X-rays they can blend out or cut away small "
        "lesions, so a mixed image may no longer show its label's finding",
        MixupLesionWarning,
        stacklevel=2,
    )
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def build_loss(
    *,
    label_smoothing: float = 0.0,
    mixup: Optional[object] = None,
    soft_targets: bool = False,
    class_weights: Optional[Sequence[float]] = None,
) -> nn.Module:
    """Training loss: soft-target CE under mixup (``soft_targets``, or a ``mixup`` object; smoothing is
    folded into its targets), else CE (with per-class ``class_weights`` when given:
    ``tricks.class_balance: loss``)."""
    if soft_targets or mixup is not None:
        if class_weights is not None:
            raise ConfigError(
                "tricks.class_balance: loss cannot be combined with mixup/cutmix (timm's soft-target "
                "loss takes no class weights); use tricks.class_balance: sampler instead"
            )
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    weight = None
    if class_weights is not None:
        import torch

        weight = torch.as_tensor(list(class_weights), dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
