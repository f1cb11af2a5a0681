"""Pseudo-labelling as a trick (Lee 2013; the confidence mask of FixMatch, Sohn et al. 2020):
``tricks.pseudo_label: {enabled: true, threshold: 0.95, soft: false, weight: 1.0, weight_ramp: 0, teacher: null}``.

Every training batch also draws a batch of *unlabelled* images -- the training images that
``data.label_fraction`` / ``data.label_count`` left without a label, plus the folder ``data.unlabeled``
(the run hands the pool to the trick as ``TrickContext.extras["unlabeled"]``). The labeller -- the
model being trained (eval mode, ``no_grad``, its train mode put back) or a ``teacher`` run (as for
``tricks.distill``: a run folder / run id, converted to its input size and normalisation) -- predicts
them; an image whose top probability is ``>= threshold`` keeps its pseudo-label, the others are masked
out. The loss of the batch gains::

    w(t) · (1 / B_u) · Σ_i 1[max p_i >= threshold] · CE(student(x_i), ŷ_i)

averaged over the whole unlabelled batch (masked images count as zero, as in FixMatch: a strict
threshold lowers the term's weight). ``soft: true`` uses the labeller's probabilities as the target
(soft-target cross-entropy) instead of its arg-max. ``w(t) = weight · min(1, t / weight_ramp)`` with
``t`` the finished updates in epochs (Lee's ramp; ``weight_ramp: 0`` = full weight from the start).

The labeller and the student see the same (training-augmented) view of each image. The student's
forward pass on the unlabelled batch is in train mode, so its BatchNorm statistics also see those
images (as FixMatch). The unlabelled loader has its own generator, re-seeded at the first unlabelled
batch of every epoch from the seed the engine gives the epoch (``torch.initial_seed()`` after
:func:`~medtricks.train.engine.seed_epoch`), and the update count is in ``state_dict``: a resumed run
draws the same unlabelled batches with the same weights. The share of unlabelled images kept is
added to each epoch's metrics as ``train/pseudo_kept`` (and the weight as ``train/pseudo_weight``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import DataLoader

from medtricks._schema import Section
from medtricks.errors import ConfigError
from medtricks.tricks.base import AblationName, Trick, register_trick
from medtricks.tricks.distill import teacher_for

__all__ = ["PseudoLabelConfig", "PseudoLabel", "pseudo_targets", "pseudo_label_loss"]

_SEED_OFFSET = 7_919  # the unlabelled stream is not the training loader's stream


class PseudoLabelConfig(Section):
    """``tricks.pseudo_label``."""

    enabled: bool = False
    threshold: float = Field(0.95, ge=0.0, le=1.0)
    soft: bool = False
    weight: float = Field(1.0, ge=0.0)
    weight_ramp: float = Field(0.0, ge=0.0)  # epochs over which the weight rises linearly from 0
    teacher: Optional[str] = None  # null: the model being trained labels; else a run folder / run id
    batch_size: Optional[int] = Field(None, ge=1)  # unlabelled images per batch; default train.batch_size


def pseudo_targets(logits: torch.Tensor, threshold: float, soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The labeller's ``logits`` → (targets, kept mask): arg-max class (or the probabilities with
    ``soft``) and ``max prob >= threshold``."""
    probs = F.softmax(logits.float(), dim=1)
    confidence, hard = probs.max(dim=1)
    return (probs if soft else hard), confidence >= threshold


