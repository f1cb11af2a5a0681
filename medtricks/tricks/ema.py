"""Exponential moving average of the weights (timm's ``ModelEmaV3``): validated, selected and saved
in place of the trained weights."""

from __future__ import annotations

from pydantic import Field
from timm.utils import ModelEmaV3

from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["Ema"]


@register_trick
class Ema(Trick):
    name = "ema"
    order = 80
    fields = {"ema": (bool, Field(False)), "ema_decay": (float, Field(0.999, gt=0.0, lt=1.0))}
    ablation = {"ema": AblationName("tricks.ema", "true", "exponential moving average of the weights")}

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.ema = None

    @classmethod
    def tags(cls, recipe):
        return ["ema"] if recipe.tricks.ema else []

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
