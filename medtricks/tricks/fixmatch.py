"""FixMatch as a trick (Sohn et al., NeurIPS 2020):
``tricks.fixmatch: {enabled: true, threshold: 0.95, mu: 7, lambda_u: 1.0, strong: cxr_strong}`` (the keys:
:mod:`medtricks.tricks.keys.fixmatch`).

Every training batch (each micro-batch with ``train.accumulate``) also draws ``mu · B`` unlabelled images
(``B`` = ``train.batch_size``) from the pool that ``data.label_fraction`` / ``data.label_count`` /
``data.unlabeled`` leave (``TrickContext.extras["unlabeled"]``), each in two views of the *same* image: a **weak** view -- the run's own training augmentation
(``data.augment``, e.g. ``cxr_light``'s crop, rotation and exposure; no flips) -- and a **strong** view, the
``strong`` preset (default ``cxr_strong``: RandAugment-style ops and Cutout, see
:mod:`medtricks.data.transforms`). The model predicts the weak view without gradient; its arg-max is the
pseudo-label ``ŷ_i`` and its top probability ``c_i`` the confidence. The strong view trains::

    loss = supervised + lambda_u · (1 / (mu B)) · Σ_i 1[c_i >= threshold] · CE(model(strong_i), ŷ_i)

averaged over all ``mu · B`` images, masked ones counting zero (the paper's normalisation: a strict
threshold also lowers the term's weight while few images pass). Hard labels, no ramp, as in the paper.

Model mode for the weak view: **train mode**, as in the paper -- BatchNorm normalises the weak batch with its
own statistics (the paper's model labels in train mode too), and the running statistics see the weak and the
strong batches, as they see the paper's concatenated batch. Dropout and stochastic depth, if the recipe sets
them, are active in that pass as well. Two deliberate differences from the paper's one forward pass over
``[labelled, weak, strong]``: the engine forwards the labelled batch itself, and the weak and strong views go
through the model as two batches (weak under ``no_grad``, then strong), so each batch is normalised with its
own statistics and no gradient flows through the weak view's share of shared batch statistics. No EMA of the
weights here: the paper evaluates an EMA model, which is ``tricks.ema`` (the labels come from the trained
model, as in the paper). When no image passes the threshold the strong view still goes through the model
(under ``no_grad``: the same BatchNorm statistics and random draws, no wasted backward) and the term is 0.

The unlabelled stream (:class:`~medtricks.tricks.unlabeled_stream.TwoViewStream`, shared with Meta Pseudo
Labels): a loader of its own over the pool, re-made with
:class:`~medtricks.data.transforms.MultiView` (weak, strong) so that each item gives both views of one image,
shuffled by its own generator and augmented from its own Python ``random`` state, both re-seeded at the first
unlabelled batch of every epoch from the epoch's seed (``torch.initial_seed()`` after
:func:`~medtricks.train.engine.seed_epoch`). So a resumed run draws the same batches (the engine replays the
interrupted epoch from its seed; nothing of the trick needs to be in ``last.pt``), the stream is the same
whatever ``lambda_u`` is (common random numbers), and drawing it does not move the labelled loader's random
draws: at ``lambda_u: 0`` the batch is drawn but no view goes through the model, and the run trains exactly
as without the trick. A pool smaller than ``mu · B`` gives all its images each step.

Logged per epoch: ``train/fixmatch_mask_rate`` (the share of unlabelled images at or above the threshold) and,
where the pool knows the labels ``data.label_fraction`` withheld (its manifest's ``withheld_target``, read for
this monitoring only, never trained on), ``train/fixmatch_label_acc`` (accuracy of the pseudo-labels that
passed the mask: what the strong view trains on) and ``train/fixmatch_label_acc_all`` (of every weak-view
arg-max). Params: ``fixmatch.n_unlabeled``, ``fixmatch.unlabeled_batch`` (``mu · B`` or the pool),
``fixmatch.n_withheld_labels``.

Refused (:class:`~medtricks.errors.ConfigError` at the start of a run, or a recipe error at load): no
unlabelled pool, ``threshold`` outside (0, 1], ``mu`` < 1, a ``strong`` preset that does not exist, fewer than
2 unlabelled images per step (BatchNorm in train mode), and ``tricks.pseudo_label`` on at the same time (two
losses on the same unlabelled images, labelled two different ways).

Python::

    from medtricks.tricks.fixmatch import fixmatch_loss
    loss, labels, mask = fixmatch_loss(weak_logits, strong_logits, threshold=0.95)
"""

from __future__ import annotations

import torch

from medtricks.errors import ConfigError
from medtricks.tricks.keys.fixmatch import FixMatchConfig, FixMatchKeys
from medtricks.tricks.pseudo_label import pseudo_label_loss, pseudo_targets
from medtricks.tricks.unlabeled_stream import LabelMonitor, TwoViewStream, like_batch

__all__ = ["FixMatchConfig", "FixMatch", "fixmatch_loss"]


def fixmatch_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch's unlabelled term → ``(loss, pseudo-labels, mask)``: the weak view's arg-max as the label, kept
    where its top probability is ``>= threshold``, cross-entropy of the strong view's logits against it, summed
    over the kept images and divided by the *whole* batch (``mu · B``). ``weak_logits`` are detached."""
    labels, mask = pseudo_targets(weak_logits.detach(), threshold)
    return pseudo_label_loss(strong_logits, labels, mask), labels, mask


class FixMatch(FixMatchKeys):
    """Draws the unlabelled batches in two views and adds the masked loss of the strong one."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.cfg: FixMatchConfig = self.config.fixmatch
        pseudo = getattr(self.config, "pseudo_label", None)
        if getattr(pseudo, "enabled", False):
            raise ConfigError(
                "tricks.fixmatch and tricks.pseudo_label.enabled are both on: both add a loss on the "
                "same unlabelled images, labelled two different ways; switch one off "
                "(--set tricks.pseudo_label.enabled=false or --set tricks.fixmatch.enabled=false)"
            )
        self.stream = TwoViewStream(
            ctx.extras.get("unlabeled"), strong=self.cfg.strong, mu=self.cfg.mu, recipe=recipe, key="tricks.fixmatch"
        )
        self.pool, self.batch_size = self.stream.pool, self.stream.batch_size
        self.monitor = LabelMonitor(self.stream.withheld, "train/fixmatch")

    def log_params(self):
        return {
            "fixmatch.n_unlabeled": len(self.pool),
            "fixmatch.unlabeled_batch": self.batch_size,
            "fixmatch.n_withheld_labels": self.stream.known_labels(),
        }

    def extra_loss(self, model, images, targets, logits):
        weak, strong, index = self.stream.next(images.device)  # drawn even at lambda_u 0 (common random numbers)
        if self.cfg.lambda_u == 0:
            return None
        weak, strong = like_batch(weak, images), like_batch(strong, images)
        with torch.no_grad():  # the label: train mode, as the paper (see the module docstring)
            weak_logits = model(weak).float()
        labels, mask = pseudo_targets(weak_logits, self.cfg.threshold)
        self.monitor.count(labels, mask, index)
        if not bool(mask.any()):
            with torch.no_grad():  # the term is 0: the forward for BatchNorm's statistics, no backward
                model(strong)
            return None
        return self.cfg.lambda_u * pseudo_label_loss(model(strong), labels, mask)

    def on_epoch_end(self, epoch, metrics):
        self.monitor.write(metrics)
        self.stream.new_epoch()  # the next epoch re-seeds the unlabelled stream
