"""The BN-gamma trick: the recipe section ``tricks.bn_gamma``, applied to the model after its
pretrained weights load (the functional API is :mod:`medtricks.gamma.bn`)."""

from __future__ import annotations

import warnings
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from medtricks._schema import Section
from medtricks.tricks.base import AblationName, Trick, register_trick
from medtricks.gamma.bn import STRATEGIES, apply_gamma_strategy, check_gamma_config
from medtricks.gamma.report import GammaReport

__all__ = ["BnGammaConfig", "GammaRuleConfig", "BnGamma"]


_Section = Section  # unknown keys and booleans for numbers are errors, as in every section


class GammaRuleConfig(_Section):
    value: float
    stages: Optional[list[int]] = None
    blocks: Optional[list[int]] = None
    last_n_blocks: Optional[int] = Field(None, ge=1)
    names: Optional[list[str]] = None
    which: Optional[Literal["last", "all"]] = None  # None: the section's `which`
    beta: Optional[Union[float, Literal["keep"]]] = None


class BnGammaConfig(_Section):
    """``tricks.bn_gamma``: types here; the rules between keys live in :func:`check_gamma_config` only."""

    strategy: Literal[STRATEGIES] = "none"  # type: ignore[valid-type]
    stages: Optional[list[int]] = None
    blocks: Optional[list[int]] = None
    last_n_blocks: Optional[int] = Field(None, ge=1)
    names: Optional[list[str]] = None
    which: Literal["last", "all"] = "last"
    beta: Optional[Union[float, Literal["keep"]]] = None
    rules: list[GammaRuleConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "BnGammaConfig":
        check_gamma_config(self)  # ValueError -> a recipe error naming the key
        return self


_STRATEGY_HELP = ", ".join(s for s in STRATEGIES if s not in ("none", "rules"))


@register_trick
class BnGamma(Trick):
    name = "bn_gamma"
    order = 60
    fields = {"bn_gamma": (BnGammaConfig, Field(default_factory=BnGammaConfig))}
    ablation = {"bn_gamma": AblationName("tricks.bn_gamma.strategy", None, f"BN-gamma strategy: {_STRATEGY_HELP}")}
    deprecated_result_attribute = "gamma_report"  # RunResult.gamma_report (0.x): RunResult.report("bn_gamma")

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.report = None

    @classmethod
    def empty_report(cls):
        return GammaReport([], strategy="none")

    @classmethod
    def tags(cls, recipe):
        strategy = recipe.tricks.bn_gamma.strategy
        return [f"bn_gamma={strategy}"] if strategy != "none" else []

    def on_model(self, model):
        # On the loaded weights, before the optimizer sees the parameters.
        self.report = apply_gamma_strategy(model, self.config.bn_gamma)

    def on_freeze(self, model, frozen):
        """A block whose gamma was set to 0 and then frozen stays the identity forever: say so."""
        if self.report is None or not frozen:
            return
        frozen_names = set(frozen)
        dead = [
            row["name"] for row in self.report.rows if row["new_gamma"] == 0 and f"{row['name']}.weight" in frozen_names
        ]
        if dead:
            warnings.warn(
                f"model.freeze freezes {len(dead)} norm layer(s) whose gamma tricks.bn_gamma set to 0 "
                f"({', '.join(dead[:4])}{', ...' if len(dead) > 4 else ''}): those residual branches can "
                "never learn and stay the identity; unfreeze those stages or choose other blocks",
                RuntimeWarning,
                stacklevel=3,
            )

    def log_params(self):
        return {"bn_gamma": self.report.summary() if self.report is not None and len(self.report) else "none"}

    def summary(self):
        return str(self.report) if self.report is not None and len(self.report) else None

    def artifacts(self, run_dir):
        if self.report is None or not len(self.report):
            return []
        path = run_dir.trick_report(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.report.to_csv(path)
        return [(path, "tricks")]
