"""Exponential moving average of the weights (timm's ``ModelEmaV3``; the keys:
:mod:`medtricks.tricks.keys.ema`): validated, selected and saved in place of the trained weights."""

from __future__ import annotations

from timm.utils import ModelEmaV3

from medtricks.tricks.keys.ema import EmaKeys

__all__ = ["Ema"]


class Ema(EmaKeys):
    """Copies the model at the start of fit, averages after every update, and hands the copy to validation."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.ema = None

    def on_fit_start(self, model):
        self.ema = ModelEmaV3(model, decay=self.config.ema_decay)  # a copy on the model's device

    def on_step_end(self, model, step):
        self.ema.update(model, step=step)

    def transform_eval_model(self, model):
        return self.ema.module

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)
