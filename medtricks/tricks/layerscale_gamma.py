"""The LayerScale-γ trick at work: ``tricks.layerscale_gamma`` (declared in
:mod:`medtricks.tricks.keys.layerscale_gamma`) applied to a vision transformer after its weights load (the
functional API is :mod:`medtricks.gamma.layerscale`).

    tricks:
      layerscale_gamma: {strategy: zero_late}                 # last ⌈n/4⌉ blocks start as the identity
      layerscale_gamma: {strategy: zero_late, last_n_blocks: 4, branch: mlp}
      layerscale_gamma: {strategy: zero_late, insert: true}   # a ViT built without LayerScale
"""

from __future__ import annotations

from medtricks.gamma.layerscale import apply_layerscale_strategy
from medtricks.tricks.base import ReportsWhatItChanged
from medtricks.tricks.keys.layerscale_gamma import LayerScaleGammaConfig, LayerScaleGammaKeys, LayerScaleRuleConfig

__all__ = ["LayerScaleGammaConfig", "LayerScaleRuleConfig", "LayerScaleGamma"]


class LayerScaleGamma(ReportsWhatItChanged, LayerScaleGammaKeys):
    """Sets the γ's when the model is built and reports what it changed."""

    def on_model(self, model):
        # On the loaded weights, before the optimizer sees the parameters (an inserted LayerScale is trained).
        self.report = apply_layerscale_strategy(model, self.config.layerscale_gamma)
