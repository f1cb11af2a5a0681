"""The BN-gamma trick at work: ``tricks.bn_gamma`` (declared in :mod:`medtricks.tricks.keys.bn_gamma`) applied to
the model after its pretrained weights load (the functional API is :mod:`medtricks.gamma.bn`)."""

from __future__ import annotations

import warnings

from medtricks.gamma.bn import apply_gamma_strategy
from medtricks.tricks.base import ReportsWhatItChanged
from medtricks.tricks.keys.bn_gamma import BnGammaConfig, BnGammaKeys, GammaRuleConfig

__all__ = ["BnGammaConfig", "GammaRuleConfig", "BnGamma"]


class BnGamma(ReportsWhatItChanged, BnGammaKeys):
    """Sets the γ's when the model is built, warns when a zeroed γ is frozen, and reports what it changed."""

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
