"""Assembly of the fast paths for one run (issue 29): the cached frozen prefix and progressive resizing.

:mod:`medtricks.run.prepare` calls these with its recipe and built objects; the pieces live in
:mod:`medtricks.train.frozen_cache` and :mod:`medtricks.train.progressive`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader

from medtricks.data.transforms import build_transforms
from medtricks.models.reinit import derive_seed
from medtricks.train.frozen_cache import (
    CachedViews,
    FrozenSplit,
    SuffixModel,
    build_cached_views,
    cache_bytes,
    check_cacheable,
    split_frozen_prefix,
    suffix_of,
    warn_single_view,
)
from medtricks.train.progressive import ProgressiveLoader, progressive_batches, progressive_sizes

__all__ = ["CachedPrefix", "prepare_cached_prefix", "progressive_loader"]


@dataclass
class CachedPrefix:
    """What a run trains and validates on when ``train.cache_frozen`` is set."""

    split: FrozenSplit
    train_views: CachedViews
    val_views: CachedViews
    train_module: SuffixModel

    @property
    def megabytes(self) -> float:
        return (
            cache_bytes(
                self.train_views.views,
                len(self.train_views),
                self.train_views.store.shape[2:],
                self.train_views.store.dtype,
            )
            + cache_bytes(1, len(self.val_views), self.val_views.store.shape[2:], self.val_views.store.dtype)
        ) / 2**20

    def params(self) -> dict[str, Any]:
        """Resolved values a run logs: where the model is cut, the feature shape and the memory it takes."""
        return {
            "resolved.cache_frozen.first_trained": self.split.cut,
            "resolved.cache_frozen.frozen_units": self.split.n_frozen,
            "resolved.cache_frozen.feature_shape": "x".join(map(str, self.train_views.store.shape[2:])),
            "resolved.cache_frozen.megabytes": round(self.megabytes, 1),
        }

    def val_loader(self, batch_size: int) -> DataLoader:
        return DataLoader(self.val_views, batch_size=batch_size, shuffle=False)

    def eval_module(self, eval_model: torch.nn.Module) -> SuffixModel:
        """The rest of ``eval_model`` (the model itself, or EMA's copy) cut where the cache was."""
        if eval_model is self.train_module.model:
            return self.train_module
        return suffix_of(eval_model, self.split.n_frozen)


def prepare_cached_prefix(
    recipe,
    model: torch.nn.Module,
    bundle,
    tricks,
    *,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    world_size: int,
) -> CachedPrefix:
    """Check the recipe can train on cached features, cut ``model`` and cache the training views and validation."""
    config = recipe.train.cache_frozen
    check_cacheable(
        tricks=tricks,
        resizer=recipe.model.resizer.enabled,
        progressive=recipe.schedule.progressive_resize is not None,
        world_size=world_size,
    )
    warn_single_view(config.views, recipe.data.augment)
    model.to(device)
    if recipe.train.channels_last:  # as the engine will: a channels_last input on contiguous weights is slow
        model.to(memory_format=torch.channels_last)
    sample = torch.stack([bundle.train[i][0] for i in range(min(2, len(bundle.train)))]).to(device)
    split = split_frozen_prefix(model, sample=sample)
    dtype = getattr(torch, config.dtype)
    seed = recipe.experiment.seed
    common = dict(
        dtype=dtype,
        device=device,
        batch_size=recipe.train.batch_size,
        num_workers=recipe.data.num_workers,
        channels_last=recipe.train.channels_last,
        amp_dtype=amp_dtype,
        progress=recipe.train.progress,
    )
    train_views = build_cached_views(
        split,
        bundle.train,
        views=config.views,
        seed_of_view=lambda view: derive_seed(seed, f"cache_frozen_view_{view}"),
        desc=f"frozen prefix: {config.views} view(s) of the training split",
        **common,
    )
    val_views = build_cached_views(
        split,
        bundle.val,
        views=1,
        seed_of_view=lambda view: derive_seed(seed, "cache_val"),
        desc="frozen prefix: validation split",
        **common,
    )
    return CachedPrefix(
        split=split, train_views=train_views, val_views=val_views, train_module=SuffixModel(model, split)
    )


def progressive_loader(recipe, bundle, data_config: dict, make_loader: Callable[[Any, int], Any]) -> ProgressiveLoader:
    """The training loader of ``schedule.progressive_resize``: sizes and batches by epoch (see progressive.py)."""
    config = recipe.schedule.progressive_resize
    end = config.end or recipe.data.image_size
    sizes = progressive_sizes(
        epochs=recipe.train.epochs,
        start=config.start,
        end=end,
        final_epochs=config.final_epochs,
        multiple=config.multiple,
    )
    batches = progressive_batches(
        sizes, end=end, batch_size=recipe.train.batch_size, n_images=len(bundle.train), scale_batch=config.scale_batch
    )
    transforms: dict[int, Any] = {}

    def set_size(size: int) -> None:
        if size not in transforms:
            transforms[size] = build_transforms(
                recipe.data.augment,
                size,
                mean=tuple(data_config["mean"]),
                std=tuple(data_config["std"]),
                in_chans=recipe.model.in_chans,
                train=True,
            )
        bundle.train.set_transform(transforms[size])

    return ProgressiveLoader(
        bundle.train,
        sizes=sizes,
        batches=batches,
        batch_size=recipe.train.batch_size,
        set_size=set_size,
        make_loader=lambda batch: make_loader(bundle.train, batch),
    )
