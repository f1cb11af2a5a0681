"""No bias decay (He et al. 2019): biases and normalization parameters get no weight decay."""

from __future__ import annotations

from pydantic import Field

from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["NoBiasDecay"]


@register_trick
class NoBiasDecay(Trick):
    """No weight decay on biases and normalization parameters."""

    name = "no_bias_decay"
    order = 50
    fields = {
        "no_bias_decay": (
            bool,
            Field(
                False,
                description="no weight decay on biases and normalization parameters (γ, β); the other weights "
                "keep optim.weight_decay (He et al. 2019)",
            ),
        )
    }
    ablation = {
        "no_bias_decay": AblationName("tricks.no_bias_decay", "true", "no weight decay on biases and norm layers")
    }

    @classmethod
    def tags(cls, recipe):
        return ["no_bias_decay"] if recipe.tricks.no_bias_decay else []

    def param_options(self):
        return {"no_bias_decay": True}
