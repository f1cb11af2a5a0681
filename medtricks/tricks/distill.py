"""Knowledge distillation as a trick (Hinton et al. 2015; He et al. CVPR 2019 §5.3):
``tricks.distill: {teacher: RUN_OR_MODEL, temperature: T, alpha: a}`` (the keys: :mod:`medtricks.tricks.keys.distill`).

The loss of a batch with student logits ``z_s``, teacher logits ``z_t`` and labels ``y`` is::

    a · CE(z_s, y)  +  (1 − a) · T² · KL( softmax(z_t / T) ‖ softmax(z_s / T) )

Hinton's form: the KL divergence from the teacher's softened distribution to the student's (equal to
the soft-target cross-entropy minus the teacher's entropy, a constant, so the gradients are the same
and the term is 0 when the student matches the teacher), averaged over the batch, and multiplied by
``T²`` so that its gradient keeps the scale of the hard-label term when ``T`` changes. ``a = 1`` is
plain training; He et al. add the two terms unweighted (``a = 0.5`` up to a factor 2, with T = 20). The CE
term is whatever loss the run builds (label smoothing, mixup's soft targets, class weights), scaled by
``a`` (``transform_loss_fn``); the KL term is added by ``extra_loss``, where the teacher's logits are computed.

The teacher is

* a finished medtricks run: its folder, a file in it, or its run id (local run store or MLflow,
  :func:`medtricks.posthoc.load.load_trained`); its classes must be the student's; or
* a model spec ``model:NAME`` (any name ``medtricks.models.create_model`` takes) with ``weights``
  (``file:/path/ckpt.pth`` ...) -- a head for the student's classes must be in those weights to teach
  anything.

It is kept apart from the student: in eval mode (put back in eval mode before every batch, whatever
``model.train()`` the engine calls on the student), its parameters ``requires_grad=False``, under
``torch.no_grad()``, never in the optimizer or the checkpoints. It sees *the images the student trains
on* (after mixup/cutmix -- the teacher then labels the mixed image, which is what Beyer et al. 2022's
"consistent teaching" recommends -- and after an adversarial perturbation): the batch is mapped back to
pixels with the student's normalisation (``x = z · std + mean``, the loader's ``TrickContext``
mean/std), to the teacher's channels (grey → repeated to 3, RGB → channel mean), resized with
``F.interpolate`` (bilinear, antialiased) to the teacher's input size (its run's
``input_image_size()``, or ``image_size``), and normalised with the teacher's own mean/std (its run's
``data_config``). So teacher and student may differ in architecture, input size, channels and
normalisation. No per-image logit cache: with augmentation on, each epoch's images differ, and the
teacher forward (no backward) is cheap next to the student's step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medtricks.errors import ConfigError, MedtricksError
from medtricks.models import create_model, get_data_config
from medtricks.tricks.keys.distill import DistillationKeys, DistillConfig

__all__ = ["DistillConfig", "Distillation", "Teacher", "load_teacher", "distillation_kl", "ScaledLoss"]

MODEL_PREFIX = "model:"


class Teacher:
    """A frozen model that labels the student's batches (distillation, pseudo-labels): it takes images
    normalised for the *student* and returns its logits, converting channels, size and normalisation.

    ``model`` is put in eval mode with ``requires_grad=False`` on every parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean,
        std,
        in_chans: int,
        image_size: int,
        student_mean,
        student_std,
        source: str = "",
        classes: Optional[list[str]] = None,
    ):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.student_mean = torch.tensor(tuple(student_mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.student_std = torch.tensor(tuple(student_std), dtype=torch.float32).view(1, -1, 1, 1)
        self.in_chans, self.image_size, self.source, self.classes = in_chans, int(image_size), source, classes

    def to(self, device) -> "Teacher":
        self.model.to(device)
        for name in ("mean", "std", "student_mean", "student_std"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised ``images`` → the teacher's input (channels, size, normalisation)."""
        x = images.float() * self.student_std.to(images.device) + self.student_mean.to(images.device)
        if x.shape[1] != self.in_chans:
            if self.in_chans == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif self.in_chans == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ConfigError(
                    f"teacher {self.source!r} takes {self.in_chans} channel(s); the batch has {x.shape[1]}"
                )
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            shrink = self.image_size < min(x.shape[-2:])
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=shrink
            )
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        if mean.shape[1] != x.shape[1]:  # a grey normalisation given to an RGB model, or the reverse
            mean, std = (
                mean.mean(1, keepdim=True).expand(1, x.shape[1], 1, 1),
                std.mean(1, keepdim=True).expand(1, x.shape[1], 1, 1),
            )
        return (x - mean) / std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()  # whatever happened to the student, the teacher stays in eval mode
        return self.model(self.inputs(images)).float()


def load_teacher(
    ref: str,
    *,
    classes: list[str],
    student_mean,
    student_std,
    device=None,
    weights: str = "none",
    image_size: Optional[int] = None,
    student_size: Optional[int] = None,
    student_in_chans: int = 1,
    key: str = "tricks.distill.teacher",
    load_run: Optional[Callable[..., Any]] = None,
) -> Teacher:
    """A :class:`Teacher` from a finished run (folder, file in it, run id) or ``model:NAME``.

    ``load_run(ref, device=...)`` loads a finished run (``medtricks.posthoc.load.load_trained``, given by the
    run through :class:`~medtricks.tricks.base.TrickContext`; tricks do not import the orchestration).
    Errors name ``key`` and what was expected (an unknown run, other classes).
    """
    ref = str(ref).strip()
    if ref.startswith(MODEL_PREFIX):
        name = ref[len(MODEL_PREFIX) :]
        try:
            model = create_model(name, weights=weights, num_classes=len(classes), in_chans=student_in_chans)
        except MedtricksError as err:
            raise ConfigError(f"{key}={ref!r}: cannot build the teacher model ({err})") from err
        except Exception as err:  # noqa: BLE001 - timm's unknown-model error names the model
            raise ConfigError(f"{key}={ref!r}: cannot build the teacher model ({type(err).__name__}: {err})") from err
        config = get_data_config(model)
        size = image_size or student_size or int(config["input_size"][-1])
        teacher = Teacher(
            model,
            mean=config["mean"],
            std=config["std"],
            in_chans=student_in_chans,
            image_size=size,
            student_mean=student_mean,
            student_std=student_std,
            source=ref,
            classes=list(classes),
        )
        return teacher.to(device) if device is not None else teacher

    if load_run is None:
        raise ConfigError(
            f"{key}={ref!r}: loading a finished run needs TrickContext(load_run=...) (medtricks run "
            "gives it); in Python pass load_run=medtricks.posthoc.load.load_trained, or use model:NAME"
        )
    try:
        trained = load_run(ref, device=str(device or "cpu"))
    except MedtricksError as err:
        raise ConfigError(f"{key}={ref!r}: not a finished run folder or run id, nor model:NAME ({err})") from err
    if list(trained.classes) != list(classes):
        raise ConfigError(
            f"{key}={ref!r}: the teacher predicts {trained.classes}, the student {list(classes)}; "
            "distil from a run on the same classes (same data card)"
        )
    size = image_size or trained.recipe.input_image_size()
    teacher = Teacher(
        trained.model,
        mean=trained.data_config["mean"],
        std=trained.data_config["std"],
        in_chans=trained.recipe.model.in_chans,
        image_size=size,
        student_mean=student_mean,
        student_std=student_std,
        source=str(Path(ref)) if Path(ref).exists() else ref,
        classes=list(trained.classes),
    )
    return teacher.to(device) if device is not None else teacher


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, averaged over the batch (Hinton et al. 2015)."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def teacher_for(
    recipe: Any, ctx: Any, ref: str, *, weights: str = "none", image_size: Optional[int] = None, key: str
) -> Teacher:
    if ctx.mean is None or ctx.std is None:
        raise ConfigError(
            f"{key} needs the loader's normalisation (mean/std) to feed the teacher; build the trick "
            "with TrickContext(mean=..., std=...)"
        )
    return load_teacher(
        ref,
        classes=list(ctx.classes),
        student_mean=ctx.mean,
        student_std=ctx.std,
        device=ctx.device,
        weights=weights,
        image_size=image_size,
        student_size=recipe.input_image_size() if hasattr(recipe, "input_image_size") else None,
        student_in_chans=len(ctx.mean),
        key=key,
        load_run=ctx.load_run,
    )


class ScaledLoss(nn.Module):
    """``scale · loss_fn(logits, targets)``; a module, so the engine moves the inner loss (class weights) too."""

    def __init__(self, loss_fn, scale: float):
        super().__init__()
        self.loss_fn, self.scale = loss_fn, float(scale)

    def forward(self, logits, targets):
        return self.scale * self.loss_fn(logits, targets)


class Distillation(DistillationKeys):
    """Loads the teacher, scales the run's loss by ``alpha`` and adds the KL term on every batch."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.cfg: DistillConfig = self.config.distill
        self.teacher = teacher_for(
            recipe,
            ctx,
            self.cfg.teacher,
            weights=self.cfg.weights,
            image_size=self.cfg.image_size,
            key="tricks.distill.teacher",
        )

    def log_params(self):
        return {
            "distill.teacher_input_size": self.teacher.image_size,
            "distill.teacher_in_chans": self.teacher.in_chans,
        }

    def on_fit_start(self, model):
        self.teacher.to(next(model.parameters()).device)

    def transform_loss_fn(self, loss_fn):
        return loss_fn if self.cfg.alpha == 1.0 else ScaledLoss(loss_fn, self.cfg.alpha)

    def extra_loss(self, model, images, targets, logits):
        if self.cfg.alpha == 1.0:
            return None
        teacher_logits = self.teacher(images)
        return (1.0 - self.cfg.alpha) * distillation_kl(logits, teacher_logits, self.cfg.temperature)
