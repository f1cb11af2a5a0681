"""The ``tricks.mpl`` section, its ablation name and tag; the teacher, its update and the unlabelled stream are
:mod:`medtricks.tricks.mpl` (torch)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from medtricks._schema import Section
from medtricks.data.transforms import PRESETS
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["MetaPseudoLabelsConfig", "MetaPseudoLabelsKeys"]


class MetaPseudoLabelsConfig(Section):
    """``tricks.mpl``: Meta Pseudo Labels (Pham et al., CVPR 2021) on the unlabelled pool (``data.label_fraction``
    / ``data.label_count`` / ``data.unlabeled``). A teacher, trained alongside the run's model (the student),
    labels each unlabelled image; the student learns from those labels; the teacher learns from how the student's
    loss on the *labelled* batch changed after that step (first-order), plus its own UDA loss."""

    enabled: bool = Field(False, description="train a teacher alongside the model (not with fixmatch or pseudo_label)")
    mu: int = Field(7, ge=1, description="unlabelled images per labelled image in a step (mu x train.batch_size)")
    strong: Literal[PRESETS] = Field(  # type: ignore[valid-type]
        "cxr_strong", description="augmentation preset of the strong view (data.augment's presets)"
    )
    student_labeled_weight: float = Field(
        0.0,
        ge=0.0,
        description="weight of the model's own labelled loss during the MPL epochs; 0 = the paper (the student "
        "learns from the teacher's labels only, the labelled batch only measures it)",
    )
    finetune_epochs: int = Field(
        0,
        ge=0,
        description="the last N epochs train the student on the labelled images alone (weight 1, teacher "
        "frozen), as the paper's final fine-tuning; they continue the run's lr schedule",
    )
    teacher: Optional[str] = Field(
        None,
        description="a finished run (folder or run id) whose weights start the teacher -- same architecture, "
        "classes and normalisation as this run (e.g. a supervised run on the same labels); null: a copy of the "
        "model as built",
    )
    teacher_lr: Optional[float] = Field(
        None, gt=0.0, description="the teacher's base lr (null: the run's lr after linear scaling)"
    )
    uda_weight: float = Field(
        1.0, ge=0.0, description="weight of the teacher's UDA consistency term (0: the teacher's labelled loss only)"
    )
    uda_threshold: float = Field(
        0.95, gt=0.0, le=1.0, description="confidence of the teacher's sharpened weak-view prediction for UDA"
    )
    uda_temperature: float = Field(
        0.7, gt=0.0, description="sharpening temperature of the teacher's weak-view prediction (UDA's target)"
    )
    uda_ramp_epochs: float = Field(
        1.0, ge=0.0, description="epochs over which the UDA weight ramps linearly from 0 to uda_weight"
    )


@register_trick
class MetaPseudoLabelsKeys(Trick):
    """Meta Pseudo Labels: a teacher learns from its student's labelled loss."""

    name = "mpl"
    order = 88  # after fixmatch (87): both add terms to the loss (and are never on together)
    fields = {
        "mpl": (
            MetaPseudoLabelsConfig,
            Field(default_factory=MetaPseudoLabelsConfig, description="Meta Pseudo Labels on the unlabelled pool"),
        )
    }
    ablation = {
        "mpl": AblationName(
            "tricks.mpl.enabled",
            "true",
            "Meta Pseudo Labels on the unlabelled pool (data.label_fraction / data.unlabeled): a teacher "
            "trained from the student's labelled-loss change labels the strong views; tricks.mpl.*",
        )
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.mpl import MetaPseudoLabels  # torch: loaded when a run builds its tricks

        return MetaPseudoLabels if cls is MetaPseudoLabelsKeys else cls

    @classmethod
    def tags(cls, recipe):
        cfg = recipe.tricks.mpl
        return ([f"mpl@mu{cfg.mu}"] + (["mpl_teacher=run"] if cfg.teacher else [])) if cfg.enabled else []
