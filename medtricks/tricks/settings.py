"""Tricks that are settings of the core sections (schedule, optimizer, precision, model, data).

They act through the core builders (``build_scheduler``, ``scaled_lr``, the resizer in
``build_model``...), so they have no points: each only names its recipe key for ``ablate --tricks``
and says when it is on (the run's ``tricks`` tag).
"""

from __future__ import annotations

from medtricks.data.transforms import PRESETS
from medtricks.tricks.base import AblationName, Trick, register_trick

__all__ = ["Warmup", "Cosine", "LinearScaling", "MixedPrecision", "Resizer", "Augment"]


@register_trick
class Warmup(Trick):
    name = "warmup"
    order = 10
    ablation = {"warmup": AblationName("schedule.warmup_epochs", "1", "linear lr warmup, epochs (default 1)")}

    @classmethod
    def tags(cls, recipe):
        return ["warmup"] if recipe.schedule.warmup_epochs > 0 else []


@register_trick
class Cosine(Trick):
    name = "cosine"
    order = 20
    ablation = {"cosine": AblationName("schedule.name", "cosine", "cosine lr decay")}

    @classmethod
    def tags(cls, recipe):
        return ["cosine"] if recipe.schedule.name == "cosine" else []


@register_trick
class LinearScaling(Trick):
    name = "linear_scaling"
    order = 30
    ablation = {"linear_scaling": AblationName("optim.linear_scaling", "true", "lr x batch_size / 256")}

    @classmethod
    def tags(cls, recipe):
        return ["linear_scaling"] if recipe.optim.linear_scaling else []


@register_trick
class MixedPrecision(Trick):
    """Mixed precision (``train.amp``): bf16/fp16 autocast on the GPU; tagged when it is on, no ablation name."""

    name = "amp"
    order = 200

    @classmethod
    def tags(cls, recipe):
        """What resolves: ``amp=auto`` only where it turns autocast on (a CUDA device); an explicit
        ``bf16``/``fp16`` is named as set (``fp16`` off CUDA fails at the start of the run)."""
        amp = recipe.train.amp
        if amp == "none":
            return []
        if amp == "auto":
            device = str(recipe.train.device)
            if device not in ("auto",) and not device.startswith("cuda"):
                return []
            import torch  # only for amp=auto; the run imports torch anyway

            if not torch.cuda.is_available():
                return []
        return [f"amp={amp}"]


@register_trick
class Resizer(Trick):
    name = "resizer"
    order = 210
    ablation = {"resizer": AblationName("model.resizer.enabled", "true", "learnable resizer in front of the backbone")}

    @classmethod
    def tags(cls, recipe):
        resizer = recipe.model.resizer
        return ["resizer" + ("_cbam" if resizer.attention == "cbam" else "")] if resizer.enabled else []


@register_trick
class Augment(Trick):
    """Augmentation presets are data settings; named here so ``ablate --tricks augment=cxr_shift`` works."""

    name = "augment"
    order = 220
    ablation = {"augment": AblationName("data.augment", None, "augmentation preset: " + ", ".join(PRESETS))}
