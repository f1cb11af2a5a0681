"""Progressive resizing (issue 29): train at low resolution first, finish at the test resolution.

fast.ai's progressive resizing and FixRes (Touvron et al., NeurIPS 2019): early epochs at a small image
size cost a fraction of a full-size epoch (EfficientNet-Lite0 on a 2-core CPU: ~2.5x the images per second
at 96 px than at 160 px) and the last ``final_epochs`` at the test resolution fix the train/test
resolution discrepancy. ``schedule.progressive_resize: {start: 96, end: 160, final_epochs: 1}``:

- sizes: the first ``epochs - final_epochs`` epochs ramp linearly from ``start`` toward ``end`` (epoch
  ``i`` of ``n`` ramp epochs at ``start + (end - start) * i / n``, rounded down to ``multiple``), then
  ``final_epochs`` at ``end``;
- batch: with ``scale_batch`` the batch grows as ``(end / size)^2`` (multiples of 8, at most the split), so
  activation memory stays about flat, and the lr of those epochs follows it (the linear scaling rule,
  Goyal et al. 2017);
- the lr schedule stays in epochs: update ``j`` of ``m`` in epoch ``e`` is at position ``e + j/m`` of it,
  whatever the epoch's batch size.

Validation and the final evaluation always run at ``end``.

Example::

    >>> progressive_sizes(epochs=3, start=96, end=160, final_epochs=1)
    [96, 128, 160]
    >>> progressive_batches([96, 128, 160], end=160, batch_size=32, n_images=1000)
    [88, 48, 32]
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

__all__ = ["progressive_sizes", "progressive_batches", "ProgressiveLoader"]


def progressive_sizes(*, epochs: int, start: int, end: int, final_epochs: int = 1, multiple: int = 16) -> list[int]:
    """The image size of every epoch (see the module docstring)."""
    ramp = max(0, epochs - final_epochs)
    sizes = []
    for i in range(ramp):
        size = start + (end - start) * i / ramp
        sizes.append(max(start, int(size // multiple * multiple)) if size < end else end)
    return sizes + [end] * (epochs - ramp)


def progressive_batches(
    sizes: Sequence[int], *, end: int, batch_size: int, n_images: int, scale_batch: bool = True
) -> list[int]:
    """The batch size of every epoch: ``batch_size * (end / size)^2`` in multiples of 8, capped at the split."""
    if not scale_batch:
        return [batch_size] * len(sizes)
    out = []
    for size in sizes:
        scaled = batch_size * (end / size) ** 2
        scaled = batch_size if size >= end else max(batch_size, int(scaled // 8 * 8))
        out.append(min(scaled, max(batch_size, n_images)))
    return out


class ProgressiveLoader:
    """A training loader whose image size and batch size change by epoch; the engine calls
    :meth:`set_epoch` before each epoch and scales the lr by :meth:`lr_scale`.

    ``set_size(size)`` switches the dataset's train transform; ``make_loader(batch_size)`` builds the
    epoch's DataLoader (``make_train_loader``: the one sampler factory, so class balancing and seeding stay as
    without progressive resizing)."""

    def __init__(
        self,
        dataset,
        *,
        sizes: Sequence[int],
        batches: Sequence[int],
        batch_size: int,
        set_size: Callable[[int], None],
        make_loader: Callable[[int], object],
    ):
        if len(sizes) != len(batches):
            raise ValueError("one batch size per epoch size")
        self.dataset, self.sizes, self.batches, self.batch_size = dataset, list(sizes), list(batches), batch_size
        self._set_size, self._make_loader = set_size, make_loader
        self.epoch: Optional[int] = None
        self._loader = make_loader(batch_size)

    @property
    def nominal_batches(self) -> int:
        """Batches of an epoch at the nominal batch size (what the lr schedule is sized with)."""
        return math.ceil(len(self.dataset) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        index = min(int(epoch), len(self.sizes) - 1)
        self.epoch = index
        self._set_size(self.sizes[index])
        self._loader = self._make_loader(self.batches[index])

    def lr_scale(self, epoch: int) -> float:
        return self.batches[min(int(epoch), len(self.batches) - 1)] / self.batch_size

    @property
    def generator(self):
        return getattr(self._loader, "generator", None)

    @property
    def sampler(self):
        return getattr(self._loader, "sampler", None)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        return iter(self._loader)
