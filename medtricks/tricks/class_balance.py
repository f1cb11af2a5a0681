"""Class imbalance: inverse-frequency loss weights or a class-balanced sampler (``tricks.class_balance``; the key:
:mod:`medtricks.tricks.keys.class_balance`).

Kermany's training split holds about three pneumonia images per normal one; trained on it as is, a
model learns the prior and calls borderline normals pneumonia, which costs specificity on a test set
with another prevalence. Two standard remedies (He & Garcia, IEEE TKDE 2009):

- ``loss``: cross-entropy weights ``w_c = N / (K · n_c)`` (sklearn's ``compute_class_weight("balanced")``),
  so every class contributes the same total weight;
- ``sampler``: draw each image with probability ∝ ``1 / n_c`` (torch's ``WeightedRandomSampler``),
  so batches are balanced on average.

Both change the prior the model's probabilities are calibrated to; the stored operating point and
``--prevalence`` (prior-shift correction) account for that at evaluation (``operating_point_options``:
equal priors).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight

from medtricks.errors import ConfigError
from medtricks.tricks.keys.class_balance import ClassBalanceKeys

__all__ = ["class_weights", "balanced_sample_weights", "balanced_sampler", "ClassBalance"]


def _counts(targets: Sequence[int], n_classes: int) -> np.ndarray:
    y = np.asarray(targets).astype(int)
    if y.size == 0:
        raise ConfigError("class balancing needs training labels; the training split is empty")
    counts = np.bincount(y, minlength=n_classes)
    if len(counts) > n_classes:
        raise ConfigError(f"a training label {int(y.max())} is outside the {n_classes} classes")
    return counts


def class_weights(targets: Sequence[int], n_classes: int) -> list[float]:
    """Per-class loss weights ``N / (K · n_c)``; a class absent from training is an error (its weight
    would be infinite)."""
    counts = _counts(targets, n_classes)
    if (counts == 0).any():
        missing = [int(i) for i in np.flatnonzero(counts == 0)]
        raise ConfigError(f"tricks.class_balance: class index(es) {missing} have no training images")
    y = np.asarray(targets).astype(int)
    return [float(w) for w in compute_class_weight("balanced", classes=np.arange(n_classes), y=y)]


def balanced_sample_weights(targets: Sequence[int]) -> torch.Tensor:
    """Per-image sampling weights ``1 / n_class(image)`` for ``WeightedRandomSampler``."""
    y = np.asarray(targets).astype(int)
    counts = _counts(y, int(y.max()) + 1 if y.size else 0)
    return torch.as_tensor(1.0 / counts[y], dtype=torch.double)


def balanced_sampler(
    dataset, *, generator: torch.Generator, num_replicas: int = 1, rank: int = 0
) -> torch.utils.data.Sampler:
    """The training sampler of ``class_balance: sampler`` (``make_train_loader(sampler=...)``): draws images
    with probability 1 / (their class's count), with replacement, so each class fills about the same share of
    every epoch (as many draws per epoch as images). It draws from the loader's ``generator``, which the
    engine re-seeds every epoch (exact resume). Not data-parallel (``num_replicas`` > 1) yet."""
    if num_replicas > 1:
        raise ConfigError(
            "tricks.class_balance=sampler does not run data-parallel (torchrun) yet: use "
            "tricks.class_balance=loss, or train in one process"
        )
    return torch.utils.data.WeightedRandomSampler(
        balanced_sample_weights(dataset.targets), num_samples=len(dataset), replacement=True, generator=generator
    )


class ClassBalance(ClassBalanceKeys):
    """Computes the class weights from the training labels, or gives the run the balanced sampler."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.weights = None
        if self.config.class_balance == "loss":
            self.weights = class_weights(ctx.train_targets, len(ctx.classes))

    def loader_options(self):
        return {"sampler": balanced_sampler} if self.config.class_balance == "sampler" else {}

    def operating_point_options(self):
        # The prior the posteriors are calibrated to (what --prevalence shifts from): a class-balanced loss or
        # sampler trains against equal priors, not the split's frequencies.
        k = len(self.ctx.classes)
        return {"train_priors": [1 / k] * k}

    def loss_options(self):
        return {"class_weights": self.weights} if self.weights is not None else {}

    def log_params(self):
        return {"class_weights": ",".join(f"{w:.4g}" for w in self.weights) if self.weights else "none"}
