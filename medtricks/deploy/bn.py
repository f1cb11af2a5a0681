"""BatchNorm adaptation to a new site's unlabelled images: AdaBN and TENT.

Model surgery in the package's style: each function changes the model in place and returns a report
of what it changed.

- :func:`adabn` (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", 2016):
  every BatchNorm layer's running mean and variance are re-estimated on the site's images (a
  cumulative average over all of them); no parameter changes.
- :func:`tent` (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021):
  the BatchNorm affine parameters (γ, β) — and nothing else — take SGD steps that minimise the mean
  entropy of the predictions, with BatchNorm normalising by each batch's own statistics (the running
  statistics are neither used nor changed). Other layers stay in eval mode (dropout off), batches are
  drawn in a seeded order: the same seed gives the same parameters.

Example::

    report = adabn(model, loader)
    print(report.n_layers, report.n_images)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["adabn", "tent", "bn_layers", "AdaptReport"]


@dataclass
class AdaptReport:
    """What an adaptation changed: ``layers`` (name, what changed, mean |change|), images seen, steps."""

    method: str
    n_layers: int
    n_images: int
    steps: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # TENT: mean entropy per step

    def summary(self) -> str:
        text = f"{self.method}: {self.n_layers} BatchNorm layers, {self.n_images} images"
        if self.steps:
            text += f", {self.steps} steps"
            if self.losses:
                text += f" (entropy {self.losses[0]:.4f} -> {self.losses[-1]:.4f})"
        return text


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm layer (1d/2d/3d, timm's BatchNormAct2d) with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def adabn(model: nn.Module, batches: Iterable[Any], *, device: str | torch.device = "cpu") -> AdaptReport:
    """Re-estimate every BatchNorm layer's running statistics on ``batches`` (images, or ``(images, ...)``
    tuples), as an average over all images (each image weighs the same); parameters are untouched. The model is left in eval mode."""
    layers = bn_layers(model)
    if not layers:
        raise ValueError("adabn: the model has no BatchNorm layers")
    before = {
        name: (m.running_mean.detach().clone(), m.running_var.detach().clone())
        for name, m in layers
        if m.running_mean is not None
    }
    momenta = {name: m.momentum for name, m in layers}
    model.to(device).eval()
    for _, m in layers:
        if m.running_mean is None:
            raise ValueError("adabn: a BatchNorm layer without running statistics (track_running_stats=False)")
        m.reset_running_stats()
        m.train()
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                x = _images(batch).to(device)
                for _, m in layers:  # running = mean over all images so far (every image weighs the same)
                    m.momentum = len(x) / (n + len(x))
                model(x)
                n += len(x)
    finally:
        for name, m in layers:
            m.momentum = momenta[name]
        model.eval()
    if n == 0:
        raise ValueError("adabn: no images")
    report = AdaptReport(method="adabn", n_layers=len(layers), n_images=n)
    for name, m in layers:
        mean0, var0 = before[name]
        report.layers.append(
            {
                "layer": name,
                "changed": "running_mean,running_var",
                "mean_abs_change_mean": float((m.running_mean - mean0).abs().mean()),
                "mean_abs_change_var": float((m.running_var - var0).abs().mean()),
            }
        )
    return report


def tent(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    steps: int = 1,
    batch_size: int = 32,
    lr: float = 1e-3,
    momentum: float = 0.9,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> AdaptReport:
    """TENT: ``steps`` passes over ``dataset`` (items ``(image, ...)``), SGD on the entropy of the softmax,
    updating only BatchNorm γ and β; BatchNorm uses batch statistics and its running statistics are left
    as they were. Batches are shuffled with ``seed`` (a last batch of one image is dropped: batch statistics
    need two). Every parameter's ``requires_grad`` is restored afterwards; the model is left in eval mode."""
    from torch.utils.data import DataLoader

    layers = bn_layers(model)
    if not layers:
        raise ValueError("tent: the model has no BatchNorm layers")
    if int(steps) < 1 or not lr > 0:
        raise ValueError(f"tent: steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    torch.manual_seed(int(seed))
    model.to(device).eval()
    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    tracking = {name: m.track_running_stats for name, m in layers}
    params, before = [], {}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in layers:
        m.train()
        m.track_running_stats = False  # normalise by batch statistics; running buffers neither used nor updated
        for kind in ("weight", "bias"):
            p = getattr(m, kind)
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
                before[f"{name}.{kind}"] = p.detach().clone()
    optimizer = torch.optim.SGD(params, lr=float(lr), momentum=float(momentum))
    generator = torch.Generator().manual_seed(int(seed))
    n_images = len(dataset)
    loader = DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=True,
        generator=generator,
        num_workers=0,
        drop_last=n_images % int(batch_size) == 1,
    )
    report = AdaptReport(method="tent", n_layers=len(layers), n_images=n_images)
    try:
        for _ in range(int(steps)):
            for batch in loader:
                x = _images(batch).to(device)
                if len(x) < 2:
                    continue
                logits = model(x).float()
                log_p = torch.log_softmax(logits, dim=1)
                entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
                optimizer.zero_grad(set_to_none=True)
                entropy.backward()
                optimizer.step()
                report.steps += 1
                report.losses.append(float(entropy.detach()))
    finally:
        for name, m in layers:
            m.track_running_stats = tracking[name]
        for p in model.parameters():
            p.requires_grad_(grad_flags[id(p)])
            p.grad = None
        model.eval()
    for key, old in before.items():
        name, _, kind = key.rpartition(".")
        new = getattr(dict(layers)[name], kind).detach()
        report.layers.append({"layer": name, "changed": kind, "mean_abs_change": float((new - old).abs().mean())})
    return report
