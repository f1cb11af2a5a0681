"""The ``tricks.reinit_late`` section, its ablation name and tag; the re-initialisation is
:mod:`medtricks.tricks.reinit_late` (torch, timm's initialisation)."""

from __future__ import annotations

from typing import Union

from pydantic import Field, field_validator

from medtricks._schema import Section
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["ReinitLateConfig", "ReinitLateKeys"]


class ReinitLateConfig(Section):
    """``tricks.reinit_late``: forget the pretrained weights of the last stages -- re-draw every weight and BN
    statistic there with timm's initialisation for the model family, after the pretrained load (Transfusion-style
    partial reuse, Raghu et al. 2019); the draws come from ``experiment.seed``."""

    stages: Union[int, list[str]] = Field(
        0,
        description="0 = off; N >= 1: the last N stages that hold residual blocks (as bn_gamma's 'late': layer4 "
        "of a ResNet); or stage/module names, e.g. [layer3, layer4] or [blocks.5, blocks.6, conv_head, bn2]",
    )
    zero_init_last: bool = Field(
        False, description="also set the last BN γ of each re-drawn residual block to 0 (timm's from-scratch default)"
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError(f"tricks.reinit_late.stages must be 0 (off), a count >= 1, or stage names; got {value}")
        if isinstance(value, list) and (
            not value or len(set(value)) != len(value) or not all(v.strip() for v in value)
        ):
            raise ValueError(
                f"tricks.reinit_late.stages as names must be a non-empty list without repeats, got {value}"
            )
        return value


@register_trick
class ReinitLateKeys(Trick):
    """Re-initialise the last residual stages after the pretrained load."""

    name = "reinit_late"
    order = 55  # before bn_gamma (60): a γ strategy on the same stage then acts on the fresh weights
    fields = {
        "reinit_late": (
            ReinitLateConfig,
            Field(default_factory=ReinitLateConfig, description="re-initialise the last stages"),
        )
    }
    ablation = {
        "reinit_late": AblationName(
            "tricks.reinit_late.stages",
            "1",
            "re-initialise the last N residual stages after the pretrained load (Transfusion-style partial reuse)",
        )
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.reinit_late import ReinitLate  # torch: loaded when a run builds its tricks

        return ReinitLate if cls is ReinitLateKeys else cls

    @classmethod
    def tags(cls, recipe):
        stages = recipe.tricks.reinit_late.stages
        if not stages:
            return []
        return [f"reinit_late={stages if isinstance(stages, int) else '+'.join(stages)}"]
