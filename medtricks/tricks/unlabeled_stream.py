"""The unlabelled pool as a stream of two-view batches, for the tricks that learn from unlabelled images in
every training step (FixMatch, Meta Pseudo Labels).

Each item is two views of the *same* pool image: a **weak** one -- the run's own training augmentation
(``data.augment``) -- and a **strong** one (an augmentation preset, e.g. ``cxr_strong``). The stream has its own
shuffling generator and its own Python ``random`` state, both re-seeded at the first batch of every epoch from
the epoch's seed (``torch.initial_seed()`` after :func:`~medtricks.train.engine.seed_epoch`) plus a fixed
offset: a resumed run draws the same batches (the engine replays an interrupted epoch from its seed, so nothing
of the stream needs to be in ``last.pt``), and drawing from it moves none of the run's other random draws.

:class:`LabelMonitor` counts how many pseudo-labels passed a mask and, where the pool's manifest knows the
labels that ``data.label_fraction`` withheld (``withheld_target``; read for this monitoring only, never trained
on), how many of them were right.
"""

from __future__ import annotations

import random
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from medtricks.data.transforms import MultiView, build_transforms
from medtricks.errors import ConfigError

__all__ = ["TwoViewStream", "LabelMonitor", "like_batch", "withheld_targets"]

SEED_OFFSET = 15_485_863  # the unlabelled stream is neither the training loader's nor pseudo_label's


class _Indexed(Dataset):
    """``dataset[i] -> (views, i)``: the pool's images with their index (for the withheld labels), its target
    (always -1) dropped. Module-level, so it pickles for DataLoader workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        views, _ = self.dataset[index]
        return views, index


def withheld_targets(pool) -> Optional[torch.Tensor]:
    """The labels ``data.label_fraction`` withheld from the pool's images (-1 where unknown), or None."""
    manifest = getattr(pool, "manifest", None)
    if manifest is None or "withheld_target" not in getattr(manifest, "columns", ()):
        return None
    return torch.tensor(manifest["withheld_target"].astype("int64").to_numpy(copy=True), dtype=torch.long)


def like_batch(batch: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``batch`` in the labelled batch's memory format (channels_last when the engine uses it)."""
    if (
        batch.dim() == 4
        and images.dim() == 4
        and images.is_contiguous(memory_format=torch.channels_last)
        and not images.is_contiguous()
    ):
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


class TwoViewStream:
    """``mu · train.batch_size`` pool images per step, each as ``(weak, strong)``; ``key`` names the recipe
    section in the errors (``tricks.fixmatch``). A pool smaller than ``mu · B`` gives all its images each step.

    Refused (:class:`~medtricks.errors.ConfigError`): no unlabelled pool, a pool that is not an image dataset
    with its training transform, and fewer than 2 images per step (the weak view goes through a model in train
    mode, whose BatchNorm needs 2)."""

    def __init__(self, pool, *, strong: str, mu: int, recipe, key: str):
        if pool is None or len(pool) == 0:
            raise ConfigError(
                f"{key} needs unlabelled images: set data.label_fraction (or data.label_count) below the "
                "whole training split, or data.unlabeled: {root: FOLDER}"
            )
        weak = getattr(pool, "transform", None)
        needed = ("image_size", "in_chans", "mean", "std")
        if not callable(getattr(pool, "with_transform", None)) or not all(hasattr(weak, k) for k in needed):
            raise ConfigError(
                f"{key} needs the unlabelled pool as an image dataset it can draw a second view "
                "from (medtricks.data.XrayDataset with its training transform); got "
                f"{type(pool).__name__}"
            )
        self.pool = pool
        self.strong = build_transforms(
            strong,
            weak.image_size,
            mean=tuple(float(v) for v in weak.mean),
            std=tuple(float(v) for v in weak.std),
            in_chans=weak.in_chans,
            train=True,
        )
        train = getattr(recipe, "train", None)
        self.batch_size = min(mu * (getattr(train, "batch_size", None) or 32), len(pool))
        if self.batch_size < 2:
            raise ConfigError(
                f"{key}: the unlabelled pool holds {len(pool)} image(s); the weak view "
                "goes through the model in train mode, whose BatchNorm needs at least 2 images per step"
            )
        self.withheld = withheld_targets(pool)
        data = getattr(recipe, "data", None)
        self.generator = torch.Generator()
        self.loader = DataLoader(
            _Indexed(pool.with_transform(MultiView(weak, self.strong))),
            batch_size=self.batch_size,
            shuffle=True,
            generator=self.generator,
            num_workers=getattr(data, "num_workers", 0) or 0,
            drop_last=True,
        )
        self._iter = None
        self._py_state = None

    def next(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weak, strong, index)`` of the next batch, on ``device``; drawn on the stream's own generator and
        Python ``random`` state, so the rest of the run's random numbers do not move."""
        outer = random.getstate()
        try:
            if self._iter is None:  # first unlabelled batch of the epoch
                seed = (torch.initial_seed() + SEED_OFFSET) % (2**63)
                self.generator.manual_seed(seed)
                self._py_state = random.Random(seed).getstate()
                self._iter = iter(self.loader)
            random.setstate(self._py_state)
            try:
                (weak, strong), index = next(self._iter)
            except StopIteration:  # the pool is smaller than an epoch of batches: go round again
                self._iter = iter(self.loader)
                (weak, strong), index = next(self._iter)
            self._py_state = random.getstate()
        finally:
            random.setstate(outer)
        return weak.to(device, non_blocking=True), strong.to(device, non_blocking=True), index

    def new_epoch(self) -> None:
        """The next batch re-seeds the stream from that epoch's seed."""
        self._iter = None

    def known_labels(self) -> int:
        """How many pool images have a withheld label the monitor can check against."""
        return int((self.withheld >= 0).sum()) if self.withheld is not None else 0


class LabelMonitor:
    """Per-epoch counts of pseudo-labels: the share that passed the mask, and the accuracy (against the
    withheld labels) of those that passed and of all. ``prefix`` names the metrics (``train/fixmatch``)."""

    def __init__(self, withheld: Optional[torch.Tensor], prefix: str):
        self.withheld, self.prefix = withheld, prefix
        self.reset()

    def reset(self) -> None:
        self._seen = self._passed = 0
        self._known = self._known_right = self._known_passed = self._known_passed_right = 0

    def count(self, labels: torch.Tensor, mask: torch.Tensor, index: torch.Tensor) -> None:
        labels, mask = labels.cpu(), mask.cpu().bool()
        self._seen += int(mask.numel())
        self._passed += int(mask.sum())
        if self.withheld is None:
            return
        truth = self.withheld[index]
        known = truth >= 0
        right = (labels == truth) & known
        self._known += int(known.sum())
        self._known_right += int(right.sum())
        self._known_passed += int((known & mask).sum())
        self._known_passed_right += int((right & mask).sum())

    def write(self, metrics: dict) -> None:
        """Add ``<prefix>_mask_rate``, ``<prefix>_label_acc_all`` and ``<prefix>_label_acc`` (where defined) to
        ``metrics`` and start counting the next epoch."""
        if self._seen:
            metrics[f"{self.prefix}_mask_rate"] = self._passed / self._seen
        if self._known:
            metrics[f"{self.prefix}_label_acc_all"] = self._known_right / self._known
        if self._known_passed:
            metrics[f"{self.prefix}_label_acc"] = self._known_passed_right / self._known_passed
        self.reset()
