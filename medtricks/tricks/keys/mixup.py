"""The mixup/CutMix keys (``tricks.mixup_alpha``, ``tricks.cutmix_alpha``, ``tricks.mix_prob``), their ablation
names and tags; the code that mixes the batches is :mod:`medtricks.tricks.mixup` (timm's ``Mixup``)."""

from __future__ import annotations

from pydantic import Field

from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["MixupCutmixKeys"]


@register_trick
class MixupCutmixKeys(Trick):
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on the training batches."""

    name = "mixup"
    order = 70
    fields = {
        "mixup_alpha": (
            float,
            Field(
                0.0,
                ge=0.0,
                description="mixup: blend pairs of images and their labels with a weight drawn from "
                "Beta(alpha, alpha) (Zhang et al. 2018); 0 = off",
            ),
        ),
        "cutmix_alpha": (
            float,
            Field(
                0.0,
                ge=0.0,
                description="CutMix: paste a box of another image, its area share drawn from Beta(alpha, alpha), "
                "and mix the labels by area (Yun et al. 2019); 0 = off",
            ),
        ),
        "mix_prob": (
            float,
            Field(
                1.0,
                ge=0.0,
                le=1.0,
                description="probability that a batch is mixed, 0..1 (with mixup and CutMix both on, each mixed "
                "batch gets one of them at even odds)",
            ),
        ),
    }
    ablation = {
        "mixup": AblationName("tricks.mixup_alpha", "0.2", "mixup alpha (default 0.2)"),
        "cutmix": AblationName("tricks.cutmix_alpha", "1.0", "cutmix alpha (default 1.0)"),
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.mixup import MixupCutmix  # timm: loaded when a run builds its tricks

        return MixupCutmix if cls is MixupCutmixKeys else cls

    @classmethod
    def tags(cls, recipe):
        return [
            tag
            for tag, alpha in (("mixup", recipe.tricks.mixup_alpha), ("cutmix", recipe.tricks.cutmix_alpha))
            if alpha > 0
        ]
