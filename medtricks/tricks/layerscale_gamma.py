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
from medtricks.tricks.keys.layerscale_gamma import LayerScaleGammaConfig, LayerScaleGammaKeys, LayerScaleRuleConfig

__all__ = ["LayerScaleGammaConfig", "LayerScaleRuleConfig", "LayerScaleGamma"]


class LayerScaleGamma(LayerScaleGammaKeys):
    """Sets the γ's when the model is built and reports what it changed."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.report = None

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
