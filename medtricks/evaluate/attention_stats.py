"""The numbers behind ``medtricks attention``: class-token maps, attention rollout and mean attention
distance, from post-softmax attention weights ``(B, heads, N, N)`` (rows: queries, columns: keys; the
``num_prefix_tokens`` class/register tokens first, then the patch tokens in row-major grid order, as
timm's VisionTransformer lays them out). Plain torch algebra: no model, no file.

* :func:`query_row` / :func:`class_token_maps` -- the attention of the class token (row 0) over the
  patch tokens, reshaped to the patch grid. A model without a class token (global average pooling)
  gets the mean row over all queries: its output is the mean of the tokens, so that row is the analogue.
* :func:`attention_rollout` -- Abnar & Zuidema (ACL 2020): per layer the mean over heads ``A``, then
  ``0.5 A + 0.5 I`` (the residual connection), rows renormalised to sum 1, multiplied through the
  layers (``R = Â_L ... Â_1``). Its class-token row over the patches says how much each patch flowed
  into the class token through all layers.
* :func:`mean_attention_distance` -- Dosovitskiy et al. (ICLR 2021), Fig. 7: for each query patch, the
  sum over key patches of attention weight x distance in pixels between the two patch centres, averaged
  over the queries (and, by the caller, the images). Only patch tokens count, and each query's weights
  are **renormalised over the patch keys**: the class/register tokens have no position, and without the
  renormalisation a head that sends most of its weight to the class token would read as "local"
  (small distance) when it merely looks at no patch. Units: pixels of the backbone's input image.

Why by hand: timm has no rollout or attention-distance helper, and the reference code of both papers is
not a package (the ViT paper's figure came from JAX code that was not released with it); each function
is a few lines and tests/evaluate/test_attention_maps.py checks them against hand-computed answers.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from medtricks.errors import ConfigError

__all__ = [
    "patch_distances",
    "mean_attention_distance",
    "attention_rollout",
    "query_row",
    "class_token_maps",
    "normalise_maps",
]


def _check_attention(attn: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(attn, torch.Tensor) or attn.ndim not in (3, 4) or attn.shape[-1] != attn.shape[-2]:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ConfigError(f"{name}: expected attention weights of shape (B, heads, N, N) or (B, N, N), got {shape}")
    return attn


def _check_grid(n_tokens: int, grid: Sequence[int], num_prefix_tokens: int, name: str) -> tuple[int, int]:
    gh, gw = (int(g) for g in grid)
    if n_tokens - num_prefix_tokens != gh * gw:
        raise ConfigError(
            f"{name}: {n_tokens} tokens minus {num_prefix_tokens} prefix token(s) is not the {gh} x {gw} patch grid"
        )
    return gh, gw


def patch_distances(grid: Sequence[int], patch_size: Sequence[int] | int) -> torch.Tensor:
    """Euclidean distances ``(P, P)`` in pixels between the centres of the ``P = gh * gw`` patches of a
    ``grid = (gh, gw)`` of patches of ``patch_size = (ph, pw)`` pixels (row-major order)."""
    gh, gw = (int(g) for g in grid)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, (int, float)) else (float(p) for p in patch_size)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64) * ph, torch.arange(gw, dtype=torch.float64) * pw, indexing="ij"
    )
    centres = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)  # offsets cancel: corners = centres
    return torch.cdist(centres, centres)


def mean_attention_distance(
    attn: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int] | int, *, num_prefix_tokens: int = 0
) -> torch.Tensor:
    """Mean attention distance in pixels per image and head, ``(B, heads)`` (see the module docstring):
    patch-to-patch weights renormalised over the patch keys, times the distance between patch centres,
    summed over keys, averaged over the query patches. A query that puts no weight on any patch is left
    out of its mean (NaN if every query does)."""
    attn = _check_attention(attn, "mean_attention_distance")
    if attn.ndim == 3:
        attn = attn[:, None]
    _check_grid(attn.shape[-1], grid, num_prefix_tokens, "mean_attention_distance")
    k = num_prefix_tokens
    patches = attn[..., k:, k:].to(torch.float64)
    mass = patches.sum(-1)
    dist = patch_distances(grid, patch_size).to(patches.device)
    per_query = (patches * dist).sum(-1) / mass
    per_query = torch.where(mass > 0, per_query, torch.full_like(per_query, float("nan")))
    return per_query.nanmean(-1)


def attention_rollout(layers: Sequence[torch.Tensor], *, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout ``(B, N, N)`` through ``layers`` (first to last), each ``(B, heads, N, N)`` (the
    heads are averaged) or already head-averaged ``(B, N, N)``: ``Â = (1 - residual) A + residual I``,
    rows renormalised, ``R = Â_L ... Â_1`` (Abnar & Zuidema 2020; ``residual=0.5`` as in the paper)."""
    if not layers:
        raise ConfigError("attention_rollout: no layer given")
    if not 0.0 <= residual <= 1.0:
        raise ConfigError(f"attention_rollout: residual={residual}: expected a weight in [0, 1]")
    rollout: Optional[torch.Tensor] = None
    for i, attn in enumerate(layers):
        attn = _check_attention(attn, f"attention_rollout layer {i}").to(torch.float64)
        mean = attn.mean(1) if attn.ndim == 4 else attn
        eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
        step = (1.0 - residual) * mean + residual * eye
        step = step / step.sum(-1, keepdim=True)
        if rollout is not None and rollout.shape != step.shape:
            raise ConfigError(
                f"attention_rollout: layer {i} has shape {tuple(step.shape)}, the layers before it "
                f"{tuple(rollout.shape)}"
            )
        rollout = step if rollout is None else step @ rollout
    return rollout


def query_row(matrix: torch.Tensor, *, class_token: bool = True) -> torch.Tensor:
    """The row the model's output reads from ``matrix`` ``(..., N, N)``: the class token's (row 0), or
    for a model without one (``class_token=False``: global average pooling) the mean over all rows."""
    return matrix[..., 0, :] if class_token else matrix.mean(-2)


def class_token_maps(
    attn: torch.Tensor, grid: Sequence[int], *, num_prefix_tokens: int, class_token: bool = True
) -> torch.Tensor:
    """The query row (:func:`query_row`) over the patch keys, as maps on the patch grid: ``(B, heads, gh,
    gw)`` for ``(B, heads, N, N)`` weights (``(B, gh, gw)`` for a rollout ``(B, N, N)``). Raw weights: a map
    sums to 1 minus what went to the prefix tokens."""
    attn = _check_attention(attn, "class_token_maps")
    gh, gw = _check_grid(attn.shape[-1], grid, num_prefix_tokens, "class_token_maps")
    row = query_row(attn, class_token=class_token)[..., num_prefix_tokens:]
    return row.reshape(*row.shape[:-1], gh, gw)


def normalise_maps(maps: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Each map over its last ``dims`` dimensions scaled to [0, 1] (min to max; a constant map: zeros)."""
    flat = maps.reshape(*maps.shape[:-dims], -1).to(torch.float64)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    span = high - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (flat - low) / safe, torch.zeros_like(flat))
    return out.reshape(maps.shape)
