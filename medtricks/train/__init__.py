"""The training engine: loop, AMP, EMA, checkpoint/resume, progress; and inference helpers."""
from medtricks.train.engine import EngineConfig, FitResult, NonFiniteLossError, fit, seed_epoch, seed_everything
from medtricks.train.predict import autocast_context, predict, resolve_amp, resolve_device

__all__ = ["EngineConfig", "FitResult", "NonFiniteLossError", "fit", "seed_epoch", "seed_everything",
           "predict", "autocast_context", "resolve_amp", "resolve_device"]
