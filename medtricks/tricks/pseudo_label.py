"""Pseudo-labelling as a trick (Lee 2013; the confidence mask of FixMatch, Sohn et al. 2020; the clean
teacher of Noisy Student, Xie et al. 2020): ``tricks.pseudo_label: {enabled: true, threshold: 0.95, soft: false,
weighting: none, weight: 1.0, weight_ramp: 0, teacher: null}`` (the keys: :mod:`medtricks.tricks.keys.pseudo_label`).

Every training batch also draws a batch of *unlabelled* images -- the training images that
``data.label_fraction`` / ``data.label_count`` left without a label, plus the folder ``data.unlabeled``
(the run hands the pool to the trick as ``TrickContext.extras["unlabeled"]``). The labeller -- the
model being trained (eval mode, ``no_grad``, its train mode put back) or a ``teacher`` run (as for
``tricks.distill``: a run folder / run id, converted to its input size and normalisation; always in eval
mode, so no dropout and no stochastic depth) -- predicts them; an image whose top probability is
``>= threshold`` keeps its pseudo-label, the others are masked out. The loss of the batch gains::

    w(t) · (1 / B_u) · Σ_i 1[c_i >= threshold] · a_i · CE(student(x̃_i), ŷ_i),   c_i = max_k p_ik

averaged over the whole unlabelled batch (masked images count as zero, as in FixMatch: a strict
threshold lowers the term's weight). ``soft: true`` uses the labeller's probabilities ``p_i`` as the
target (soft-target cross-entropy, Noisy Student's default) instead of their arg-max. ``weighting``
sets ``a_i``: ``none`` → 1; ``confidence`` → ``c_i``, the labeller's top probability, so an image the
teacher is unsure of pulls less (with hard or soft targets, and on top of the threshold). The sum is
divided by the batch *count* ``B_u``, not by ``Σ a_i``: dividing by the weights' sum would rescale
every batch back to a full-weight term, so a batch of doubtful labels would pull as hard as a batch of
sure ones -- the opposite of what the weighting is for -- and one kept image would get the whole
term; by count, the term is at most the unweighted one, each image's weight depends on its own
confidence only (not on the rest of its batch), and ``weight`` keeps its meaning.
``w(t) = weight · min(1, t / weight_ramp)`` with ``t`` the finished updates in epochs (Lee's ramp;
``weight_ramp: 0`` = full weight from the start).

Two views, as Noisy Student: the labeller sees each unlabelled image *clean* -- the run's evaluation
transform (pre-resize, center crop, normalisation; no augmentation) -- and the student trains on the
*augmented* view ``x̃_i`` of the same image (the training preset: the noise, with the student's dropout
and stochastic depth). The pool dataset (an :class:`~medtricks.data.datasets.XrayDataset` with the
training transform) is re-made with :class:`~medtricks.data.transforms.MultiView` (training
transform first, then the eval transform, which draws no random numbers), so the augmented views, the
order and the seeds of the unlabelled stream are those of the single-view stream. A pool that cannot be
re-viewed (a plain dataset of tensors, as in tests) is used as it is: the labeller and the student see
what it yields (a pool whose items are ``((augmented, clean), target)`` gives its own two views). The run logs which
(``pseudo_label.teacher_input``: ``clean``, or ``pool`` for a dataset the trick could not re-view);
runs made before this rule labelled the augmented view and have no such param.

The student's forward pass on the unlabelled batch is in train mode, so its BatchNorm statistics also
see those images (as FixMatch). The unlabelled loader has its own generator, re-seeded at the first unlabelled
batch of every epoch from the seed the engine gives the epoch (``torch.initial_seed()`` after
:func:`~medtricks.train.engine.seed_epoch`), and the update count is in ``state_dict``: a resumed run
draws the same unlabelled batches with the same weights. The share of unlabelled images kept is
added to each epoch's metrics as ``train/pseudo_kept`` (and the weight as ``train/pseudo_weight``).

Where it still differs from Noisy Student: see :mod:`medtricks.self_train` (the labeller runs online on
every batch rather than once over the pool -- the same labels, since a frozen eval-mode teacher on a
deterministic clean view gives the same output each time, at the cost of a teacher forward per batch;
no per-class balancing of the pseudo-labelled data; ``soft: false`` and ``threshold: 0.95`` by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from medtricks.data.transforms import MultiView, build_transforms
from medtricks.errors import ConfigError
from medtricks.tricks.distill import teacher_for
from medtricks.tricks.keys.pseudo_label import WEIGHTINGS, PseudoLabelConfig, PseudoLabelKeys

__all__ = [
    "PseudoLabelConfig",
    "PseudoLabel",
    "two_view_pool",
    "pseudo_targets",
    "pseudo_weights",
    "pseudo_label_loss",
    "WEIGHTINGS",
]

_SEED_OFFSET = 7_919  # the unlabelled stream is not the training loader's stream


def pseudo_targets(logits: torch.Tensor, threshold: float, soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The labeller's ``logits`` → (targets, kept mask): arg-max class (or the probabilities with
    ``soft``) and ``max prob >= threshold``."""
    probs = F.softmax(logits.float(), dim=1)
    confidence, hard = probs.max(dim=1)
    return (probs if soft else hard), confidence >= threshold


