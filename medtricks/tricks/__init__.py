"""The bag-of-tricks plug-ins: one module per recipe key under ``tricks:`` (``tricks.bn_gamma`` is
:mod:`medtricks.tricks.bn_gamma`, ...), each a :class:`~medtricks.tricks.base.Trick` registered in
:mod:`medtricks.tricks.registry`. A trick whose code needs torch, timm or scikit-learn declares its keys,
ablation names and tag in :mod:`medtricks.tricks.keys` (``keys/bn_gamma.py``), so reading a recipe imports none
of them; its module here acts on the run.

The functional pieces the plug-ins call live below them: the γ library (BN-γ and LayerScale-γ
strategies) in :mod:`medtricks.gamma`, the schedule, parameter-group and loss builders next to the
engine in :mod:`medtricks.train`. Imported lazily so ``import medtricks.tricks`` stays cheap::

    from medtricks.tricks import Trick, register_trick
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Trick": "base",
    "ReportsWhatItChanged": "base",
    "TrickContext": "base",
    "AblationName": "base",
    "register_trick": "base",
    "unregister_trick": "base",
    "registered_tricks": "base",
}

#: Names that lived here before the γ library and the builders got their own homes (0.x layout).
_MOVED = {
    "find_residual_norms": "medtricks.gamma",
    "apply_bn_gamma": "medtricks.gamma",
    "apply_gamma_strategy": "medtricks.gamma",
    "register_residual_block": "medtricks.gamma",
    "unregister_residual_block": "medtricks.gamma",
    "GammaNoEffectWarning": "medtricks.gamma",
    "STRATEGIES": "medtricks.gamma",
    "gamma_preview": "medtricks.gamma",
    "GammaReport": "medtricks.gamma",
    "ResidualNorm": "medtricks.gamma",
    "build_scheduler": "medtricks.train",
    "lr_curve": "medtricks.train",
    "scaled_lr": "medtricks.train",
    "build_param_groups": "medtricks.train",
    "build_optimizer": "medtricks.train",
    "build_loss": "medtricks.train",
    "build_mixup": "medtricks.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    if name in _MOVED:
        raise AttributeError(
            f"medtricks.tricks.{name} moved: import it from {_MOVED[name]} "
            f"(`from {_MOVED[name]} import {name}`) or from medtricks itself"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