def pseudo_label_loss(student_logits: torch.Tensor, targets: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Masked cross-entropy averaged over the whole unlabelled batch (masked images count 0)."""
    log_p = F.log_softmax(student_logits.float(), dim=1)
    per_image = -(targets * log_p).sum(1) if targets.dim() == 2 else F.nll_loss(log_p, targets, reduction="none")
    return (per_image * kept.float()).sum() / max(student_logits.shape[0], 1)


@register_trick
class PseudoLabel(Trick):
    name = "pseudo_label"
    order = 86  # after distillation: both add terms to the loss
    fields = {"pseudo_label": (PseudoLabelConfig, Field(default_factory=PseudoLabelConfig))}
    ablation = {"pseudo_label": AblationName("tricks.pseudo_label.enabled", "true",
                                             "pseudo-labels on the unlabelled pool (data.label_fraction / "
                                             "data.unlabeled); threshold etc.: tricks.pseudo_label.*")}

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.cfg: PseudoLabelConfig = self.config.pseudo_label
        self.pool = ctx.extras.get("unlabeled")
        if self.pool is None or len(self.pool) == 0:
            raise ConfigError("tricks.pseudo_label needs unlabelled images: set data.label_fraction (or "
                              "data.label_count) below the whole training split, or data.unlabeled: {root: FOLDER}")
        self.teacher = None
        if self.cfg.teacher is not None:
            self.teacher = teacher_for(recipe, ctx, self.cfg.teacher, key="tricks.pseudo_label.teacher")
        train = getattr(recipe, "train", None)
        self.batch_size = self.cfg.batch_size or getattr(train, "batch_size", None) or 32
        self.batch_size = min(self.batch_size, len(self.pool))
        data = getattr(recipe, "data", None)
        self.generator = torch.Generator()
        self.loader = DataLoader(self.pool, batch_size=self.batch_size, shuffle=True, generator=self.generator,
                                 num_workers=getattr(data, "num_workers", 0) or 0, drop_last=True)
        self._iter = None
        self.step = 0
        self._kept = self._seen = 0

    @classmethod
    def tags(cls, recipe):
        cfg = recipe.tricks.pseudo_label
        return [f"pseudo_label@{cfg.threshold:g}{'(soft)' if cfg.soft else ''}"] if cfg.enabled else []

    def log_params(self):
        return {"pseudo_label.n_unlabeled": len(self.pool), "pseudo_label.batch_size": self.batch_size}

    def on_fit_start(self, model):
        if self.teacher is not None:
            self.teacher.to(next(model.parameters()).device)

    # ---- the weight
    def current_weight(self) -> float:
        if self.cfg.weight_ramp <= 0:
            return self.cfg.weight
        per_epoch = self.ctx.extras.get("updates_per_epoch")
        if not per_epoch:
            raise ConfigError("tricks.pseudo_label.weight_ramp needs the updates per epoch "
                              "(TrickContext.extras['updates_per_epoch'], set by medtricks.run)")
        return self.cfg.weight * min(1.0, self.step / (self.cfg.weight_ramp * per_epoch))

    # ---- the unlabelled stream
    def _next_batch(self, device) -> torch.Tensor:
        if self._iter is None:  # first unlabelled batch of the epoch
            self.generator.manual_seed((torch.initial_seed() + _SEED_OFFSET) % (2**63))
            self._iter = iter(self.loader)
        try:
            images, _ = next(self._iter)
        except StopIteration:  # the pool is smaller than an epoch of batches: go round again
            self._iter = iter(self.loader)
            images, _ = next(self._iter)
        return images.to(device, non_blocking=True)

    def _label(self, model, images) -> torch.Tensor:
        if self.teacher is not None:
            return self.teacher(images)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(images).float()
        finally:
            model.train(was)

    def extra_loss(self, model, images, targets, logits):
        weight = self.current_weight()
        unlabeled = self._next_batch(images.device)  # drawn even at weight 0: the stream does not depend on it
        if unlabeled.dim() == 4 and images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) \
                and not images.is_contiguous():
            unlabeled = unlabeled.contiguous(memory_format=torch.channels_last)
        labels, kept = pseudo_targets(self._label(model, unlabeled), self.cfg.threshold, self.cfg.soft)
        self._kept += int(kept.sum())
        self._seen += int(kept.numel())
        if weight == 0 or not bool(kept.any()):
            return None
        return weight * pseudo_label_loss(model(unlabeled), labels, kept)

    def after_step(self, model, step):
        self.step = step

    def on_epoch_end(self, epoch, metrics):
        metrics["train/pseudo_kept"] = self._kept / max(self._seen, 1)
        metrics["train/pseudo_weight"] = self.current_weight()
        self._kept = self._seen = 0
        self._iter = None  # the next epoch re-seeds the unlabelled stream

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state.get("step", 0))
