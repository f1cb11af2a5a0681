"""The training loader: the one place the training sampler is made (shuffled, a trick's, or data-parallel).

from medtricks.train.loaders import make_train_loader
loader = make_train_loader(dataset, batch_size=32, seed=0, num_workers=4)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler

from medtricks.errors import ConfigError

__all__ = ["make_train_loader"]


def make_train_loader(
    dataset,
    *,
    batch_size: int,
    seed: int,
    num_workers: int,
    drop_last: bool = False,
    sampler: Optional[Callable[..., Any]] = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """The training loader, shuffled from a generator seeded with ``seed`` (the engine re-seeds it every epoch).

    ``sampler``: ``sampler(dataset, generator=, num_replicas=, rank=)`` makes the sampler instead of the
    shuffle (a trick's ``loader_options``, e.g. the class-balanced sampler of
    :func:`medtricks.tricks.class_balance.balanced_sampler`); it draws from ``generator`` and refuses what it
    cannot do (e.g. data-parallel).

    ``num_replicas`` > 1 (torchrun): a ``DistributedSampler``; process ``rank`` takes every
    ``num_replicas``-th image of one permutation of the split (padded with repeats to equal slices, so
    every process makes the same number of updates). The engine calls its ``set_epoch`` with the epoch
    seed each epoch: the same seed gives the same order, and a resumed run replays it.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    # A last batch of one image cannot train through BatchNorm (one value per channel at a 1x1 feature map):
    # leave that one image out of the epoch (another one each epoch: the order is shuffled).
    per_process = -(-len(dataset) // num_replicas) if num_replicas > 1 else len(dataset)
    drop_last = drop_last or (per_process > 1 and per_process % batch_size == 1)
    if num_replicas > 1:
        chosen = sampler(dataset, generator=generator, num_replicas=num_replicas, rank=rank) if sampler else None
        chosen = chosen or DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=0)
        if drop_last and len(chosen) < batch_size:
            raise ConfigError(
                f"each of the {num_replicas} processes gets {len(chosen)} training images, fewer "
                f"than train.batch_size={batch_size} (per process); mixup/cutmix need full batches: "
                "lower the batch size"
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=chosen,
            generator=generator,
            num_workers=num_workers,
            drop_last=drop_last,
            persistent_workers=False,
        )
    if drop_last and len(dataset) < batch_size:
        raise ConfigError(
            f"the training split has {len(dataset)} images, fewer than train.batch_size="
            f"{batch_size}; mixup/cutmix need full batches: lower the batch size"
        )
    if sampler is not None:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            generator=generator,
            num_workers=num_workers,
            drop_last=drop_last,
            persistent_workers=False,
            sampler=sampler(dataset, generator=generator, num_replicas=1, rank=0),
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=False,
    )
