"""Losses: label smoothing, and mixup/cutmix with soft targets (timm)."""
from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

__all__ = ["build_loss", "build_mixup", "MixupLesionWarning"]


class MixupLesionWarning(UserWarning):
    """Mixup/CutMix can paste away or blend out small lesions on chest X-rays."""


def build_mixup(*, mixup_alpha: float, cutmix_alpha: float, prob: float, label_smoothing: float,
                num_classes: int):
    """timm's ``Mixup`` when mixup or cutmix is on, else None (warns: lesions can be erased)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    warnings.warn("mixup/cutmix is on: on chest X-rays they can blend out or cut away small "
                  "lesions, so a mixed image may no longer show its label's finding",
                  MixupLesionWarning, stacklevel=2)
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
                 label_smoothing=label_smoothing, num_classes=num_classes)


def build_loss(*, label_smoothing: float, mixup: Optional[object]) -> nn.Module:
    """Training loss: soft-target CE under mixup (smoothing is folded into its targets), else CE."""
    if mixup is not None:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
