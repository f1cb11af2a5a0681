"""Figures of ``medtricks attention``: maps over the X-ray, and the mean attention distance across depth.

Built on matplotlib's Agg canvas without pyplot (as :mod:`medtricks.evaluate.plots`): no display, the
global backend untouched. Every heat map is drawn min-to-max (its own [0, 1] scale, jet, half
transparent) over the gray image the model saw, stretched over the whole image (bilinear), so a map on
a 4 x 4 patch grid and one on a 56 x 56 feature map read alike.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medtricks.errors import ConfigError

__all__ = ["plot_vit_attention", "plot_cnn_stages", "plot_attention_distance"]

_PANEL = 1.25  # inches per map


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _scaled(heat: np.ndarray) -> np.ndarray:
    heat = np.asarray(heat, dtype=float)
    low, high = np.nanmin(heat), np.nanmax(heat)
    return (heat - low) / (high - low) if high > low else np.zeros_like(heat)


def _overlay(ax, gray: np.ndarray, heat: Optional[np.ndarray], title: str) -> None:
    h, w = gray.shape
    ax.imshow(gray, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if heat is not None:
        ax.imshow(
            _scaled(heat),
            cmap="jet",
            alpha=0.45,
            vmin=0.0,
            vmax=1.0,
            interpolation="bilinear",
            extent=(-0.5, w - 0.5, h - 0.5, -0.5),
        )
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_vit_attention(
    gray: np.ndarray,
    cls_maps: np.ndarray,
    rollout: np.ndarray,
    layers: Sequence[str],
    *,
    title: str = "",
    query: str = "class token",
) -> Figure:
    """One image: the image and its attention rollout (first row), then one row per layer of ``cls_maps``
    ``(L, heads, gh, gw)``: each head's ``query`` row over the patches and the mean over heads."""
    cls_maps = np.asarray(cls_maps, dtype=float)
    if cls_maps.ndim != 4 or len(layers) != cls_maps.shape[0]:
        raise ConfigError(f"plot_vit_attention: maps of shape {cls_maps.shape} for {len(layers)} layer names")
    n_layers, heads = cls_maps.shape[:2]
    cols = heads + 1
    fig = _figure(max(4.8, 0.6 + _PANEL * cols), 0.7 + _PANEL * (n_layers + 1))
    axes = fig.subplots(n_layers + 1, cols, squeeze=False)
    _overlay(axes[0, 0], gray, None, "image")
    _overlay(axes[0, 1], gray, rollout, "rollout (all layers)")
    for ax in axes[0, 2:]:
        ax.axis("off")
    for i, name in enumerate(layers):
        for h in range(heads):
            _overlay(axes[i + 1, h], gray, cls_maps[i, h], f"head {h}")
        _overlay(axes[i + 1, heads], gray, cls_maps[i].mean(0), "mean of heads")
        axes[i + 1, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(
        f"{title}\n{query} attention over the patches,\nper layer and head (each map min-max)".strip(), fontsize=8
    )
    return fig


def plot_cnn_stages(gray: np.ndarray, maps: Sequence[np.ndarray], stages: Sequence[str], *, title: str = "") -> Figure:
    """One image and, per stage, the mean |activation| over channels (each map min-max), side by side."""
    if len(maps) != len(stages):
        raise ConfigError(f"plot_cnn_stages: {len(maps)} maps for {len(stages)} stage names")
    fig = _figure(0.4 + _PANEL * 1.3 * (len(stages) + 1), 0.9 + _PANEL * 1.3)
    axes = fig.subplots(1, len(stages) + 1, squeeze=False)[0]
    _overlay(axes[0], gray, None, "image")
    for ax, heat, name in zip(axes[1:], maps, stages):
        heat = np.asarray(heat)
        _overlay(ax, gray, heat, f"{name} ({heat.shape[0]}x{heat.shape[1]})")
    fig.suptitle(f"{title}\nmean |activation| over channels per stage (each map min-max)".strip(), fontsize=8)
    return fig


def plot_attention_distance(
    distances: np.ndarray,
    layers: Sequence[str],
    *,
    patch_size: Sequence[int],
    image_size: Sequence[int],
    title: str = "",
) -> Figure:
    """Mean attention distance ``(L, heads)`` in pixels: one dot per head at each layer, as in Dosovitskiy
    et al. (2021), Fig. 7; the dashed line is one patch, the dotted one the largest distance in the image."""
    d = np.asarray(distances, dtype=float)
    if d.ndim != 2 or d.shape[0] != len(layers):
        raise ConfigError(f"plot_attention_distance: distances of shape {d.shape} for {len(layers)} layer names")
    fig = _figure(max(4.0, 1.5 + 0.4 * len(layers)), 3.6)
    ax = fig.add_subplot()
    x = np.repeat(np.arange(len(layers)), d.shape[1])
    ax.scatter(
        x,
        d.reshape(-1),
        s=14,
        alpha=0.75,
        c=np.tile(np.arange(d.shape[1]), len(layers)),
        cmap="viridis",
        edgecolors="none",
    )
    ax.axhline(float(max(patch_size)), color="gray", linestyle="--", linewidth=0.8, label="one patch")
    diagonal = float(np.hypot(image_size[0] - patch_size[0], image_size[1] - patch_size[1]))
    ax.axhline(diagonal, color="gray", linestyle=":", linewidth=0.8, label="farthest patches")
    ax.set_xticks(range(len(layers)), labels=list(layers), rotation=90 if len(layers) > 6 else 0, fontsize=7)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylim(bottom=0.0, top=diagonal * 1.05)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{title}\none dot per head; weights renormalised over the patch tokens".strip(), fontsize=8)
    return fig
