"""Grad-CAM overlays: where in an X-ray a trained classifier looked for a class (the ``grad-cam`` package).

**Target layer**: the module whose output *is* the backbone's ``forward_features()`` result -- the last
feature map before global pooling, whatever the family: ``layer4`` for ResNets, ``bn2`` (after
``conv_head``) for EfficientNets, the last stage / final norm for ConvNeXt and friends. It is found by
running ``forward_features`` once on a dummy input with forward hooks (the last module to return that
very tensor), so no per-family table is needed; a backbone without ``forward_features`` (a plain torch
module) gets the last module that returns a 4-D map larger than 1x1. A learnable resizer in front is
part of the model the gradient runs through; the target layer is in its backbone.

Maps have the model's input size ``S x S`` (the image after the eval transform's resize and center
crop: what the model saw), scaled to [0, 1] per image, and are drawn over that image
(``show_cam_on_image``, jet colour map, half weight). Read by the shortcut audit
(:mod:`medtricks.audit.shortcut`) and by ``medtricks predict --cam`` (:mod:`medtricks.posthoc.predict`).

    from medtricks.audit.saliency import cam_target_layer, grad_cam, save_overlay
    name, layer = cam_target_layer(model, input_shape=(1, 224, 224))
    maps = grad_cam(model, layer, images, classes=[1] * len(images))   # (N, S, S) in [0, 1]
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from medtricks._atomic import atomic_path
from medtricks.errors import ConfigError, MedtricksError

__all__ = ["cam_target_layer", "grad_cam", "overlay", "save_overlay", "cam_file_name"]


def _backbone(model: nn.Module) -> nn.Module:
    """The classifier inside a resizer wrapper (``ResizerModel.backbone``), else the model itself."""
    inner = getattr(model, "backbone", None)
    return inner if isinstance(inner, nn.Module) else model


def cam_target_layer(model: nn.Module, input_shape: Sequence[int], *, min_grid: int = 1) -> tuple[str, nn.Module]:
    """``(name, module)`` of the layer Grad-CAM reads: the last feature map before global pooling (see the
    module docstring). ``input_shape``: ``(C, H, W)`` of the backbone's input (the resizer's output size
    when there is one; any size the backbone accepts works).

    ``min_grid``: when that map is smaller than ``min_grid`` x ``min_grid`` (a small input: EfficientNet's
    last map is 3x3 at 96 px), the deepest module whose output is at least that fine instead -- a whole
    stage where timm's ``feature_info`` names them: coarser semantics, but a map that tells regions apart.

    Raises:
        MedtricksError: no module of the model returns a spatial feature map.
    """
    backbone = _backbone(model)
    names = {module: name for name, module in backbone.named_modules() if name}
    outputs: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor):
            outputs.append((module, output))

    handles = [m.register_forward_hook(hook) for m in names]
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            x = torch.zeros(1, *input_shape, device=next(backbone.parameters()).device)
            features = backbone.forward_features(x) if hasattr(backbone, "forward_features") else None
            if features is None:
                backbone(x)
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    if features is not None:
        found = [m for m, out in outputs if out is features]
    else:
        found = [m for m, out in outputs if out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1]
    if not found:
        raise MedtricksError(
            f"Grad-CAM: no layer of {type(backbone).__name__} returns a spatial feature map "
            f"for an input of shape {tuple(input_shape)}"
        )
    layer = found[-1]  # the outermost module that returns it (modules finish after their children)
    grid = dict((m, out) for m, out in outputs)[layer].shape[-2:]
    if min(grid) < min_grid:
        finer = [
            m for m, out in outputs if out.dim() == 4 and min(out.shape[-2:]) >= min_grid and out.shape[-3] > 1
        ]  # channels > 1: not an attention or mask map
        # timm lists its stage outputs (feature_info): prefer a whole stage to a layer inside a block.
        stages = {
            info.get("module") for info in getattr(backbone, "feature_info", None) or [] if isinstance(info, dict)
        }
        finer = [m for m in finer if names[m] in stages] or finer
        if not finer:
            raise MedtricksError(
                f"Grad-CAM: no layer of {type(backbone).__name__} has a feature map of at least "
                f"{min_grid}x{min_grid} for an input of shape {tuple(input_shape)}"
            )
        layer = finer[-1]
    return names[layer], layer


def grad_cam(model: nn.Module, layer: nn.Module, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM maps ``(N, H, W)`` in [0, 1] of ``images`` (normalized model input ``(N, C, H, W)``) for
    one class index per image, at ``layer`` (:func:`cam_target_layer`)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if len(classes) != len(images):
        raise ConfigError(f"grad_cam: {len(images)} images but {len(classes)} class indices")
    model.eval()
    with torch.enable_grad(), GradCAM(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=images, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    return np.nan_to_num(np.asarray(maps, dtype=np.float32))


def overlay(gray: np.ndarray, heat: np.ndarray, *, image_weight: float = 0.5) -> np.ndarray:
    """A gray image ``(H, W)`` in [0, 1] with a heat map ``(H, W)`` in [0, 1] over it → RGB uint8 ``(H, W, 3)``."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)[..., None], 3, axis=2)
    return show_cam_on_image(rgb, np.clip(heat, 0.0, 1.0).astype(np.float32), use_rgb=True, image_weight=image_weight)


def save_overlay(path: str | Path, gray: np.ndarray, heat: np.ndarray) -> Path:
    """Write :func:`overlay` as a PNG at ``path`` (folders made as needed), atomically: a failed write (a
    full disk) raises ``OSError`` and leaves no partial file (a previous one at ``path`` is kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(overlay(gray, heat)).save(tmp, format="PNG")
    return path


def cam_file_name(image: str, taken: set[str]) -> str:
    """The overlay's relative path for a predictions row's ``image`` (its relative path, no PHI): the
    same path with a ``.png`` extension (``a/scan.dcm`` → ``a/scan.png``); when two inputs would share
    it, the full name plus ``.png`` (``a/scan.dcm.png``). ``taken`` collects the names given so far."""
    name = Path(image).with_suffix(".png").as_posix()
    if name in taken:
        name = f"{image}.png"
    taken.add(name)
    return name
