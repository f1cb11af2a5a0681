"""The γ library: where a residual branch's last scale sits and what to set it to, after the
pretrained weights load -- BatchNorm γ in CNNs (:mod:`medtricks.gamma.bn`) and LayerScale γ in vision
transformers (:mod:`medtricks.gamma.layerscale`).

``blocks`` finds the residual blocks and their last norm layer (the "where"), ``config`` checks a
strategy without a model (and without torch: the recipe validates with it), ``report`` is what every
function returns. The recipe sections ``tricks.bn_gamma`` and ``tricks.layerscale_gamma`` are thin
plug-ins over these functions (:mod:`medtricks.tricks`). Imported lazily so ``import medtricks.gamma`` stays cheap::

    from medtricks.gamma import apply_bn_gamma
    print(apply_bn_gamma(model, 0.0, stages=[-1], beta=0.0))
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "STRATEGIES": "config",
    "GammaNoEffectWarning": "bn",
    "GammaReport": "bn",
    "GammaPlan": "config",
    "ResidualNorm": "bn",
    "apply_bn_gamma": "bn",
    "apply_gamma_strategy": "bn",
    "check_gamma_config": "config",
    "find_residual_norms": "bn",
    "gamma_preview": "bn",
    "register_residual_block": "bn",
    "unregister_residual_block": "bn",
    "LayerScaleSite": "layerscale",
    "LayerScaleReport": "layerscale",
    "LayerScalePlan": "config",
    "find_layerscale": "layerscale",
    "apply_layerscale_gamma": "layerscale",
    "apply_layerscale_strategy": "layerscale",
    "check_layerscale_config": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
