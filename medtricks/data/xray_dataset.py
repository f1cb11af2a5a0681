"""The dataset over a manifest: a cached, deterministic decode step, then the random augmentation.

Every item goes through the same two steps, cached or not, so a cache never changes results:

1. deterministic: decode (:func:`read_image`), resize the shorter side to the transform's
   ``base_side``, quantize to 16 bits -- a MONAI ``Transform`` (:class:`LoadXrayd`), so
   ``PersistentDataset`` stores its output on disk under ``cache_dir``, keyed by the file's content
   hash, byte size, the resize side and the VOI mode;
2. random: the albumentations preset (:mod:`medtricks.data.transforms`), never cached.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from monai.transforms import Transform  # this module is imported only when datasets are built

from medtricks.errors import ConfigError
from medtricks.data.errors import BadImageError
from medtricks.data.readers import VOI_MODES, BitDepthWarning, read_image
from medtricks.data.splits import file_digest

__all__ = ["XrayDataset", "LoadXrayd", "resize_shorter_side"]

_CACHE_VERSION = "v3"  # bump when the decode step changes, so old cache files are not reused


def _cache_hash(item: dict) -> bytes:
    """PersistentDataset key: content hash + byte size + resize side + VOI mode (never the path)."""
    return hashlib.md5(item["key"].encode()).hexdigest().encode()


class LoadXrayd(Transform):
    """Decode one image, resize its shorter side to ``side``, quantize to 16-bit levels.

    Deterministic and a MONAI ``Transform``, so ``PersistentDataset`` caches its output. Module-level
    (not a closure) so datasets pickle for DataLoader workers started with 'spawn'.
    """

    def __init__(self, side: Optional[int], voi: str):
        self.side, self.voi = side, voi

    def __call__(self, data: dict) -> dict:
        # A 16-bit file holding 12-bit data warns once per file in read_image; here the note rides
        # along with the image (and its cache entry) so scan_images warns once per dataset instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BitDepthWarning)
            image = read_image(data["path"], voi=self.voi)
        notes = [str(w.message) for w in caught if issubclass(w.category, BitDepthWarning)]
        for w in caught:  # any other warning goes on as usual
            if not issubclass(w.category, BitDepthWarning):
                warnings.warn(w.message, stacklevel=2)
        if self.side:
            image = resize_shorter_side(image, self.side)
        # 16-bit steps (1.5e-5) lose nothing a radiograph holds and halve the cache; applied with and
        # without a cache so that caching never changes results. Stored as int16 shifted by 32768:
        # MONAI's cache would widen uint16 to int32.
        levels = np.round(np.clip(image, 0.0, 1.0) * 65535.0) - 32768.0
        return {**data, "image": levels.astype(np.int16), "bit_depth_note": notes[0] if notes else ""}


def _load_transform(side: Optional[int], voi: str) -> LoadXrayd:
    return LoadXrayd(side, voi)


def resize_shorter_side(image: np.ndarray, side: int) -> np.ndarray:
    """Resize so that min(H, W) == side, keeping the aspect ratio (area filter when shrinking)."""
    import cv2

    h, w = image.shape[:2]
    scale = side / min(h, w)
    if scale == 1.0:
        return image
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))  # cv2 wants (width, height)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp).astype(np.float32, copy=False)


class _Augment:
    """The random part: a plain callable (not a MONAI Transform), so PersistentDataset stops caching here."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, data: dict) -> dict:
        return {**data, "image": self.transform(_to_unit_float(data["image"]))}


def _to_unit_float(image) -> np.ndarray:
    """int16 levels (array or cached tensor) from the decode step -> float32 (H, W) in [0, 1]."""
    if hasattr(image, "numpy"):  # a torch tensor read back from the cache
        image = image.numpy()
    return (np.asarray(image, dtype=np.float32) + 32768.0) / 65535.0


def _items(manifest: pd.DataFrame, side: Optional[int], voi: str, cached: bool) -> list[dict]:
    if cached and "content_hash" not in manifest.columns:
        hashes = [file_digest(p) for p in manifest["path"]]
    else:
        hashes = manifest["content_hash"].tolist() if "content_hash" in manifest.columns else [None] * len(manifest)
    items = []
    for path, target, digest in zip(manifest["path"], manifest["target"], hashes):
        size = Path(path).stat().st_size if cached else 0
        key = f"{digest}-{size}-{side}-{voi}-{_CACHE_VERSION}" if cached else str(path)
        items.append({"path": str(path), "target": int(target), "key": key})
    return items


def _monai_dataset(items: list[dict], transforms: list, cache_dir):
    from monai.data import PersistentDataset
    from monai.transforms import Compose

    return PersistentDataset(items, transform=Compose(transforms), cache_dir=cache_dir, hash_func=_cache_hash)


class XrayDataset:
    """``dataset[i] -> (tensor (C, H, W), int target)`` over the rows of a manifest.

    ``transform``: from :func:`build_transforms` (its ``base_side`` sets the pre-resize) or any callable
    taking a float32 (H, W) image. ``cache_dir``: optional folder for MONAI's PersistentDataset decode
    cache. ``resize_to`` overrides the pre-resize side (``None``: the transform's ``base_side``, if any).
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        transform: Callable,
        *,
        cache_dir=None,
        resize_to: Optional[int] = None,
        voi: str = "auto",
    ):
        missing = {"path", "target"} - set(manifest.columns)
        if missing:
            raise ConfigError(f"XrayDataset needs manifest columns {sorted(missing)}; got {list(manifest.columns)}")
        if voi not in VOI_MODES:
            raise ConfigError(f"voi={voi!r} is not one of {VOI_MODES}")
        self.manifest = manifest.reset_index(drop=True)
        self.transform = transform
        self.voi = voi
        self.side = resize_to if resize_to is not None else getattr(transform, "base_side", None)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.items = _items(self.manifest, self.side, voi, cached=self.cache_dir is not None)
        self._dataset = _monai_dataset(
            self.items, [_load_transform(self.side, voi), _Augment(transform)], self.cache_dir
        )
        self.targets = [item["target"] for item in self.items]

    def set_transform(self, transform: Callable) -> None:
        """Swap the random part (progressive resizing: a train transform of another size). The decode step and
        its cache are unchanged: the new transform must start from the same pre-resized images."""
        augment = next(t for t in self._dataset.transform.transforms if isinstance(t, _Augment))
        augment.transform = self.transform = transform

    def with_transform(self, transform: Callable) -> "XrayDataset":
        """A new dataset over the same rows, decode settings (pre-resize side, VOI) and cache, with another
        random part; this one is left as it is. E.g. a transform returning two views of each image (the
        pseudo-label trick's augmented + clean pair)."""
        return XrayDataset(self.manifest, transform, cache_dir=self.cache_dir, resize_to=self.side, voi=self.voi)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        try:
            item = self._dataset[int(index)]
        except Exception as err:  # MONAI wraps errors in RuntimeError; surface the file-level problem
            bad = _bad_image_in(err)
            if bad is not None:
                raise bad from None
            raise
        # The label comes from this dataset's manifest, never from the cache: a cache entry is keyed by the
        # image's content and written by whichever pass decoded it first (the image scan labels every item 0).
        return item["image"], self.targets[int(index)]

    def __repr__(self) -> str:
        return f"XrayDataset(n={len(self)}, side={self.side}, cache_dir={self.cache_dir}, transform={self.transform!r})"


def _bad_image_in(err: BaseException) -> Optional[BadImageError]:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BadImageError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
