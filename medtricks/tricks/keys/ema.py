"""The EMA keys (``tricks.ema``, ``tricks.ema_decay``), ablation name and tag; the code that averages the weights
is :mod:`medtricks.tricks.ema` (timm's ``ModelEmaV3``)."""

from __future__ import annotations

from pydantic import Field

from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["EmaKeys"]


@register_trick
class EmaKeys(Trick):
    """An exponential moving average of the weights, validated, selected and saved in their place."""

    name = "ema"
    order = 80
    fields = {
        "ema": (
            bool,
            Field(
                False,
                description="keep an exponential moving average of the weights and validate, select and save "
                "it instead of the trained weights",
            ),
        ),
        "ema_decay": (
            float,
            Field(
                0.999,
                gt=0.0,
                lt=1.0,
                description="the average's decay per optimizer update, 0 < decay < 1 (0.999 averages over "
                "about the last 1,000 updates)",
            ),
        ),
    }
    ablation = {"ema": AblationName("tricks.ema", "true", "exponential moving average of the weights")}

    @classmethod
    def implementation(cls):
        from medtricks.tricks.ema import Ema  # timm: loaded when a run builds its tricks

        return Ema if cls is EmaKeys else cls

    @classmethod
    def tags(cls, recipe):
        return ["ema"] if recipe.tricks.ema else []
