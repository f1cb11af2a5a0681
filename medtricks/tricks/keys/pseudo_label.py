"""The ``tricks.pseudo_label`` section, its ablation name and tag; the unlabelled stream and the loss are
:mod:`medtricks.tricks.pseudo_label` (torch)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from medtricks._schema import Section
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["PseudoLabelConfig", "PseudoLabelKeys", "WEIGHTINGS"]

WEIGHTINGS = ("none", "confidence")


class PseudoLabelConfig(Section):
    """``tricks.pseudo_label``: every training batch also trains on a batch of unlabelled images (the training
    images that ``data.label_fraction`` / ``data.label_count`` left without a label, and ``data.unlabeled``) with
    the labels a labeller gives their clean view, where it is confident (Lee 2013; Noisy Student's two views)."""

    enabled: bool = Field(
        False, description="train on pseudo-labels of the unlabelled pool (needs one: data.label_fraction, ...)"
    )
    threshold: float = Field(
        0.95, ge=0.0, le=1.0, description="top probability, 0..1, a pseudo-label needs to count (others weigh 0)"
    )
    soft: bool = Field(
        False, description="train on the labeller's probabilities (soft targets) instead of its arg-max class"
    )
    weighting: Literal["none", "confidence"] = Field(
        "none",
        description="weight of each kept image: none: 1; confidence: the labeller's top probability, so a doubtful "
        "label pulls less",
    )
    weight: float = Field(1.0, ge=0.0, description="weight of the unlabelled term in the batch loss (>= 0)")
    weight_ramp: float = Field(
        0.0, ge=0.0, description="epochs over which the weight rises linearly from 0 (0: full weight from the start)"
    )
    teacher: Optional[str] = Field(
        None,
        description="the labeller: null: the model being trained (eval mode); else a finished run's folder or run id",
    )
    batch_size: Optional[int] = Field(
        None, ge=1, description="unlabelled images per training batch; null: train.batch_size"
    )


@register_trick
class PseudoLabelKeys(Trick):
    """Pseudo-labels on the unlabelled pool."""

    name = "pseudo_label"
    order = 86  # after distillation: both add terms to the loss
    fields = {
        "pseudo_label": (
            PseudoLabelConfig,
            Field(default_factory=PseudoLabelConfig, description="pseudo-labels on the unlabelled pool"),
        )
    }
    ablation = {
        "pseudo_label": AblationName(
            "tricks.pseudo_label.enabled",
            "true",
            "pseudo-labels on the unlabelled pool (data.label_fraction / "
            "data.unlabeled); threshold etc.: tricks.pseudo_label.*",
        )
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.pseudo_label import PseudoLabel  # torch: loaded when a run builds its tricks

        return PseudoLabel if cls is PseudoLabelKeys else cls

    @classmethod
    def tags(cls, recipe):
        cfg = recipe.tricks.pseudo_label
        if not cfg.enabled:
            return []
        return [
            f"pseudo_label@{cfg.threshold:g}{'(soft)' if cfg.soft else ''}"
            f"{'(conf)' if cfg.weighting == 'confidence' else ''}"
        ]
