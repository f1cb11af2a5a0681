"""The ``tricks.class_balance`` key, its ablation name and tag; the code that weights the loss or draws the
batches is :mod:`medtricks.tricks.class_balance` (scikit-learn, torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["ClassBalanceKeys"]


@register_trick
class ClassBalanceKeys(Trick):
    """Class-imbalance remedies: inverse-frequency loss weights or a class-balanced sampler."""

    name = "class_balance"
    order = 90
    fields = {
        "class_balance": (
            Literal["none", "loss", "sampler"],
            Field(
                "none",
                description="counter class imbalance: none; loss: cross-entropy weights N / (K n_c), so every "
                "class weighs the same in total; sampler: draw each training image with probability 1 / n_c "
                "(n_c: the images of its class)",
            ),
        )
    }
    ablation = {
        "class_balance": AblationName("tricks.class_balance", "loss", "class-weighted loss (default) or =sampler")
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.class_balance import (
            ClassBalance,
        )  # scikit-learn, torch: loaded when a run builds its tricks

        return ClassBalance if cls is ClassBalanceKeys else cls

    @classmethod
    def tags(cls, recipe):
        mode = recipe.tricks.class_balance
        return [f"class_balance={mode}"] if mode != "none" else []
