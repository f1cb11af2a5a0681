"""The ``tricks.bn_gamma`` section, its ablation name and its tag; the code that applies it is
:mod:`medtricks.tricks.bn_gamma` (over the functional API :mod:`medtricks.gamma.bn`)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from medtricks._schema import Section
from medtricks.gamma.config import STRATEGIES, check_gamma_config
from medtricks.gamma.report import GammaReport
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["BnGammaConfig", "GammaRuleConfig", "BnGammaKeys"]

_STAGES = (
    "stage numbers (layer1 = 0 in a ResNet, blocks.5 = 5 in an EfficientNet; negative counts back over the "
    "stages that hold a residual block, so [-1] is the last such stage)"
)
_BLOCKS = "positions of residual blocks inside each selected stage (negative counts back over the stage's blocks)"
_LAST_N = "the last N residual blocks of the whole network"
_NAMES = (
    "fnmatch patterns on qualified norm-layer names, e.g. ['layer4.*.bn3']; alone they match any norm layer of "
    "the model, with other selectors they filter the norms those select"
)
_WHICH = (
    "'last': the norm that ends each selected residual branch; 'all': every norm on the branch (shortcut norms never)"
)


class GammaRuleConfig(Section):
    """One rule of ``tricks.bn_gamma.rules`` (``strategy: rules``): the γ value to set and the norms it applies to;
    each given selector narrows the set, and a later rule overrides an earlier one on the norms both select."""

    value: float = Field(description="the γ to set on the norms this rule selects (0.0 and 1.0 are the usual values)")
    stages: Optional[list[int]] = Field(None, description=f"{_STAGES}; null: every stage")
    blocks: Optional[list[int]] = Field(None, description=f"{_BLOCKS}; null: every block")
    last_n_blocks: Optional[int] = Field(None, ge=1, description=f"{_LAST_N}; null: not a selector")
    names: Optional[list[str]] = Field(None, description=f"{_NAMES}; null: not a selector")
    which: Optional[Literal["last", "all"]] = Field(None, description=f"{_WHICH}; null: the section's `which`")
    beta: Optional[Union[float, Literal["keep"]]] = Field(
        None, description="β of the norms this rule sets: a number, or 'keep'; null: the section's `beta`"
    )


class BnGammaConfig(Section):
    """``tricks.bn_gamma``: set γ (and β) of the BatchNorm layers that end chosen residual branches, on the
    pretrained weights before training (He et al. 2019's zero-γ, applied selectively). "Late" in the strategies'
    names is the last stage that holds a residual block, unless ``stages``, ``last_n_blocks`` or ``names`` says
    otherwise."""

    # Types here; the rules between keys live in medtricks.gamma.config.check_gamma_config only.
    strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        "none",
        description="none (off); zero_all: γ=0 in every residual block (the paper's); zero_late: γ=0 in the late "
        "blocks; one_late: γ=1 there; zero_late_one_rest: γ=0 late and γ=1 in every other block; rules: the "
        "`rules` list (the default when rules are given)",
    )
    stages: Optional[list[int]] = Field(None, description=f"{_STAGES}; null: the strategy's default")
    blocks: Optional[list[int]] = Field(None, description=f"{_BLOCKS}; null: every block")
    last_n_blocks: Optional[int] = Field(None, ge=1, description=f"{_LAST_N}; null: not a selector")
    names: Optional[list[str]] = Field(None, description=f"{_NAMES}; null: not a selector")
    which: Literal["last", "all"] = Field("last", description=_WHICH)
    beta: Optional[Union[float, Literal["keep"]]] = Field(
        None,
        description="β of the norms whose γ is set: a number, or 'keep' (the pretrained β); null: β=0 where γ "
        "becomes 0 (else the block would add a constant), kept elsewhere",
    )
    rules: list[GammaRuleConfig] = Field(
        default_factory=list, description="ordered rules for strategy 'rules' (each: value and selectors)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "BnGammaConfig":
        check_gamma_config(self)  # ValueError -> a recipe error naming the key
        return self


_STRATEGY_HELP = ", ".join(s for s in STRATEGIES if s not in ("none", "rules"))


@register_trick
class BnGammaKeys(Trick):
    """Zero (or one) γ in chosen residual blocks after the pretrained weights load."""

    name = "bn_gamma"
    order = 60
    fields = {
        "bn_gamma": (
            BnGammaConfig,
            Field(default_factory=BnGammaConfig, description="BN-γ strategy applied after the weights load"),
        )
    }
    ablation = {"bn_gamma": AblationName("tricks.bn_gamma.strategy", None, f"BN-gamma strategy: {_STRATEGY_HELP}")}
    deprecated_result_attribute = "gamma_report"  # RunResult.gamma_report (0.x): RunResult.report("bn_gamma")

    @classmethod
    def implementation(cls):
        from medtricks.tricks.bn_gamma import BnGamma  # torch: loaded when a run builds its tricks

        return BnGamma if cls is BnGammaKeys else cls

    @classmethod
    def empty_report(cls):
        return GammaReport([], strategy="none")

    @classmethod
    def tags(cls, recipe):
        strategy = recipe.tricks.bn_gamma.strategy
        return [f"bn_gamma={strategy}"] if strategy != "none" else []
