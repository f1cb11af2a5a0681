"""The ``tricks.fixmatch`` section, its ablation name and tag; the unlabelled stream and the loss are
:mod:`medtricks.tricks.fixmatch` (torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medtricks._schema import Section
from medtricks.data.transforms import PRESETS
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["FixMatchConfig", "FixMatchKeys"]


class FixMatchConfig(Section):
    """``tricks.fixmatch``: FixMatch (Sohn et al. 2020) on the unlabelled pool (``data.label_fraction`` /
    ``data.label_count`` / ``data.unlabeled``): the model's confident prediction on a weakly augmented view of
    each unlabelled image is the label its strongly augmented view trains on."""

    enabled: bool = Field(
        False, description="add FixMatch's unlabelled term to every training step (not with tricks.pseudo_label)"
    )
    threshold: float = Field(
        0.95, gt=0.0, le=1.0, description="confidence a weak-view prediction needs to become a label, 0 < t <= 1"
    )
    mu: int = Field(7, ge=1, description="unlabelled images per labelled image in a step (mu x train.batch_size)")
    lambda_u: float = Field(1.0, ge=0.0, description="weight of the unlabelled term in the loss (>= 0)")
    strong: Literal[PRESETS] = Field(  # type: ignore[valid-type]
        "cxr_strong", description="augmentation preset of the strong view (data.augment's presets)"
    )


@register_trick
class FixMatchKeys(Trick):
    """FixMatch: weak-view pseudo-labels train the strong view."""

    name = "fixmatch"
    order = 87  # after pseudo_label: both add terms to the loss (and are never on together)
    fields = {
        "fixmatch": (
            FixMatchConfig,
            Field(default_factory=FixMatchConfig, description="FixMatch on the unlabelled pool"),
        )
    }
    ablation = {
        "fixmatch": AblationName(
            "tricks.fixmatch.enabled",
            "true",
            "FixMatch on the unlabelled pool (data.label_fraction / data.unlabeled): "
            "weak-view pseudo-labels train the strong view; tricks.fixmatch.*",
        )
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.fixmatch import FixMatch  # torch: loaded when a run builds its tricks

        return FixMatch if cls is FixMatchKeys else cls

    @classmethod
    def tags(cls, recipe):
        cfg = recipe.tricks.fixmatch
        return [f"fixmatch@{cfg.threshold:g}"] if cfg.enabled else []
