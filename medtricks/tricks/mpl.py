"""Meta Pseudo Labels as a trick (Pham et al., CVPR 2021):
``tricks.mpl: {enabled: true, mu: 7, strong: cxr_strong, finetune_epochs: 1}`` (the keys:
:mod:`medtricks.tricks.keys.mpl`).

The run's model is the **student**; the trick trains a **teacher** next to it -- at the start a copy of the
student as built (pretrained weights loaded, ``on_model`` tricks applied), or, with ``teacher: RUN``, the weights of
a finished run (same architecture, classes and normalisation: e.g. a supervised run on the same labels), with an optimizer and lr schedule of
its own (the run's optimizer, weight decay, no-bias-decay and schedule; ``teacher_lr`` or the run's lr). Each
training step (the engine's update) draws ``mu · B`` unlabelled images in a weak and a strong view
(:class:`~medtricks.tricks.unlabeled_stream.TwoViewStream`, the stream FixMatch uses) and:

1. **before the student's update** (``extra_loss``): the teacher, in train mode, sees the labelled batch, the
   weak and the strong views; its hard label on the strong view, ``ŷ = argmax T(x_strong)``, is what the student
   trains on: the student's loss is ``student_labeled_weight · L(S(x_l), y_l) + L(S(x_strong), ŷ)``
   (the paper: weight 0, the student never trains on the labels during MPL). The student's labelled loss before
   its update, ``L_old = L(S(x_l), y_l)``, is read from the engine's own forward pass (train mode).
2. **after the student's update** (``on_step_end``): ``L_new = L(S'(x_l), y_l)`` (train mode, no gradient) and
   the teacher's feedback ``h = L_old - L_new``; the teacher steps on::

       L_T = L(T(x_l), y_l) + w_uda(t) · UDA + h · CE(T(x_strong), ŷ)

   ``L`` is the run's own labelled loss -- class weights (``tricks.class_balance: loss``) and label smoothing
   included -- where the paper has plain cross-entropy: on an imbalanced set (Kermany: ~3 pneumonia per normal)
   a teacher on plain cross-entropy labelled nearly every pool image with the majority class within the few
   hundred steps a CPU run makes, and its student collapsed onto it (docs/few-labels.md). The MPL term itself
   is the log-likelihood of the teacher's label (the score-function gradient), plain cross-entropy.

   ``UDA`` is the paper's consistency term: cross-entropy of the teacher's strong view against its own weak-view
   prediction sharpened at ``uda_temperature``, masked where that prediction's confidence reaches
   ``uda_threshold``, averaged over the ``mu · B`` images; ``w_uda`` ramps linearly to ``uda_weight`` over
   ``uda_ramp_epochs``.

**Which form.** The first-order MPL update of the paper's appendix (and of its reference code): the
dot product of the student's gradients on the labelled batch and on the pseudo-labelled batch is approximated by
the change of its labelled loss across the real update, so the optimizer's preconditioning (momentum, AdamW) is
inside ``h``. The sign is the derivation's, ``h = L_old - L_new``: pseudo-labels whose step *lowered* the
student's labelled loss are reinforced (``h > 0``: the teacher descends its cross-entropy on ``ŷ``), labels
whose step *raised* it are pushed away from (``h < 0``). (The authors' released code uses ``L_new - L_old``;
MPL-pytorch issue 6 shows that flips the derivation's sign; this trick follows the derivation, and
``tests/tricks/test_mpl.py`` checks the direction on a toy problem.) Not the paper's "Reduced MPL" (a large
converged teacher distilled into a small one); no moving-average baseline for ``h``.

**Fine-tuning.** ``finetune_epochs: N``: the last N epochs train the student on the labelled images alone
(weight 1, no unlabelled term, the teacher frozen), continuing the run's lr schedule -- the paper fine-tunes the
student after MPL; the run's best-epoch selection on validation then chooses among all epochs.

**Resume.** The teacher's weights, its optimizer and scheduler state go into ``last.pt`` (``state_dict``); the
stream re-seeds at every epoch, so a run killed mid-epoch and resumed reaches the same student and teacher.

Logged per epoch: ``train/mpl_teacher_loss``, ``train/mpl_feedback`` (mean ``h``), ``train/mpl_uda_mask_rate``,
and where the pool knows its withheld labels, ``train/mpl_label_acc_all`` (accuracy of the teacher's ``ŷ``).
Params: ``mpl.n_unlabeled``, ``mpl.unlabeled_batch``, ``mpl.teacher_lr``.

Refused (:class:`~medtricks.errors.ConfigError` at the start of a run): no unlabelled pool,
``tricks.fixmatch`` or ``tricks.pseudo_label`` on at the same time, ``train.accumulate`` > 1 (the feedback
needs the student's update after each batch), ``train.cache_frozen`` (the teacher needs images, not cached
features), more than one torchrun process (the teacher is not data-parallel), and ``finetune_epochs`` that
leave no MPL epoch.

Python::

    from medtricks.tricks.mpl import mpl_teacher_loss, uda_loss
    loss = mpl_teacher_loss(teacher_strong_logits, pseudo_labels, feedback=h)
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F

import medtricks.train.distributed as distributed
from medtricks.errors import ConfigError
from medtricks.train.param_groups import build_optimizer, build_param_groups
from medtricks.train.schedules import build_scheduler, scaled_lr
from medtricks.tricks.distill import ScaledLoss
from medtricks.tricks.keys.mpl import MetaPseudoLabelsConfig, MetaPseudoLabelsKeys
from medtricks.tricks.unlabeled_stream import LabelMonitor, TwoViewStream, like_batch

__all__ = ["MetaPseudoLabelsConfig", "MetaPseudoLabels", "mpl_teacher_loss", "uda_loss", "teacher_feedback"]


def teacher_feedback(loss_before: torch.Tensor, loss_after: torch.Tensor) -> float:
    """The first-order MPL feedback ``h = L_old - L_new``: how much the student's update on the teacher's labels
    lowered its labelled loss (positive: the labels helped)."""
    return float(loss_before) - float(loss_after)


def mpl_teacher_loss(strong_logits: torch.Tensor, pseudo_labels: torch.Tensor, feedback: float) -> torch.Tensor:
    """The teacher's MPL term ``h · CE(T(x_strong), ŷ)`` (mean over the batch): with ``h > 0`` descending it
    makes the teacher more sure of ``ŷ``, with ``h < 0`` less."""
    return feedback * F.cross_entropy(strong_logits.float(), pseudo_labels)


def uda_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, *, temperature: float, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """UDA's consistency term (Xie et al. 2020, as MPL uses it) → ``(loss, mask)``: the weak view's prediction
    sharpened at ``temperature`` (no gradient) is the soft target of the strong view, where its top probability
    reaches ``threshold``; the mean over the whole batch, masked images counting zero."""
    target = F.softmax(weak_logits.detach().float() / temperature, dim=1)
    mask = target.max(dim=1).values >= threshold
    per_image = -(target * F.log_softmax(strong_logits.float(), dim=1)).sum(dim=1)
    return (per_image * mask.float()).mean(), mask


class MetaPseudoLabels(MetaPseudoLabelsKeys):
    """Trains a teacher next to the run's model; the model (student) learns from the teacher's labels."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.cfg: MetaPseudoLabelsConfig = self.config.mpl
        for other in ("fixmatch", "pseudo_label"):
            if getattr(getattr(self.config, other, None), "enabled", False):
                raise ConfigError(
                    f"tricks.mpl and tricks.{other}.enabled are both on: both add a loss on the same unlabelled "
                    f"images, labelled two different ways; switch one off (--set tricks.{other}.enabled=false)"
                )
        train = recipe.train
        if getattr(train, "accumulate", 1) > 1:
            raise ConfigError(
                f"tricks.mpl needs the student's update after every batch (the teacher learns from its effect); "
                f"train.accumulate is {train.accumulate}: set it to 1 (raise train.batch_size instead)"
            )
        if getattr(train, "cache_frozen", None) is not None:
            raise ConfigError(
                "tricks.mpl's teacher needs the images, and train.cache_frozen trains on cached features: "
                "switch one off (--set train.cache_frozen=null)"
            )
        if distributed.world_size() > 1:
            raise ConfigError("tricks.mpl's teacher does not train data-parallel (torchrun) yet: train in one process")
        if self.cfg.finetune_epochs >= train.epochs:
            raise ConfigError(
                f"tricks.mpl.finetune_epochs={self.cfg.finetune_epochs} leaves no MPL epoch of "
                f"train.epochs={train.epochs}: lower it below train.epochs"
            )
        self._teacher_start = self._load_teacher_start(ctx) if self.cfg.teacher else None
        self.stream = TwoViewStream(
            ctx.extras.get("unlabeled"), strong=self.cfg.strong, mu=self.cfg.mu, recipe=recipe, key="tricks.mpl"
        )
        self.monitor = LabelMonitor(self.stream.withheld, "train/mpl")
        batch = recipe.train.batch_size * distributed.world_size()
        self.teacher_lr = self.cfg.teacher_lr or scaled_lr(recipe.optim.lr, batch, recipe.optim.linear_scaling)
        self.mpl_epochs = train.epochs - self.cfg.finetune_epochs
        self.epoch = 0
        self.teacher = self.optimizer = self.scheduler = None
        self._pending: Optional[dict] = None
        self._scale: Optional[ScaledLoss] = None
        self._scaler: Optional[torch.amp.GradScaler] = None
        self._reset_sums()

    def _load_teacher_start(self, ctx) -> dict:
        """The weights of the finished run ``tricks.mpl.teacher``, checked against this run's classes and
        normalisation (the teacher sees the student's batches as they are)."""
        ref = self.cfg.teacher
        if ctx.load_run is None:
            raise ConfigError(
                f"tricks.mpl.teacher={ref!r}: loading a finished run needs TrickContext(load_run=...) (medtricks "
                "run gives it); in Python pass load_run=medtricks.posthoc.load.load_trained"
            )
        trained = ctx.load_run(ref, device="cpu")
        if list(trained.classes) != list(ctx.classes):
            raise ConfigError(
                f"tricks.mpl.teacher={ref!r} predicts classes {list(trained.classes)}, this run "
                f"{list(ctx.classes)}: the teacher labels the student's classes, so they must be the same"
            )
        config = trained.data_config
        for key, mine in (("mean", ctx.mean), ("std", ctx.std)):
            theirs = config.get(key)
            if (
                mine is not None
                and theirs is not None
                and not torch.allclose(
                    torch.tensor([float(v) for v in theirs]), torch.tensor([float(v) for v in mine]), atol=1e-6
                )
            ):
                raise ConfigError(
                    f"tricks.mpl.teacher={ref!r} was trained with input {key} {tuple(theirs)}, this run uses "
                    f"{tuple(mine)}: the teacher sees the student's batches, so the normalisation must match"
                )
        self.teacher_run = str(trained.run_id or trained.run_dir)
        return {k: v.detach().clone() for k, v in trained.model.state_dict().items()}

    def log_params(self):
        return {
            "mpl.n_unlabeled": len(self.stream.pool),
            "mpl.unlabeled_batch": self.stream.batch_size,
            "mpl.teacher_lr": self.teacher_lr,
            "mpl.n_withheld_labels": self.stream.known_labels(),
            **({"mpl.teacher_run": self.teacher_run} if self._teacher_start is not None else {}),
        }

    # ---- the student's labelled loss: scaled during MPL, whole while fine-tuning
    def transform_loss_fn(self, loss_fn):
        self._scale = ScaledLoss(loss_fn, self._labeled_weight())
        return self._scale

    def _run_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The run's own labelled loss, unscaled: class weights (``tricks.class_balance: loss``) and label
        smoothing included, so that the teacher learns -- and the feedback measures -- what the run optimises
        (plain cross-entropy without a run loss, as in the paper)."""
        inner = self._scale.loss_fn if self._scale is not None else None
        return inner(logits, targets) if inner is not None else F.cross_entropy(logits, targets)

    def _run_loss_on_labels(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The run's loss on hard labels (one-hot for a soft-target loss: mixup's)."""
        inner = self._scale.loss_fn if self._scale is not None else None
        if inner is None or isinstance(inner, torch.nn.CrossEntropyLoss):
            return self._run_loss(logits, labels)
        return inner(logits, F.one_hot(labels, logits.shape[1]).to(logits.dtype))

    def _labeled_weight(self) -> float:
        return 1.0 if self.epoch >= self.mpl_epochs else self.cfg.student_labeled_weight

    def _set_phase(self, epoch: int) -> None:
        self.epoch = epoch
        if self._scale is not None:
            self._scale.scale = float(self._labeled_weight())

    # ---- the teacher
    def on_fit_start(self, model):
        self.teacher = copy.deepcopy(model).train()
        if self._teacher_start is not None:
            try:
                self.teacher.load_state_dict(self._teacher_start, strict=True)
            except RuntimeError as error:
                raise ConfigError(
                    f"tricks.mpl.teacher={self.cfg.teacher!r}: its weights do not fit this run's model "
                    f"({getattr(getattr(self.recipe, 'model', None), 'name', '?')}): {str(error).splitlines()[0]}"
                ) from error
        optim = self.recipe.optim
        groups = build_param_groups(
            self.teacher,
            weight_decay=optim.weight_decay,
            no_bias_decay=bool(getattr(self.config, "no_bias_decay", False)),
        )
        self.optimizer = build_optimizer(
            groups, name=optim.name, lr=self.teacher_lr, momentum=optim.momentum, betas=optim.betas
        )
        self.scheduler = build_scheduler(self.optimizer, **self.ctx.extras["schedule_kwargs"])  # the run's
        self._steps = 0
        self._set_phase(0)

    def state_dict(self):
        return {
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps": self._steps,
            "next_epoch": self.epoch + 1,  # called once the epoch is done, before on_epoch_end
        }

    def load_state_dict(self, state):
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._steps = int(state["steps"])
        self._set_phase(int(state["next_epoch"]))

    def _uda_weight(self) -> float:
        per_epoch = max(int(self.ctx.extras.get("updates_per_epoch") or 1), 1)
        ramp = self.cfg.uda_ramp_epochs * per_epoch
        return self.cfg.uda_weight * (min(1.0, (self._steps + 1) / ramp) if ramp > 0 else 1.0)

    def extra_loss(self, model, images, targets, logits):
        if self.epoch >= self.mpl_epochs:  # fine-tuning: the labelled loss alone
            return None
        weak, strong, index = self.stream.next(images.device)
        weak, strong = like_batch(weak, images), like_batch(strong, images)
        n_l, n_u = images.shape[0], weak.shape[0]
        self.teacher.train()
        if images.shape[1:] == weak.shape[1:]:  # one batch, as the paper
            t_logits = self.teacher(torch.cat([images, weak, strong])).float()
            t_labeled, t_weak, t_strong = t_logits[:n_l], t_logits[n_l : n_l + n_u], t_logits[n_l + n_u :]
        else:  # progressive resizing: the labelled batch is at this epoch's size, the pool at the recipe's
            t_labeled = self.teacher(images).float()
            t_weak, t_strong = self.teacher(torch.cat([weak, strong])).float().split(n_u)
        uda, uda_mask = uda_loss(
            t_weak, t_strong, temperature=self.cfg.uda_temperature, threshold=self.cfg.uda_threshold
        )
        pseudo = t_strong.detach().argmax(dim=1)
        self.monitor.count(pseudo, torch.ones_like(pseudo, dtype=torch.bool), index)
        self._pending = {
            "images": images.detach(),
            "targets": targets.detach(),
            "loss_before": self._run_loss(logits.detach().float(), targets),
            "teacher_base": self._run_loss(t_labeled, targets) + self._uda_weight() * uda,
            "t_strong": t_strong,
            "pseudo": pseudo,
            "scaler": self._scaler_for(images.device),
        }
        self._uda_seen += int(uda_mask.numel())
        self._uda_passed += int(uda_mask.sum())
        return self._run_loss_on_labels(model(strong).float(), pseudo)

    def _scaler_for(self, device) -> Optional[torch.amp.GradScaler]:
        """A GradScaler for the teacher when the engine's autocast runs in float16 (CUDA AMP), else None."""
        kind = torch.device(device).type
        if not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16):
            return None
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler(kind)
        return self._scaler

    def on_step_end(self, model, step):
        pending, self._pending = self._pending, None
        if pending is None:
            return
        with torch.no_grad():  # the student after its update, in train mode as its loss before it
            loss_after = self._run_loss(model(pending["images"]).float(), pending["targets"])
        feedback = teacher_feedback(pending["loss_before"], loss_after)
        loss = pending["teacher_base"] + mpl_teacher_loss(pending["t_strong"], pending["pseudo"], feedback)
        loss_value = float(loss.detach())  # one host sync: the finiteness check and the epoch mean
        if not math.isfinite(loss_value):
            raise ConfigError(
                f"tricks.mpl: the teacher's loss is {loss_value} at update {step}; lower tricks.mpl.teacher_lr "
                "or optim.lr, or set train.grad_clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        scaler = pending["scaler"]
        (scaler.scale(loss) if scaler else loss).backward()
        clip = getattr(self.recipe.train, "grad_clip", None)
        if clip:
            if scaler:
                scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.teacher.parameters(), clip)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self._steps += 1
        self.scheduler.step_update(self._steps)
        self._feedback_sum += feedback
        self._loss_sum += loss_value
        self._updates += 1

    # ---- monitoring
    def _reset_sums(self) -> None:
        self._feedback_sum = self._loss_sum = 0.0
        self._updates = self._uda_seen = self._uda_passed = 0

    def on_epoch_end(self, epoch, metrics):
        if self._updates:
            metrics["train/mpl_feedback"] = self._feedback_sum / self._updates
            metrics["train/mpl_teacher_loss"] = self._loss_sum / self._updates
        if self._uda_seen:
            metrics["train/mpl_uda_mask_rate"] = self._uda_passed / self._uda_seen
        self.monitor.write(metrics)
        metrics.pop("train/mpl_mask_rate", None)  # every teacher label trains the student: the rate is 1
        metrics.pop("train/mpl_label_acc", None)  # the same as _all
        self._reset_sums()
        self.stream.new_epoch()
        self._set_phase(epoch + 1)
