"""The ``tricks.distill`` section, its ablation name and tag; the teacher and the loss are
:mod:`medtricks.tricks.distill` (torch, medtricks.models)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field, field_validator

from medtricks._schema import Section
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["DistillConfig", "DistillationKeys"]


class DistillConfig(Section):
    """``tricks.distill``: knowledge distillation (Hinton et al. 2015) from a frozen teacher; the batch loss is
    ``alpha · CE + (1 - alpha) · T² · KL(teacher ‖ student)`` at temperature ``T``. On when ``teacher`` is set."""

    teacher: Optional[str] = Field(
        None,
        description="the teacher: a finished run's folder or run id (same classes), or model:NAME (a model "
        "medtricks.models builds, with `weights`); null = off",
    )
    temperature: float = Field(
        4.0,
        gt=0.0,
        description="softmax temperature T of both distributions in the KL term (> 0; the term is scaled by T²)",
    )
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="weight of the hard-label loss, 0..1; 1 - alpha goes to the KL term (1 = plain training)",
    )
    weights: str = Field(
        "none", description="model:NAME teachers only: their weights source (file:/path/ckpt.pth ...; as model.weights)"
    )
    image_size: Optional[int] = Field(
        None, ge=8, description="the teacher's input size in pixels; null: its run's (model:NAME: the student's)"
    )

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not str(value).strip():
            raise ValueError("tricks.distill.teacher is empty: give a run folder, a run id or model:NAME, or null")
        return value


@register_trick
class DistillationKeys(Trick):
    """Knowledge distillation from a finished run or a model."""

    name = "distill"
    order = 85  # after mixup (70) and adversarial (75): the teacher sees the batch the student trains on
    fields = {
        "distill": (
            DistillConfig,
            Field(default_factory=DistillConfig, description="knowledge distillation from a teacher"),
        )
    }
    ablation = {
        "distill": AblationName(
            "tricks.distill.teacher",
            None,
            "knowledge distillation from a finished run: distill=RUN_FOLDER_OR_ID "
            "(temperature/alpha: tricks.distill.*)",
        )
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.distill import (
            Distillation,
        )  # torch, medtricks.models: loaded when a run builds its tricks

        return Distillation if cls is DistillationKeys else cls

    @classmethod
    def tags(cls, recipe):
        cfg = recipe.tricks.distill
        return [] if cfg.teacher is None else [f"distill(T={cfg.temperature:g},a={cfg.alpha:g})"]
