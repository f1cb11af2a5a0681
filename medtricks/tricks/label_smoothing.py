"""Label smoothing (Szegedy et al. 2016): the loss's targets put ``1 - ε`` on the true class.

Under mixup/cutmix the smoothing is folded into the mixed soft targets (see ``mixup.py``).
"""
from __future__ import annotations

from pydantic import Field

from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["LabelSmoothing"]


@register_trick
class LabelSmoothing(Trick):
    name = "label_smoothing"
    order = 40
    fields = {"label_smoothing": (float, Field(0.0, ge=0.0, lt=1.0))}
    ablation = {"label_smoothing": AblationName("tricks.label_smoothing", "0.1",
                                                "label smoothing epsilon (default 0.1)")}

    @classmethod
    def tags(cls, recipe):
        eps = recipe.tricks.label_smoothing
        return [f"label_smoothing={eps:g}"] if eps > 0 else []

    def loss_options(self):
        return {"label_smoothing": self.config.label_smoothing}
