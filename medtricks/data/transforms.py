"""Augmentation presets (albumentations) and the eval transform for gray chest X-rays.

Presets (train=True):

- ``cxr_light``: RandomResizedCrop scale 0.7-1.0, rotation uniform in +-10 deg (black border, as
  collimation looks), brightness/contrast +-0.1. No flips: a flipped chest puts the heart on the right.
- ``cxr_lungfield``: against source shortcuts (DeGrave et al. 2021): ``cxr_light``, then half of the
  images lose, to one random grey, either everything outside a randomly widened fixed lung field or
  bands along their edges (text, markers, film edges); see :mod:`medtricks.data.lung_field`. No flips.
- ``paper_baseline``: He et al. 2019's ImageNet recipe: RandomResizedCrop scale 0.08-1, ratio 3/4-4/3,
  horizontal flip, brightness/contrast/saturation 0.4 (saturation is a no-op on gray), PCA lighting
  noise 0.1 (FancyPCA on the gray channel).
- ``cxr_shift``: for models that must hold on another hospital's or another batch's images:
  ``cxr_light``'s geometry with a wider crop (scale 0.6-1, aspect 0.8-1.25, as resized copies
  distort it) plus what differs between acquisitions — exposure and contrast +-0.2, gamma 0.7-1.5,
  CLAHE (p 0.25, as some sites post-process), Gaussian blur (p 0.2), Gaussian noise (p 0.2) and
  down-then-up sampling (p 0.2). No flips.
- ``cxr_strong``: the strong view of FixMatch (``tricks.fixmatch.strong``), RandAugment-style (Cubuk et al.
  2020, as FixMatch uses it): ``cxr_light``'s crop, then 2 ops drawn per image (without replacement) from
  brightness/contrast +-0.3, gamma 0.6-1.6, CLAHE, sharpen, Gaussian blur, rotation +-15 deg, shear +-15 deg,
  translation +-10 %, Gaussian noise, posterize (4-8 bits), equalize -- each at a magnitude drawn per image
  from its range -- then Cutout (one CoarseDropout hole of 5-50 % of each side, filled with mid grey 0.5).
  No flips: a flipped chest X-ray shows dextrocardia, an anatomy the model must not learn as normal.
- ``none``: the eval transform for training too.

Eval (train=False): resize the shorter side to ``image_size / crop_pct``, then center crop
``image_size`` (``crop_pct`` 0.875 for ``paper_baseline`` as in the paper, 1.0 otherwise, so no
anatomy at the borders is lost).

Augmentation runs on the single gray channel; channels are replicated to ``in_chans`` only at the end,
then normalized with ``mean`` / ``std``.

Randomness: albumentations >= 2 keeps its own generator, independent of numpy/python seeds. So that
DataLoader worker seeding covers it (torch seeds python's ``random`` in every worker), each call
re-seeds the pipeline from python's ``random`` module: same seeds -> same augmentations.

Example::

    t = build_transforms("cxr_light", 224, mean=(0.5,), std=(0.5,), in_chans=3, train=True)
    x = t(img)        # img: float32 (H, W) in [0, 1] -> tensor (3, 224, 224)
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np

from medtricks.data import lung_field
from medtricks.errors import ConfigError, ConfigTypeError

PRESETS = ("cxr_light", "cxr_shift", "cxr_lungfield", "cxr_strong", "paper_baseline", "none")
_CROP_PCT = {
    "cxr_light": 1.0,
    "cxr_shift": 1.0,
    "cxr_lungfield": 1.0,
    "cxr_strong": 1.0,
    "paper_baseline": 0.875,
    "none": 1.0,
}
#: RandAugment-style ops of ``cxr_strong`` drawn per image (``A.SomeOf``), and how many.
STRONG_OPS_PER_IMAGE = 2


def eval_resize_side(preset: str, image_size: int) -> int:
    """Shorter side before the eval center crop (also the side the decode cache stores)."""
    return int(math.ceil(image_size / _CROP_PCT[preset] - 1e-9))


def _train_ops(preset: str, image_size: int) -> list:
    import albumentations as A
    import cv2

    size = (image_size, image_size)
    if preset == "cxr_light":
        return [
            A.Rotate(limit=10, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
            A.RandomResizedCrop(size=size, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), p=1.0),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=1.0),
        ]
    if preset == "cxr_shift":
        return [
            A.Rotate(limit=10, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
            A.RandomResizedCrop(size=size, scale=(0.6, 1.0), ratio=(0.8, 1.25), p=1.0),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=1.0),
            A.RandomGamma(gamma_limit=(70, 150), p=0.5),
            A.CLAHE(clip_limit=(1.0, 3.0), tile_grid_size=(8, 8), p=0.25),
            A.GaussianBlur(sigma_limit=(0.3, 1.2), p=0.2),
            A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
            A.Downscale(scale_range=(0.5, 0.9), p=0.2),
        ]
    if preset == "cxr_lungfield":
        return _train_ops("cxr_light", image_size) + [lung_field.OutsideLungErasing(p=0.5)]
    if preset == "cxr_strong":
        return [
            A.RandomResizedCrop(size=size, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), p=1.0),
            A.SomeOf(_strong_ops(), n=STRONG_OPS_PER_IMAGE, replace=False, p=1.0),
            A.CoarseDropout(
                num_holes_range=(1, 1), hole_height_range=(0.05, 0.5), hole_width_range=(0.05, 0.5), fill=0.5, p=1.0
            ),
        ]
    if preset == "paper_baseline":
        return [
            A.RandomResizedCrop(size=size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), p=1.0),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, p=1.0),
            A.FancyPCA(alpha=0.1, p=1.0),
        ]
    return _eval_ops(preset, image_size)


def _strong_ops() -> list:
    """``cxr_strong``'s op list: photometric and small geometric changes a chest X-ray can show (no flips)."""
    import albumentations as A
    import cv2

    border = dict(border_mode=cv2.BORDER_CONSTANT, fill=0)  # black, as collimation looks
    return [
        A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=1.0),
        A.RandomGamma(gamma_limit=(60, 160), p=1.0),
        A.CLAHE(clip_limit=(1.0, 4.0), tile_grid_size=(8, 8), p=1.0),
        A.Sharpen(alpha=(0.1, 0.5), lightness=(0.9, 1.1), p=1.0),
        A.GaussianBlur(sigma_limit=(0.3, 1.5), p=1.0),
        A.Affine(rotate=(-15, 15), **border, p=1.0),
        A.Affine(shear={"x": (-15, 15), "y": (-15, 15)}, **border, p=1.0),
        A.Affine(translate_percent={"x": (-0.1, 0.1), "y": (-0.1, 0.1)}, **border, p=1.0),
        A.GaussNoise(std_range=(0.01, 0.05), p=1.0),
        A.Posterize(num_bits=(4, 8), p=1.0),
        A.Equalize(p=1.0),
    ]


