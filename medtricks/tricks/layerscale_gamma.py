"""The LayerScale-γ trick: the recipe section ``tricks.layerscale_gamma``, applied to a vision
transformer after its weights load (the functional API is :mod:`medtricks.gamma.layerscale`).

    tricks:
      layerscale_gamma: {strategy: zero_late}                 # last ⌈n/4⌉ blocks start as the identity
      layerscale_gamma: {strategy: zero_late, last_n_blocks: 4, branch: mlp}
      layerscale_gamma: {strategy: zero_late, insert: true}   # a ViT built without LayerScale
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from medtricks._schema import Section
from medtricks.tricks.base import AblationName, Trick, register_trick
from medtricks.gamma.layerscale import STRATEGIES, apply_layerscale_strategy, check_layerscale_config

__all__ = ["LayerScaleGammaConfig", "LayerScaleRuleConfig", "LayerScaleGamma"]


class LayerScaleRuleConfig(Section):
    value: float
    blocks: Optional[list[int]] = None
    last_n_blocks: Optional[int] = Field(None, ge=1)
    names: Optional[list[str]] = None
    branch: Optional[Literal["both", "attn", "mlp"]] = None  # None: the section's `branch`


class LayerScaleGammaConfig(Section):
    """``tricks.layerscale_gamma``: types here; the rules between keys live in :func:`check_layerscale_config`."""

    strategy: Literal[STRATEGIES] = "none"  # type: ignore[valid-type]
    blocks: Optional[list[int]] = None
    last_n_blocks: Optional[int] = Field(None, ge=1)
    names: Optional[list[str]] = None
    branch: Literal["both", "attn", "mlp"] = "both"
    insert: bool = False
    rules: list[LayerScaleRuleConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "LayerScaleGammaConfig":
        check_layerscale_config(self)  # ValueError -> a recipe error naming the key
        return self


_STRATEGY_HELP = ", ".join(s for s in STRATEGIES if s not in ("none", "rules"))


@register_trick
class LayerScaleGamma(Trick):
    name = "layerscale_gamma"
    order = 61  # right after bn_gamma
    fields = {"layerscale_gamma": (LayerScaleGammaConfig, Field(default_factory=LayerScaleGammaConfig))}
    ablation = {
        "layerscale_gamma": AblationName(
            "tricks.layerscale_gamma.strategy", None, f"LayerScale-gamma strategy for ViTs: {_STRATEGY_HELP}"
        )
    }

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.report = None

    @classmethod
    def tags(cls, recipe):
        strategy = recipe.tricks.layerscale_gamma.strategy
        return [f"layerscale_gamma={strategy}"] if strategy != "none" else []

    def on_model(self, model):
        # On the loaded weights, before the optimizer sees the parameters (an inserted LayerScale is trained).
        self.report = apply_layerscale_strategy(model, self.config.layerscale_gamma)

    def log_params(self):
        return {"layerscale_gamma": self.report.summary() if self.report is not None and len(self.report) else "none"}

    def summary(self):
        return str(self.report) if self.report is not None and len(self.report) else None

    def artifacts(self, run_dir):
        if self.report is None or not len(self.report):
            return []
        path = run_dir.trick_report(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.report.to_csv(path)
        return [(path, "tricks")]
