"""Bag-of-tricks pieces: BN-gamma strategies, schedules, parameter groups, losses.

Imported lazily so ``import medtricks.tricks`` stays cheap::

    from medtricks.tricks import apply_bn_gamma, find_residual_norms
    report = apply_bn_gamma(model, 0.0, stages=[-1])
    print(report)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "find_residual_norms": "bn_gamma",
    "apply_bn_gamma": "bn_gamma",
    "apply_gamma_strategy": "bn_gamma",
    "register_residual_block": "bn_gamma",
    "unregister_residual_block": "bn_gamma",
    "GammaNoEffectWarning": "bn_gamma",
    "STRATEGIES": "bn_gamma",
    "gamma_preview": "bn_gamma",
    "GammaReport": "bn_gamma",
    "ResidualNorm": "bn_gamma",
    "build_scheduler": "schedules",
    "lr_curve": "schedules",
    "scaled_lr": "schedules",
    "build_param_groups": "param_groups",
    "build_optimizer": "param_groups",
    "build_loss": "losses",
    "build_mixup": "losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
