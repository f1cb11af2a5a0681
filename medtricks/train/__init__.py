"""The training engine (loop, AMP, EMA, checkpoint/resume, progress), inference helpers, and the
builders the engine is fed with: parameter groups and optimizers, learning-rate schedules, losses."""

from medtricks.train.engine import EngineConfig, FitResult, NonFiniteLossError, fit, seed_epoch, seed_everything
from medtricks.train.inference import autocast_context, predict, resolve_amp, resolve_device
from medtricks.train.losses import build_loss, build_mixup
from medtricks.train.param_groups import build_optimizer, build_param_groups
from medtricks.train.schedules import build_scheduler, lr_curve, scaled_lr

__all__ = [
    "EngineConfig",
    "FitResult",
    "NonFiniteLossError",
    "fit",
    "seed_epoch",
    "seed_everything",
    "predict",
    "autocast_context",
    "resolve_amp",
    "resolve_device",
    "build_loss",
    "build_mixup",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "lr_curve",
    "scaled_lr",
]