def pseudo_weights(logits: torch.Tensor, threshold: float, weighting: str = "none") -> torch.Tensor:
    """Per-image weights of the unlabelled loss from the labeller's ``logits``: ``1[c_i >= threshold]``
    (``weighting="none"``) or ``1[c_i >= threshold] · c_i`` (``"confidence"``), ``c_i`` the top probability."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"tricks.pseudo_label.weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    confidence = F.softmax(logits.float(), dim=1).max(dim=1).values
    kept = (confidence >= threshold).float()
    return kept * confidence if weighting == "confidence" else kept


def pseudo_label_loss(student_logits: torch.Tensor, targets: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Masked (or weighted) cross-entropy summed over the unlabelled batch and divided by its size:
    ``(1/B) Σ_i kept_i · CE_i``. ``kept``: the boolean mask, or per-image weights (:func:`pseudo_weights`);
    ``targets``: class indices, or probabilities (soft targets)."""
    log_p = F.log_softmax(student_logits.float(), dim=1)
    per_image = -(targets * log_p).sum(1) if targets.dim() == 2 else F.nll_loss(log_p, targets, reduction="none")
    return (per_image * kept.float()).sum() / max(student_logits.shape[0], 1)


def _eval_transform_of(transform):
    """The run's eval transform that matches a training transform (:class:`~medtricks.data.transforms.
    XrayTransform`: same preset, size, channels and normalisation, ``train=False``), or None when
    ``transform`` is not one."""
    needed = ("preset", "image_size", "mean", "std", "in_chans", "train")
    if not all(hasattr(transform, key) for key in needed):
        return None
    return build_transforms(
        transform.preset,
        transform.image_size,
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
        in_chans=transform.in_chans,
        train=False,
    )


def two_view_pool(pool):
    """``(dataset, teacher_input)``: the pool re-made to yield ``((augmented, clean), target)`` -- its
    training transform, then the matching eval transform (:class:`~medtricks.data.transforms.MultiView`) --
    when it is an :class:`~medtricks.data.datasets.XrayDataset` with an augmenting transform (``"clean"``);
    the pool itself when its transform already is the eval one (``"clean"``: one view serves both) or when
    it cannot be re-viewed (``"pool"``). The pool passed in is not changed (other tricks read it too)."""
    transform = getattr(pool, "transform", None)
    if callable(getattr(pool, "with_transform", None)) and hasattr(transform, "train"):
        if not transform.train or getattr(transform, "random", True) is False:  # no augmentation to take off
            return pool, "clean"
        clean = _eval_transform_of(transform)
        if clean is not None:  # the training transform first: its random draws are those of the one-view pool
            return pool.with_transform(MultiView(transform, clean)), "clean"
    return pool, "pool"


