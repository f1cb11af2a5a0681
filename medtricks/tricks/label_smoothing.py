"""Label smoothing (Szegedy et al. 2016): the loss's targets move ``ε`` of the mass off the true class.

Two conventions (``tricks.label_smoothing_mode``):

- ``torch`` (default, what ``nn.CrossEntropyLoss(label_smoothing=ε)`` and timm do): every class gets
  ``ε/K``, so the true class keeps ``1 - ε + ε/K`` (0.95 for 2 classes and ε=0.1);
- ``paper`` (He et al. 2019, eq. 2): the true class gets ``1 - ε``, each other class ``ε/(K-1)``
  (0.9 / 0.1 for 2 classes). Implemented as torch's form with ``ε' = ε K / (K-1)``.

Under mixup/cutmix the smoothing is folded into the mixed soft targets (see ``mixup.py``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medtricks.errors import ConfigError
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["LabelSmoothing", "effective_smoothing"]


def effective_smoothing(epsilon: float, mode: str, num_classes: int) -> float:
    """The ``label_smoothing`` argument torch/timm need for ``epsilon`` in ``mode`` (see the module doc)."""
    if mode == "torch" or epsilon == 0:
        return epsilon
    if mode != "paper":
        raise ConfigError(f"tricks.label_smoothing_mode must be 'torch' or 'paper', got {mode!r}")
    if num_classes < 2:
        raise ConfigError("label smoothing needs at least 2 classes")
    value = epsilon * num_classes / (num_classes - 1)
    if value > 1:
        raise ConfigError(
            f"tricks.label_smoothing={epsilon:g} in 'paper' mode puts more than the true class's mass "
            f"on the {num_classes - 1} other class(es); use at most {(num_classes - 1) / num_classes:.3g}"
        )
    return value


@register_trick
class LabelSmoothing(Trick):
    """Label smoothing: the loss's targets move ε of the mass off the true class."""

    name = "label_smoothing"
    order = 40
    fields = {
        "label_smoothing": (
            float,
            Field(
                0.0,
                ge=0.0,
                lt=1.0,
                description="label smoothing ε, 0 <= ε < 1: the share of the target mass taken off the true "
                "class (Szegedy et al. 2016); 0 = off",
            ),
        ),
        "label_smoothing_mode": (
            Literal["torch", "paper"],
            Field(
                "torch",
                description="how ε is spread: torch: ε/K to every class, as nn.CrossEntropyLoss and timm (the "
                "true class keeps 1 - ε + ε/K); paper: the true class gets 1 - ε and the K - 1 others share ε "
                "(He et al. 2019)",
            ),
        ),
    }
    ablation = {
        "label_smoothing": AblationName("tricks.label_smoothing", "0.1", "label smoothing epsilon (default 0.1)")
    }

    @classmethod
    def tags(cls, recipe):
        eps, mode = recipe.tricks.label_smoothing, recipe.tricks.label_smoothing_mode
        return [f"label_smoothing={eps:g}" + ("" if mode == "torch" else f"({mode})")] if eps > 0 else []

    def loss_options(self):
        return {
            "label_smoothing": effective_smoothing(
                self.config.label_smoothing, self.config.label_smoothing_mode, len(self.ctx.classes)
            )
        }
