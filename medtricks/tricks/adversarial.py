"""Adversarial training as a trick: ``tricks.adversarial: {method: pgd|fgsm_rs|trades, eps, ...}`` (the keys:
:mod:`medtricks.tricks.keys.adversarial`).

ε is an L∞ budget in ``[0, 1]`` pixel units, exactly as ``medtricks audit`` reads it: the loader's
normalised batch is mapped back to pixels (``x = z * std + mean``), attacked there and clamped to
``[0, 1]``, then normalised again -- so a model trained at ``eps: 0.00392`` (1/255) is attacked in
training with the budget the audit later tests it with.

Methods, each as its authors' reference code does it:

``pgd``      PGD-AT (Madry et al. ICLR 2018): uniform random start in the ε-ball, ``steps`` signed-gradient
             steps of ``alpha`` (default ``2.5 * eps / steps``) on the cross-entropy, in train mode; the
             model trains on the adversarial images. Cost ≈ (steps + 1) x standard training.
``fgsm_rs``  "Fast is better than free" (Wong et al. ICLR 2020): uniform random start, one step of
             ``alpha`` (default ``1.25 * eps``), projection; the cheap one a CPU can afford (≈ 2x).
``trades``   TRADES (Zhang et al. ICML 2019): the attack maximises KL(f(x') ‖ f(x)) from
             ``x + 0.001·N(0, 1)``, ``steps`` steps of ``alpha`` (default ``eps / 4``) with the model
             in eval mode (as the reference code); the loss is the clean loss plus
             ``beta · KL(f(x') ‖ f(x))`` on the clean batch (≈ steps + 2 x).

``ratio`` is the share of each batch replaced by adversarial images (pgd / fgsm_rs; 1.0 = all, as
Madry; 0.5 = Goodfellow et al.'s half-and-half).

What the attack must not touch: the attack differentiates with ``torch.autograd.grad`` with respect to
the perturbation only, so parameter ``.grad`` and the optimizer state are untouched, and the
BatchNorm running statistics are put back after the attack passes (only the training forward pass
updates them). The attack is in float32 also under AMP (fp16 input gradients underflow), and draws
its random start from torch's global generator, which the engine re-seeds every epoch: a resumed run
is exact.

Combinations: with mixup/cutmix the attack targets the mixed (soft) labels of the mixed images;
with EMA the averaged weights are validated as usual; with label smoothing the attack uses the
hard-label (or mixed) cross-entropy while the training loss keeps the smoothing. ``trades`` with
mixup is refused: TRADES' KL term compares predictions on the same clean image, and its
reference code has no mixing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medtricks.errors import ConfigError
from medtricks.tricks.keys.adversarial import METHODS, AdversarialConfig, AdversarialTrainingKeys

__all__ = ["AdversarialConfig", "AdversarialTraining", "adversarial_batch", "trades_attack", "METHODS"]


# --------------------------------------------------------------------------------------------
# the attacks (plain torch, L∞, pixel space)
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _bn_stats_kept(model: nn.Module) -> Iterator[None]:
    """Put BatchNorm running statistics back after the attack's forward passes."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    saved = [
        (
            m.running_mean.clone() if m.running_mean is not None else None,
            m.running_var.clone() if m.running_var is not None else None,
            m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None,
        )
        for m in norms
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                if mean is not None:
                    m.running_mean.copy_(mean)
                if var is not None:
                    m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    was = model.training
    model.train(train)
    try:
        yield
    finally:
        model.train(was)


