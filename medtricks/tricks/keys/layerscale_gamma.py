"""The ``tricks.layerscale_gamma`` section, its ablation name and its tag; the code that applies it is
:mod:`medtricks.tricks.layerscale_gamma` (over the functional API :mod:`medtricks.gamma.layerscale`)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from medtricks._schema import Section
from medtricks.gamma.config import STRATEGIES, check_layerscale_config
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["LayerScaleGammaConfig", "LayerScaleRuleConfig", "LayerScaleGammaKeys"]

_BLOCKS = "positions among the model's transformer blocks, counted over the whole network (negative from the end)"
_LAST_N = "the last N transformer blocks"
_NAMES = "fnmatch patterns on the γ holders' names, e.g. ['blocks.11.ls2', 'blocks_token_only.*.gamma_1']"
_BRANCH = "which residual branch: 'both', 'attn' (ls1 / gamma_1) or 'mlp' (ls2 / gamma_2)"


class LayerScaleRuleConfig(Section):
    """One rule of ``tricks.layerscale_gamma.rules`` (``strategy: rules``): the γ value to set and the blocks it
    applies to; each given selector narrows the set, and a later rule overrides an earlier one."""

    value: float = Field(
        description="the γ to set on the branches this rule selects (0.0: the block starts as the identity)"
    )
    blocks: Optional[list[int]] = Field(None, description=f"{_BLOCKS}; null: every block")
    last_n_blocks: Optional[int] = Field(None, ge=1, description=f"{_LAST_N}; null: not a selector")
    names: Optional[list[str]] = Field(None, description=f"{_NAMES}; null: not a selector")
    branch: Optional[Literal["both", "attn", "mlp"]] = Field(
        None, description=f"{_BRANCH}; null: the section's `branch`"
    )


class LayerScaleGammaConfig(Section):
    """``tricks.layerscale_gamma``: set the LayerScale γ of chosen vision-transformer blocks after the weights load
    (the transformer analogue of ``tricks.bn_gamma``; γ=0 makes a block the identity). "Late" in the strategies'
    names is the last ⌈n/4⌉ blocks, unless ``blocks``, ``last_n_blocks`` or ``names`` says otherwise."""

    # Types here; the rules between keys live in medtricks.gamma.config.check_layerscale_config.
    strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        "none",
        description="none (off); zero_all: γ=0 in every block; zero_late: γ=0 in the late blocks; one_late: γ=1 "
        "there; zero_late_one_rest: γ=0 late and γ=1 in every other block; rules: the `rules` list (the default "
        "when rules are given)",
    )
    blocks: Optional[list[int]] = Field(None, description=f"{_BLOCKS}; null: the strategy's default")
    last_n_blocks: Optional[int] = Field(None, ge=1, description=f"{_LAST_N}; null: the strategy's default")
    names: Optional[list[str]] = Field(None, description=f"{_NAMES}; null: not a selector")
    branch: Literal["both", "attn", "mlp"] = Field("both", description=_BRANCH)
    insert: bool = Field(
        False,
        description="a selected block built without LayerScale (timm's init_values=None) gets one holding the "
        "value; false: such a model is an error that names it",
    )
    rules: list[LayerScaleRuleConfig] = Field(
        default_factory=list, description="ordered rules for strategy 'rules' (each: value and selectors)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "LayerScaleGammaConfig":
        check_layerscale_config(self)  # ValueError -> a recipe error naming the key
        return self


_STRATEGY_HELP = ", ".join(s for s in STRATEGIES if s not in ("none", "rules"))


@register_trick
class LayerScaleGammaKeys(Trick):
    """Zero (or one) LayerScale γ in chosen vision-transformer blocks after the weights load."""

    name = "layerscale_gamma"
    order = 61  # right after bn_gamma
    fields = {
        "layerscale_gamma": (
            LayerScaleGammaConfig,
            Field(default_factory=LayerScaleGammaConfig, description="LayerScale-γ strategy for vision transformers"),
        )
    }
    ablation = {
        "layerscale_gamma": AblationName(
            "tricks.layerscale_gamma.strategy", None, f"LayerScale-gamma strategy for ViTs: {_STRATEGY_HELP}"
        )
    }

    @classmethod
    def implementation(cls):
        from medtricks.tricks.layerscale_gamma import LayerScaleGamma  # torch: loaded when a run builds its tricks

        return LayerScaleGamma if cls is LayerScaleGammaKeys else cls

    @classmethod
    def tags(cls, recipe):
        strategy = recipe.tricks.layerscale_gamma.strategy
        return [f"layerscale_gamma={strategy}"] if strategy != "none" else []
