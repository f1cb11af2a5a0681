"""What did the learnable resizer learn? A figure comparing its output with the plain resize.

Rows: the resizer's own fixed resize (its image skip, e.g. bilinear), the resizer output, and their
difference (output - resize), one column per image, as in Talebi & Milanfar (2021), Fig. 1/6.
The figure is built on matplotlib's Agg canvas, without pyplot, so it never needs a display and
never touches the global backend; save it with ``fig.savefig("resizer.png")``.
"""

from __future__ import annotations

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from medtricks.errors import ConfigError, ConfigTypeError

__all__ = ["resizer_comparison_figure"]


def _to_gray(batch: torch.Tensor) -> torch.Tensor:
    # X-rays are grayscale; a 3-channel batch is the same image replicated (or close), so show the
    # channel mean rather than a false-colour RGB rendering of normalised values.
    return batch.float().mean(dim=1)


@torch.no_grad()
def resizer_comparison_figure(resizer: nn.Module, images: torch.Tensor, *, n: int = 4) -> Figure:
    """Grid of plain resize / resizer output / difference for the first ``n`` images.

    Args:
        resizer: a :class:`~medtricks.models.resizer.LearnableResizer` (anything with a ``resize``
            method and a forward that returns the resized batch). It runs in eval mode; every
            submodule's train/eval mode is restored afterwards, even on error.
        images: ``(N, C, H, W)`` batch exactly as fed to the model (normalised), on any device.
        n: number of images (columns) to show; at most ``N`` are shown.

    Returns:
        A matplotlib ``Figure`` on an Agg canvas. The resize and the output are each shown on their
        own grey scale (min to max), so structure stays visible even when the resizer has shifted
        the brightness; the difference row shows that shift, on a diverging map symmetric around 0
        with its own colour bar.

    Example:
        >>> fig = resizer_comparison_figure(model.resizer, next(iter(val_loader))[0], n=4)
        >>> fig.savefig("resizer_comparison.png", dpi=100)
    """
    if not hasattr(resizer, "resize") or not callable(resizer.resize):
        raise ConfigTypeError(
            f"resizer_comparison_figure: resizer must have a resize() method (a LearnableResizer), "
            f"got {type(resizer).__name__}"
        )
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"resizer_comparison_figure: images must be a non-empty (N, C, H, W) tensor, got {shape}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"resizer_comparison_figure: n must be a positive integer, got {n!r}")

    modes = {module: module.training for module in resizer.modules()}
    try:
        resizer.eval()
        first = next(iter(resizer.parameters()), None)
        batch = images[:n]
        if first is not None:
            batch = batch.to(device=first.device, dtype=first.dtype)
        plain = _to_gray(resizer.resize(batch)).cpu()
        learned = _to_gray(resizer(batch)).cpu()
    finally:
        for module, was_training in modes.items():
            module.train(was_training)

    diff = learned - plain
    method = getattr(resizer, "interpolation", "plain")
    rows = (f"{method} resize", "resizer output", "difference")
    cols = plain.shape[0]
    fig = Figure(figsize=(2.6 * cols + 0.8, 2.6 * 3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, cols, squeeze=False)
    for j in range(cols):
        limit = float(diff[j].abs().max()) or 1e-8  # keep a valid colour scale for an all-zero diff
        axes[0, j].imshow(plain[j], cmap="gray")
        axes[1, j].imshow(learned[j], cmap="gray")
        shown = axes[2, j].imshow(diff[j], cmap="RdBu_r", vmin=-limit, vmax=limit)
        fig.colorbar(shown, ax=axes[2, j], shrink=0.8)
        axes[0, j].set_title(f"image {j}")
    for i, label in enumerate(rows):
        axes[i, 0].set_ylabel(label)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    height, width = plain.shape[-2:]
    fig.suptitle(f"Learnable resizer vs {method} resize ({height}x{width})")
    return fig