def _eval_ops(preset: str, image_size: int) -> list:
    import albumentations as A
    import cv2

    return [
        A.SmallestMaxSize(max_size=eval_resize_side(preset, image_size), interpolation=cv2.INTER_AREA),
        A.CenterCrop(height=image_size, width=image_size),
    ]


class XrayTransform:
    """Callable: float32 (H, W) in [0, 1] -> normalized float tensor (in_chans, size, size).

    Attributes ``preset``, ``image_size``, ``train``, ``in_chans`` and ``base_side`` (the shorter side
    images are pre-resized to before this transform; what the decode cache stores).
    """

    def __init__(
        self, preset: str, image_size: int, *, mean: Sequence[float], std: Sequence[float], in_chans: int, train: bool
    ):
        import albumentations as A

        self.preset, self.image_size, self.train, self.in_chans = preset, int(image_size), bool(train), int(in_chans)
        self.mean = _per_channel(mean, in_chans, "mean")
        self.std = _per_channel(std, in_chans, "std")
        if (self.std <= 0).any():
            raise ConfigError(f"std values must be > 0, got {tuple(std)}")
        # A little larger than the eval side, so random crops at scale 1 still see the whole image.
        self.base_side = eval_resize_side(preset, image_size)
        ops = _train_ops(preset, image_size) if train else _eval_ops(preset, image_size)
        self.pipeline = A.Compose(ops, seed=0)
        self.random = train and preset != "none"

    def __call__(self, image) -> "torch.Tensor":  # noqa: F821 - torch imported lazily
        import torch

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim != 2:
            raise ConfigError(f"expected a gray image of shape (H, W), got shape {image.shape}")
        if not np.issubdtype(image.dtype, np.floating):
            raise ConfigTypeError(f"expected a float image in [0, 1] (as read_image returns), got dtype {image.dtype}")
        if self.random:
            self.pipeline.set_random_seed(random.getrandbits(32))
        out = self.pipeline(image=np.ascontiguousarray(image, dtype=np.float32)[..., None])["image"]
        out = np.clip(out.reshape(out.shape[0], out.shape[1], -1)[..., :1], 0.0, 1.0)
        out = np.repeat(out, self.in_chans, axis=2) if self.in_chans > 1 else out
        out = (out - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32))

    def __repr__(self) -> str:
        return (
            f"XrayTransform(preset={self.preset!r}, image_size={self.image_size}, train={self.train}, "
            f"in_chans={self.in_chans}, mean={tuple(self.mean.tolist())}, std={tuple(self.std.tolist())})"
        )


class MultiView:
    """Callable: one image -> a tuple of views, ``(t(image) for t in transforms)``: independent random views of
    the *same* image (FixMatch's weak and strong view). A DataLoader collates the items into a list of batches,
    one per transform. ``base_side`` is the first transform's. Module-level, so datasets using it pickle for
    DataLoader workers."""

    def __init__(self, *transforms):
        if not transforms:
            raise ConfigError("MultiView needs at least one transform")
        self.transforms = transforms
        self.base_side = getattr(transforms[0], "base_side", None)

    def __call__(self, image) -> tuple:
        return tuple(transform(image) for transform in self.transforms)

    def __repr__(self) -> str:
        return f"MultiView({', '.join(repr(t) for t in self.transforms)})"


def _per_channel(values: Sequence[float], in_chans: int, name: str) -> np.ndarray:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        values = values * in_chans  # a 1-tuple with in_chans=3 replicates
    if len(values) != in_chans:
        raise ConfigError(f"{name} has {len(values)} values {values}; expected 1 or in_chans={in_chans}")
    return np.asarray(values, dtype=np.float32)


def build_transforms(
    preset: str, image_size: int, *, mean: Sequence[float], std: Sequence[float], in_chans: int, train: bool
) -> XrayTransform:
    """The train (``train=True``) or eval transform of a preset; see the module docstring.

    Example::

        train_t = build_transforms("paper_baseline", 224, mean=(0.485, 0.456, 0.406),
                                   std=(0.229, 0.224, 0.225), in_chans=3, train=True)
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown augmentation preset {preset!r}; expected one of {PRESETS}")
    if int(image_size) < 8:
        raise ConfigError(f"image_size={image_size}: expected at least 8 pixels")
    if int(in_chans) < 1:
        raise ConfigError(f"in_chans={in_chans}: expected 1 or more channels")
    return XrayTransform(preset, image_size, mean=mean, std=std, in_chans=in_chans, train=train)
