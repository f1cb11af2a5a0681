"""X-ray-relevant image corruptions at 5 severities, batched on the images' device.

In the spirit of ImageNet-C (Hendrycks & Dietterich, ICLR 2019): where ImageNet-C has the same
corruption its five parameters are used (Gaussian noise, shot noise, Gaussian blur, contrast,
brightness, JPEG, pixelate); gamma (exposure / display curve) is ours. All work on float images in
``[0, 1]`` of shape ``(N, C, H, W)`` or ``(C, H, W)``, return the same shape and dtype, clamp to
``[0, 1]``, and are deterministic for a given ``seed``. Severity 0 is the identity.

The resampling, blur, contrast, gamma and JPEG operations are torchvision's
(``torchvision.transforms.v2.functional``); the noises and the brightness shift are one line each.

Example:
    >>> list_corruptions()[:3]
    ['gaussian_noise', 'poisson_noise', 'gaussian_blur']
    >>> noisy = corrupt(images01, "poisson_noise", severity=3, seed=0)
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from medtricks.errors import ConfigError

__all__ = ["CORRUPTION_PARAMS", "list_corruptions", "corrupt"]

# name -> parameter per severity 1..5 (what the number means is in _APPLY's docstrings)
CORRUPTION_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std (ImageNet-C)
    "poisson_noise": (60.0, 25.0, 12.0, 5.0, 3.0),  # photons per unit intensity (ImageNet-C shot noise)
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),  # sigma in px at 224 px (ImageNet-C), scaled to the image, >= 0.5
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # contrast factor (ImageNet-C)
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added intensity (ImageNet-C)
    "gamma": (1.25, 1.5, 1.75, 2.0, 2.5),  # exponent: x ** gamma (darker mid-tones)
    "jpeg": (25.0, 18.0, 15.0, 10.0, 7.0),  # JPEG quality (ImageNet-C)
    "downsample": (0.6, 0.5, 0.4, 0.3, 0.25),  # scale of the down-then-up resampling (ImageNet-C pixelate)
}
_REFERENCE_SIZE = 224  # ImageNet-C's blur sigmas are in pixels of a 224 px image
_MIN_SIGMA = 0.5


def list_corruptions() -> list[str]:
    """Names accepted by :func:`corrupt`, in report order."""
    return list(CORRUPTION_PARAMS)


def _generator(images: torch.Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=images.device).manual_seed(int(seed))


def _gaussian_noise(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """Additive white noise of standard deviation ``std`` (electronic / detector noise)."""
    return x + std * torch.randn(x.shape, generator=_generator(x, seed), device=x.device, dtype=x.dtype)


def _poisson_noise(x: torch.Tensor, photons: float, seed: int) -> torch.Tensor:
    """Quantum noise: counts ~ Poisson(x * photons), rescaled; fewer photons = noisier (low dose)."""
    return torch.poisson(x * photons, generator=_generator(x, seed)) / photons


def _gaussian_blur(x: torch.Tensor, sigma_224: float, seed: int) -> torch.Tensor:
    """Gaussian blur; sigma scales with the image so a severity means the same at any resolution
    (but never below 0.5 px, the least blur that visibly changes a small image)."""
    from torchvision.transforms.v2 import functional as F

    sigma = max(_MIN_SIGMA, sigma_224 * max(x.shape[-2:]) / _REFERENCE_SIZE)
    kernel = 2 * math.ceil(3 * sigma) + 1
    kernel = min(kernel, 2 * (min(x.shape[-2:]) // 2) - 1)  # reflect padding needs kernel // 2 < size
    if kernel < 3:
        kernel = 3
    return F.gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def _contrast(x: torch.Tensor, factor: float, seed: int) -> torch.Tensor:
    """Blend towards the image's mean grey level: ``factor`` 1 is the identity, 0 a flat image."""
    from torchvision.transforms.v2 import functional as F

    if x.shape[-3] in (1, 3):
        return F.adjust_contrast(x, factor)
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)  # torchvision handles 1 or 3 channels only
    return (x - mean) * factor + mean


def _brightness(x: torch.Tensor, shift: float, seed: int) -> torch.Tensor:
    """Add ``shift`` to every pixel (over-exposure), then clip."""
    return x + shift


def _gamma(x: torch.Tensor, gamma: float, seed: int) -> torch.Tensor:
    """``x ** gamma``: a different exposure / display curve."""
    from torchvision.transforms.v2 import functional as F

    return F.adjust_gamma(x, gamma)


def _jpeg(x: torch.Tensor, quality: float, seed: int) -> torch.Tensor:
    """8-bit JPEG encode/decode at ``quality`` (lossy PACS / export compression)."""
    from torchvision.transforms.v2 import functional as F

    shape = x.shape
    as_u8 = (x * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
    if shape[-3] not in (1, 3):  # JPEG has 1 or 3 channels: encode other layouts channel by channel
        as_u8 = as_u8.reshape(-1, 1, *shape[-2:])
    out = F.jpeg(as_u8, quality=int(quality))
    return out.reshape(shape).to(device=x.device, dtype=x.dtype) / 255.0


def _downsample(x: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """Resize down by ``scale`` (antialiased) and back up (bilinear): a low-resolution acquisition."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = x.shape[-2:]
    small = [max(1, round(h * scale)), max(1, round(w * scale))]
    down = F.resize(x, small, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.resize(down, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=False)


_APPLY: dict[str, Callable[[torch.Tensor, float, int], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "poisson_noise": _poisson_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "gamma": _gamma,
    "jpeg": _jpeg,
    "downsample": _downsample,
}


def corrupt(images01: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (0 = identity, 1..5) to images in ``[0, 1]``.

    Args:
        images01: float tensor ``(N, C, H, W)`` or ``(C, H, W)`` with values in ``[0, 1]``
            (de-normalized pixels, not the normalized network input).
        name: one of :func:`list_corruptions`.
        severity: 0..5; the parameters per severity are in ``CORRUPTION_PARAMS``.
        seed: seed of the random corruptions (noise); same seed, same result.

    Returns:
        A new tensor of the same shape, dtype and device, clamped to ``[0, 1]``.

    >>> blurred = corrupt(torch.rand(2, 1, 64, 64), "gaussian_blur", 2)
    """
    if name not in _APPLY:
        raise ConfigError(f"unknown corruption {name!r}: expected one of {list_corruptions()}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= 5:
        raise ConfigError(f"corruption severity must be an integer 0..5 (0 = identity), got {severity!r}")
    if not isinstance(images01, torch.Tensor) or not images01.is_floating_point() or images01.dim() not in (3, 4):
        what = (
            f"{images01.dtype} tensor of shape {tuple(images01.shape)}"
            if isinstance(images01, torch.Tensor)
            else type(images01).__name__
        )
        raise ConfigError(f"images01 must be a float tensor (N, C, H, W) or (C, H, W) in [0, 1], got a {what}")
    if images01.numel() and (float(images01.min()) < 0.0 or float(images01.max()) > 1.0):
        raise ConfigError(
            f"images01 must be in [0, 1] (de-normalized pixels), got range [{float(images01.min()):.4g}, "
            f"{float(images01.max()):.4g}]; de-normalize first: x = x_norm * std + mean"
        )
    if severity == 0:
        return images01.clone()
    batch = images01 if images01.dim() == 4 else images01.unsqueeze(0)
    param = CORRUPTION_PARAMS[name][severity - 1]
    out = _APPLY[name](batch, param, seed).clamp(0.0, 1.0)
    return out if images01.dim() == 4 else out.squeeze(0)
