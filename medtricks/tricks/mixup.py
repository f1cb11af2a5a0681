"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on the training batch, with timm's ``Mixup``;
the loss becomes soft-target cross-entropy (label smoothing folded into the mixed targets)."""

from __future__ import annotations

from pydantic import Field

from medtricks.tricks.base import AblationName, Trick, register_trick
from medtricks.tricks.label_smoothing import effective_smoothing
from medtricks.train.losses import build_mixup

__all__ = ["MixupCutmix"]


@register_trick
class MixupCutmix(Trick):
    name = "mixup"
    order = 70
    fields = {
        "mixup_alpha": (float, Field(0.0, ge=0.0)),
        "cutmix_alpha": (float, Field(0.0, ge=0.0)),
        "mix_prob": (float, Field(1.0, ge=0.0, le=1.0)),
    }
    ablation = {
        "mixup": AblationName("tricks.mixup_alpha", "0.2", "mixup alpha (default 0.2)"),
        "cutmix": AblationName("tricks.cutmix_alpha", "1.0", "cutmix alpha (default 1.0)"),
    }

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

    @classmethod
    def tags(cls, recipe):
        return [
            tag
            for tag, alpha in (("mixup", recipe.tricks.mixup_alpha), ("cutmix", recipe.tricks.cutmix_alpha))
            if alpha > 0
        ]

    def loader_options(self):
        return {"drop_last": True}  # timm's Mixup needs even, full batches

    def loss_options(self):
        return {"soft_targets": True}

    def transform_batch(self, images, targets):
        return self.mixup(images, targets)
