"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on the training batch, with timm's ``Mixup`` (the keys:
:mod:`medtricks.tricks.keys.mixup`); the loss becomes soft-target cross-entropy (label smoothing folded into the
mixed targets)."""

from __future__ import annotations

from medtricks.train.losses import build_mixup
from medtricks.tricks.keys.mixup import MixupCutmixKeys
from medtricks.tricks.label_smoothing import effective_smoothing

__all__ = ["MixupCutmix"]


class MixupCutmix(MixupCutmixKeys):
    """Mixes each training batch; full batches only, and soft targets for the loss."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.mixup = build_mixup(
            mixup_alpha=self.config.mixup_alpha,
            cutmix_alpha=self.config.cutmix_alpha,
            prob=self.config.mix_prob,
            label_smoothing=effective_smoothing(
                self.config.label_smoothing, self.config.label_smoothing_mode, len(ctx.classes)
            ),
            num_classes=len(ctx.classes),
        )

    def loader_options(self):
        return {"drop_last": True}  # timm's Mixup needs even, full batches

    def loss_options(self):
        return {"soft_targets": True}

    def transform_batch(self, images, targets):
        return self.mixup(images, targets)