class PseudoLabel(PseudoLabelKeys):
    """Draws the unlabelled batches, labels their clean view and adds the masked loss of their augmented view."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.cfg: PseudoLabelConfig = self.config.pseudo_label
        self.pool = ctx.extras.get("unlabeled")
        if self.pool is None or len(self.pool) == 0:
            raise ConfigError(
                "tricks.pseudo_label needs unlabelled images: set data.label_fraction (or "
                "data.label_count) below the whole training split, or data.unlabeled: {root: FOLDER}"
            )
        # the labeller's input: the clean (eval-transform) view; the student's: the augmented one
        self.views, self.teacher_input = two_view_pool(self.pool)
        self.teacher = None
        if self.cfg.teacher is not None:
            self.teacher = teacher_for(recipe, ctx, self.cfg.teacher, key="tricks.pseudo_label.teacher")
        train = getattr(recipe, "train", None)
        self.batch_size = self.cfg.batch_size or getattr(train, "batch_size", None) or 32
        self.batch_size = min(self.batch_size, len(self.pool))
        data = getattr(recipe, "data", None)
        self.generator = torch.Generator()
        self.loader = DataLoader(
            self.views,
            batch_size=self.batch_size,
            shuffle=True,
            generator=self.generator,
            num_workers=getattr(data, "num_workers", 0) or 0,
            drop_last=True,
        )
        self._iter = None
        self.step = 0
        self._kept = self._seen = 0

    def log_params(self):
        # teacher_input: what the labeller sees (clean = the eval transform's view; runs before this param
        # labelled the augmented view the student trains on)
        return {
            "pseudo_label.n_unlabeled": len(self.pool),
            "pseudo_label.batch_size": self.batch_size,
            "pseudo_label.teacher_input": self.teacher_input,
        }

    def on_fit_start(self, model):
        if self.teacher is not None:
            self.teacher.to(next(model.parameters()).device)

    # ---- the weight
    def current_weight(self) -> float:
        if self.cfg.weight_ramp <= 0:
            return self.cfg.weight
        per_epoch = self.ctx.extras.get("updates_per_epoch")
        if not per_epoch:
            raise ConfigError(
                "tricks.pseudo_label.weight_ramp needs the updates per epoch "
                "(TrickContext.extras['updates_per_epoch'], set by medtricks.run)"
            )
        return self.cfg.weight * min(1.0, self.step / (self.cfg.weight_ramp * per_epoch))

    # ---- the unlabelled stream
    def _next_batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The next unlabelled batch as ``(student view, labeller view)`` on ``device``: the augmented and the
        clean view of the same images (the same tensor twice for a pool with one view)."""
        if self._iter is None:  # first unlabelled batch of the epoch
            self.generator.manual_seed((torch.initial_seed() + _SEED_OFFSET) % (2**63))
            self._iter = iter(self.loader)
        try:
            images, _ = next(self._iter)
        except StopIteration:  # the pool is smaller than an epoch of batches: go round again
            self._iter = iter(self.loader)
            images, _ = next(self._iter)
        if isinstance(images, (list, tuple)):
            noised, clean = images
        else:
            noised = clean = images
        noised = noised.to(device, non_blocking=True)
        return noised, (noised if clean is noised else clean.to(device, non_blocking=True))

    def _label(self, model, images) -> torch.Tensor:
        if self.teacher is not None:
            return self.teacher(images)  # eval mode, no_grad (Teacher.__call__)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(images).float()
        finally:
            model.train(was)

    def extra_loss(self, model, images, targets, logits):
        weight = self.current_weight()
        # drawn even at weight 0: the stream does not depend on it
        noised, clean = self._next_batch(images.device)
        if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
            noised, clean = (
                x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in (noised, clean)
            )
        labeller = self._label(model, clean)
        labels, kept = pseudo_targets(labeller, self.cfg.threshold, self.cfg.soft)
        self._kept += int(kept.sum())
        self._seen += int(kept.numel())
        if weight == 0 or not bool(kept.any()):
            return None
        weights = pseudo_weights(labeller, self.cfg.threshold, self.cfg.weighting)
        return weight * pseudo_label_loss(model(noised), labels, weights)

    def on_step_end(self, model, step):
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
