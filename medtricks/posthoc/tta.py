"""Test-time augmentation for ``evaluate`` and ``ensemble``: horizontal-flip TTA, opt-in by name.

Flipping a chest X-ray mirrors its anatomy, so ``--tta flip`` is never implied (:func:`resolve_tta`) and
comes with a warning for a model that never trained on flipped images (:func:`flip_tta_warning`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from medtricks.errors import ConfigError

__all__ = ["TTA_MODES", "resolve_tta", "flip_tta_warning", "FlipTTA"]

# --tta: "none" (default) or "flip". A bare --tta / tta=True is refused: flipping a chest X-ray is not harmless.
TTA_MODES = ("none", "flip")
_FLIPPING_PRESETS = ("paper_baseline",)  # data.augment presets whose training flips images horizontally
_FLIP_EXPLAINED = (
    "a horizontal flip mirrors the chest: the heart and aortic arch move to the right, the liver "
    "to the left, and any L/R marker reads backwards; the chest X-ray presets (cxr_light, "
    "cxr_shift) never flip in training, so the model has not seen mirrored X-rays"
)


def resolve_tta(tta: Any) -> str:
    """``"none"`` or ``"flip"`` from a ``--tta`` value. ``None``/``False``/``"none"`` mean none; flip TTA
    must be asked for by name (``"flip"``): ``True`` or a bare ``--tta`` is a :class:`ConfigError` that
    explains why."""
    if tta is None or tta is False or (isinstance(tta, str) and tta.strip().lower() == "none"):
        return "none"
    if isinstance(tta, str) and tta.strip().lower() == "flip":
        return "flip"
    given = "a bare --tta" if tta is True or tta == "" else f"--tta {tta!r}"
    raise ConfigError(
        f"{given}: say which test-time augmentation: 'none' (the default) or 'flip' (the mean of "
        f"each image and its horizontal mirror). Flip is opt-in because {_FLIP_EXPLAINED}; "
        "use --tta flip (tta='flip') only if you mean it, and compare it with --tta none"
    )


def flip_tta_warning(trained) -> Optional[str]:
    """The warning ``evaluate``/``ensemble`` print with ``--tta flip`` for a model trained without flips."""
    preset = trained.recipe.data.augment
    if preset in _FLIPPING_PRESETS:
        return None
    return (
        f"--tta flip averages every prediction with the mirrored X-ray, but {_FLIP_EXPLAINED} "
        f"(this run trained with data.augment={preset}); compare with --tta none before trusting it"
    )


class FlipTTA(nn.Module):
    """Test-time augmentation: mean softmax of the image and its horizontal flip (returned as log-probs,
    so a softmax on top gives the averaged probabilities). For chest X-rays the flip mirrors the anatomy
    (heart on the right), which models trained with the X-ray presets never saw: ``evaluate`` and
    ``ensemble`` use it only with ``--tta flip`` and warn (:func:`resolve_tta`, :func:`flip_tta_warning`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.model(x).float(), dim=1) + torch.softmax(self.model(x.flip(-1)).float(), dim=1)
        return torch.log(probs / 2)