def _to_pixels(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    # Augmentation round-off can leave a hair outside [0, 1]; the attack's box is [0, 1].
    return (z * std + mean).clamp(0.0, 1.0)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for hard (N,) or soft (N, K) targets (mixup), summed: the gradient's sign is all
    the attack uses, and a sum keeps per-image gradients independent of the batch size."""
    if targets.dim() == 2:
        return -(targets * F.log_softmax(logits, dim=1)).sum()
    return F.cross_entropy(logits, targets, reduction="sum")


def adversarial_batch(
    model: nn.Module,
    x01: torch.Tensor,
    targets: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """PGD-L∞ with a uniform random start (``steps=1``: Wong et al.'s FGSM-RS) on pixels ``x01`` in
    ``[0, 1]``; returns the perturbed pixels, ``|x' - x| <= eps`` and in ``[0, 1]``.

    ``model`` takes normalised images; it is run in train mode (Madry's and Wong's reference code)
    with its BatchNorm running statistics restored afterwards; no parameter gradient is written.
    """
    x01 = x01.detach()
    delta = (torch.rand_like(x01) * 2 - 1) * eps
    delta = (x01 + delta).clamp(0.0, 1.0) - x01
    with _bn_stats_kept(model), _mode(model, True), torch.enable_grad():
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = _ce(model(((x01 + delta) - mean) / std).float(), targets)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
            delta = (x01 + delta).clamp(0.0, 1.0) - x01
    return (x01 + delta).detach()


def trades_attack(
    model: nn.Module,
    x01: torch.Tensor,
    clean_probs: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """TRADES' inner maximisation: ``steps`` signed steps on KL(f(x') ‖ f(x)) from ``x + 0.001·N(0,1)``,
    model in eval mode (as Zhang et al.'s reference code); returns pixels in the ε-ball and ``[0, 1]``."""
    x01 = x01.detach()
    x_adv = (x01 + 0.001 * torch.randn_like(x01)).clamp(0.0, 1.0)
    x_adv = x01 + (x_adv - x01).clamp(-eps, eps)
    with _bn_stats_kept(model), _mode(model, False), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            log_p = F.log_softmax(model((x_adv - mean) / std).float(), dim=1)
            loss = F.kl_div(log_p, clean_probs, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = (x01 + (x_adv - x01).clamp(-eps, eps)).clamp(0.0, 1.0)
    return x_adv.detach()


# --------------------------------------------------------------------------------------------
# the trick
# --------------------------------------------------------------------------------------------
class AdversarialTraining(AdversarialTrainingKeys):
    """Attacks each training batch (or adds TRADES' KL term) with the model being trained."""

    def __init__(self, recipe, ctx):
        super().__init__(recipe, ctx)
        self.cfg: AdversarialConfig = self.config.adversarial
        if ctx.mean is None or ctx.std is None:
            raise ConfigError(
                "tricks.adversarial needs the loader's normalisation (mean/std) to attack in [0, 1] "
                "pixel space; build the trick with TrickContext(mean=..., std=...)"
            )
        if self.cfg.method == "trades" and (
            getattr(self.config, "mixup_alpha", 0) > 0 or getattr(self.config, "cutmix_alpha", 0) > 0
        ):
            raise ConfigError(
                "tricks.adversarial.method = 'trades' cannot be combined with tricks.mixup_alpha / "
                "tricks.cutmix_alpha: TRADES' KL term compares predictions on one clean image; use "
                "method: fgsm_rs or pgd with mixup, or switch mixup off"
            )
        channels = len(ctx.mean)
        self.mean = torch.tensor(ctx.mean, dtype=torch.float32).view(1, channels, 1, 1)
        self.std = torch.tensor(ctx.std, dtype=torch.float32).view(1, channels, 1, 1)
        self.model: Optional[nn.Module] = None
        self._x_adv: Optional[torch.Tensor] = None

    def log_params(self):
        return {
            "adversarial.resolved_steps": self.cfg.resolved_steps(),
            "adversarial.resolved_alpha": f"{self.cfg.resolved_alpha() * 255:.4g}/255",
        }

    def on_fit_start(self, model):
        self.model = model
        self.mean, self.std = self.mean.to(self.ctx.device or "cpu"), self.std.to(self.ctx.device or "cpu")

    def _stats(self, images):
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        if images.shape[1] != mean.shape[1]:
            raise ConfigError(
                f"tricks.adversarial: the batch has {images.shape[1]} channel(s) but the normalisation "
                f"has {mean.shape[1]} (mean {tuple(mean.flatten().tolist())})"
            )
        return mean, std

    def transform_batch(self, images, targets):
        if self.model is None:
            raise RuntimeError(
                "AdversarialTraining.transform_batch before on_fit_start: the engine gives the model there"
            )
        mean, std = self._stats(images)
        x01 = _to_pixels(images.float(), mean, std)
        if self.cfg.method == "trades":
            with torch.no_grad(), _mode(self.model, False):
                clean_probs = F.softmax(self.model(images).float(), dim=1)
            self._x_adv = trades_attack(
                self.model,
                x01,
                clean_probs,
                eps=self.cfg.eps,
                alpha=self.cfg.resolved_alpha(),
                steps=self.cfg.resolved_steps(),
                mean=mean,
                std=std,
            )
            return images, targets
        n_adv = max(1, round(self.cfg.ratio * images.shape[0]))
        adv01 = adversarial_batch(
            self.model,
            x01[:n_adv],
            targets[:n_adv],
            eps=self.cfg.eps,
            alpha=self.cfg.resolved_alpha(),
            steps=self.cfg.resolved_steps(),
            mean=mean,
            std=std,
        )
        adv = ((adv01 - mean) / std).to(images.dtype)
        if n_adv == images.shape[0]:
            return adv.contiguous(memory_format=_memory_format(images)), targets
        return torch.cat([adv, images[n_adv:]]).contiguous(memory_format=_memory_format(images)), targets

    def extra_loss(self, model, images, targets, logits):
        if self.cfg.method != "trades" or self._x_adv is None:
            return None
        mean, std = self._stats(images)
        x_adv, self._x_adv = self._x_adv, None
        adv_log_p = F.log_softmax(model((x_adv - mean) / std).float(), dim=1)
        clean_p = F.softmax(logits.float(), dim=1)
        return self.cfg.beta * F.kl_div(adv_log_p, clean_p, reduction="batchmean")


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        else torch.contiguous_format
    )
