"""The training engine (loop, AMP, EMA, checkpoint/resume, progress), inference helpers, and the
builders the engine is fed with: parameter groups and optimizers, learning-rate schedules, losses.

Names are loaded on first use (PEP 562), so importing one builder (``medtricks.train.losses``, which the
mixup trick needs) or the torchrun launcher does not import the engine and what it needs (timm, torchvision,
torch.distributed)::

    from medtricks.train import fit, build_optimizer, build_scheduler
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EngineConfig": "engine",
    "FitResult": "engine",
    "NonFiniteLossError": "engine",
    "fit": "engine",
    "seed_epoch": "engine",
    "seed_everything": "engine",
    "predict": "inference",
    "autocast_context": "inference",
    "resolve_amp": "inference",
    "resolve_device": "inference",
    "build_loss": "losses",
    "build_mixup": "losses",
    "build_optimizer": "param_groups",
    "build_param_groups": "param_groups",
    "build_scheduler": "schedules",
    "lr_curve": "schedules",
    "scaled_lr": "schedules",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
