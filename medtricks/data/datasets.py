"""Torch datasets over a manifest, with MONAI's PersistentDataset as the optional decode cache.

Every item goes through the same two steps, cached or not, so a cache never changes results:

1. deterministic: decode (:func:`read_image`), resize the shorter side to the transform's
   ``base_side``, quantize to 16 bits -- a MONAI ``Transform``, so ``PersistentDataset`` stores its
   output on disk under ``cache_dir``, keyed by the file's content hash, byte size, the resize side
   and the VOI mode;
2. random: the albumentations preset (:mod:`medtricks.data.transforms`), never cached.

:func:`build_datasets` is the one entry point a run needs: card -> manifest -> image scan (bad
images found before training, cache filled on the way) -> leakage check -> train/val/test datasets.

Example::

    bundle = build_datasets("synthetic-phantoms", "data/phantoms", image_size=64, mean=(0.5,), std=(0.5,),
                            in_chans=1, synth={"n": 300, "size": 64})
    x, y = bundle.train[0]          # tensor (1, 64, 64), int
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from monai.transforms import Transform  # this module is imported only when datasets are built

from medtricks.errors import ConfigError, MissingFileError
from medtricks.data.cards import DataCard, FolderLayout, load_card
from medtricks.data.class_map import apply_class_map, resolve_class_map
from medtricks.data.errors import BadImageError, DataError, LeakageError
from medtricks.data.file_listing import walk_files
from medtricks.data.manifest import build_manifest
from medtricks.data.readers import VOI_MODES, BitDepthWarning, read_image
from medtricks.data.splits import check_leakage, file_digest, labeled_subset
from medtricks.data.synthetic import MANIFEST_NAME, PARAMS_NAME, SYNTHETIC_CARD, synthesize_phantoms
from medtricks.data.transforms import build_transforms

_CACHE_VERSION = "v3"  # bump when the decode step changes, so old cache files are not reused
ON_BAD_IMAGE = ("error", "skip")


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


@dataclass
class DataBundle:
    """What :func:`build_datasets` returns. ``manifest`` holds the usable rows (hashed patients);
    ``quarantine`` the skipped files (``path``, ``label``, ``reason``; empty when none)."""

    card: DataCard
    classes: list[str]
    manifest: pd.DataFrame
    train: XrayDataset
    val: Optional[XrayDataset]
    test: Optional[XrayDataset]
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "label", "reason"]))
    # Images without a label (issue 17): the training rows ``data.label_fraction`` / ``label_count`` left
    # unlabelled plus the folder ``data.unlabeled``; training transform, every target -1. None when there are none.
    # Its manifest's ``withheld_target`` column keeps the label that label_fraction / label_count withheld (-1 for
    # the folder's images): for monitoring pseudo-labels only, never a training target.
    unlabeled: Optional["XrayDataset"] = None


@dataclass(frozen=True)
class _ImageCheck:
    """How :func:`build_datasets` / :func:`build_eval_dataset` decode and check every image, handed unchanged to
    the image scan and the datasets: one pre-resize side, VOI mode and decode cache serve them all."""

    side: Optional[int]  # the transforms' pre-resize side
    voi: str
    cache_dir: Optional[Path]
    on_bad_image: str
    progress: bool

    def dataset(self, manifest: pd.DataFrame, transform: Callable) -> XrayDataset:
        return XrayDataset(manifest, transform, cache_dir=self.cache_dir, voi=self.voi)


def scan_images(
    manifest: pd.DataFrame,
    *,
    side: Optional[int] = None,
    voi: str = "auto",
    cache_dir=None,
    progress: bool = True,
    desc: str = "checking images",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode every image once: returns (good rows + ``content_hash``/``height``/``width``/``bit_depth_note``,
    bad rows + ``reason``).

    With ``cache_dir`` the decoded, resized arrays go into the same MONAI cache that
    :class:`XrayDataset` reads, so training does not decode them again. 16-bit files read with fewer
    bits (12-bit data, see :func:`medtricks.data.readers.read_image`) give one ``BitDepthWarning``
    for the whole set, naming the first file; ``bit_depth_note`` says which files.
    """
    from tqdm.auto import tqdm

    manifest = manifest.reset_index(drop=True)
    bad: dict[int, str] = {}
    hashes: list[Optional[str]] = []
    for i, path in enumerate(manifest["path"]):  # cheap pass first: existence + content hash
        digest = None
        try:
            digest = file_digest(path)
        except FileNotFoundError:
            bad[i] = "file not found"
        except OSError as err:
            bad[i] = f"cannot read file ({err.strerror or err})"
        hashes.append(digest)
    items = [
        {
            "path": str(p),
            "target": 0,
            "key": f"{d}-{Path(p).stat().st_size}-{side}-{voi}-{_CACHE_VERSION}" if d else str(p),
        }
        for p, d in zip(manifest["path"], hashes)
    ]
    decoder = _monai_dataset(items, [_load_transform(side, voi)], cache_dir)
    sizes: list[tuple] = [(None, None)] * len(items)
    bit_notes = [""] * len(items)
    for i in tqdm(range(len(items)), desc=desc, unit="img", disable=not progress, leave=False):
        if i in bad:
            continue
        try:
            decoded = decoder[i]
            sizes[i] = tuple(decoded["image"].shape[:2])
            bit_notes[i] = str(decoded.get("bit_depth_note") or "")
        except Exception as err:
            found = _bad_image_in(err)
            if found is None:
                raise
            bad[i] = found.problem
    reduced = [note for i, note in enumerate(bit_notes) if note and i not in bad]
    if reduced:
        warnings.warn(
            BitDepthWarning(
                f"{len(reduced)} of {len(items)} images are 16-bit files holding fewer bits, read with the bits "
                f"they use (docs/data-and-models.md), e.g. {reduced[0]}"
            ),
            stacklevel=2,
        )
    good = manifest.assign(
        content_hash=hashes, height=[s[0] for s in sizes], width=[s[1] for s in sizes], bit_depth_note=bit_notes
    )
    mask = np.array([i in bad for i in range(len(manifest))], dtype=bool)
    quarantine = pd.DataFrame(
        {
            "path": manifest.loc[mask, "path"].tolist(),
            "label": manifest.loc[mask, "label"].tolist() if "label" in manifest else None,
            "reason": [bad[i] for i in np.flatnonzero(mask)],
        }
    )
    return good.loc[~mask].reset_index(drop=True), quarantine


def _prepare_synthetic(card: DataCard, root: Path, synth: Optional[dict]) -> None:
    if synth is None:
        return
    if card.name != SYNTHETIC_CARD:
        raise ConfigError(f"data.synth is only for the '{SYNTHETIC_CARD}' card; card {card.name!r} reads real data")
    params = dict(synth)
    if "format" in params:
        params["fmt"] = params.pop("format")
    allowed = {"n", "size", "seed", "fmt"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(f"data.synth: unknown key(s) {unknown}; expected {sorted(allowed | {'format'})}")
    params = {k: v for k, v in params.items() if v is not None}
    if (root / MANIFEST_NAME).is_file():
        existing = json.loads((root / PARAMS_NAME).read_text()) if (root / PARAMS_NAME).is_file() else {}
        differs = {k: (existing.get(k), v) for k, v in params.items() if existing.get(k) != v}
        if differs:
            raise ConfigError(
                f"{root} already holds a phantom set generated with other settings "
                f"(existing vs asked: {differs}); delete it or choose another data.root"
            )
        return
    synthesize_phantoms(root, classes=tuple(card.classes), **params)


def _checked_images(manifest, card, root, check: _ImageCheck, skip_hint: Optional[str] = "set data.on_bad_image=skip"):
    """Decode every image once; bad ones raise (``error``, listing each) or go to the quarantine (``skip``).
    ``skip_hint``: how the caller's user asks for ``skip`` (None: they cannot), said in the error."""
    if check.on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image={check.on_bad_image!r}: expected one of {ON_BAD_IMAGE}")
    good, quarantine = scan_images(
        manifest, side=check.side, voi=check.voi, cache_dir=check.cache_dir, progress=check.progress
    )
    if len(quarantine) and check.on_bad_image == "error":
        listed = "\n".join(f"  {p}: {r}" for p, r in zip(quarantine["path"][:20], quarantine["reason"][:20]))
        more = f"\n  ... and {len(quarantine) - 20} more" if len(quarantine) > 20 else ""
        raise BadImageError(
            quarantine["path"].iloc[0],
            f"{len(quarantine)} unusable image(s) in {root} (card {card.name!r}); fix or remove them"
            f"{f', or {skip_hint} to leave them out' if skip_hint else ''}:\n{listed}{more}",
        )
    good = good.drop(columns=["height", "width", "bit_depth_note"])
    good.attrs = dict(manifest.attrs)
    return good, quarantine


def build_eval_dataset(
    card,
    root,
    *,
    image_size: int,
    mean,
    std,
    in_chans: int,
    augment: str = "cxr_light",
    split: str = "all",
    split_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    test_by: str = "random",
    on_bad_image: str = "error",
    cache_dir=None,
    progress: bool = True,
    voi: str = "auto",
    classes: Optional[Sequence[str]] = None,
    class_map: Optional[Mapping[str, str]] = None,
    skip_hint: Optional[str] = None,
    class_map_option: Optional[str] = "--class-map",
):
    """One eval-transform dataset of ``root`` (every image, or one split of the card's patient-level
    split, checked for leakage) -> ``(XrayDataset, quarantine)``: what ``medtricks evaluate`` scores.

    ``classes``: the model's classes, when they differ from the card's; ``class_map`` maps card classes
    onto them (:mod:`medtricks.data.class_map`). The dataset's ``targets`` then index ``classes`` and
    ``dataset.manifest.attrs["class_map"]``/``["dropped_by_class_map"]`` say what was done. ``skip_hint``:
    how the calling command skips unusable images (``--on-bad-image skip``), named in the error; None: it
    cannot, and the error says only to fix or remove them. ``class_map_option``: likewise, how it takes a
    class map (None: it takes none)."""
    if split not in ("all", "train", "val", "test"):
        raise ConfigError(f"split must be all, train, val or test, got {split!r}")
    card = load_card(card)
    resolved = None
    if classes is not None or class_map:
        model_classes = list(classes if classes is not None else card.classes)
        resolved = resolve_class_map(card.name, card.classes, model_classes, class_map, option=class_map_option)
    manifest = build_manifest(
        card,
        root,
        split_seed=split_seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        on_missing="keep",
        test_by=test_by,
    )
    if split != "all":
        manifest = manifest[manifest["split"] == split]
        if not len(manifest):
            raise DataError(f"no images in split {split!r} of {root} (card {card.name!r})")
    if resolved is not None:
        manifest, dropped = apply_class_map(manifest, resolved, model_classes)
        manifest.attrs.update(class_map=resolved, dropped_by_class_map=dropped)
        if not len(manifest):
            raise DataError(f"the class map {resolved} leaves no image of {root} (card {card.name!r}) to score")
    transform = build_transforms(augment, image_size, mean=mean, std=std, in_chans=in_chans, train=False)
    check = _ImageCheck(
        side=transform.base_side,
        voi=voi,
        on_bad_image=on_bad_image,
        progress=progress,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
    )
    good, quarantine = _checked_images(manifest, card, root, check, skip_hint=skip_hint)
    if split != "all":
        check_leakage(good)  # the split is the card's: it must hold no patient of another split
    dataset = check.dataset(good, transform)
    dataset.manifest.attrs.update(
        {k: v for k, v in manifest.attrs.items() if k in ("class_map", "dropped_by_class_map")}
    )
    return dataset, quarantine


def build_datasets(
    card,
    root,
    *,
    image_size: int,
    mean,
    std,
    in_chans: int,
    augment: str = "cxr_light",
    split_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    on_bad_image: str = "error",
    cache_dir=None,
    synth: Optional[dict] = None,
    progress: bool = True,
    voi: str = "auto",
    test_by: str = "random",
    label_fraction: Optional[float] = None,
    label_count: Optional[int] = None,
    unlabeled: Optional[dict] = None,
) -> DataBundle:
    """Card + root -> :class:`DataBundle` with checked, leakage-free train / val / test datasets.

    Steps: (synthetic card + ``synth``: generate the set into ``root`` if absent) -> manifest ->
    decode every image once (tqdm; fills the decode cache) -> bad images: ``on_bad_image='error'``
    raises :class:`BadImageError` listing every bad file and its problem, ``'skip'`` moves them to
    ``bundle.quarantine`` -> :func:`check_leakage` -> datasets (train: ``augment`` preset; val/test:
    eval transform).

    Few labels (issue 17): ``label_fraction`` (or ``label_count`` images) keeps a stratified, patient-level
    subset of the training split labelled (:func:`~medtricks.data.splits.labeled_subset`, seeded with
    ``split_seed``; val and test untouched) and puts the rest of the training split in ``bundle.unlabeled``
    (every target -1; the withheld label in its manifest's ``withheld_target``, for monitoring only);
    ``unlabeled={"root": ..., "card": None}`` adds every image of a folder there (no labels read; with a
    card, the files that card lists). The manifest's ``labeled`` column says which training rows kept
    their label; unlabelled images identical to a val/test image are a :class:`LeakageError`.
    """
    card = load_card(card)
    root = Path(root).expanduser().resolve()
    _prepare_synthetic(card, root, synth)
    manifest = build_manifest(
        card,
        root,
        split_seed=split_seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        on_missing="keep",
        test_by=test_by,
    )
    train_tf = build_transforms(augment, image_size, mean=mean, std=std, in_chans=in_chans, train=True)
    eval_tf = build_transforms(augment, image_size, mean=mean, std=std, in_chans=in_chans, train=False)
    if train_tf.base_side != eval_tf.base_side:  # one cached array must serve both
        raise AssertionError("train and eval transforms disagree on the pre-resize side")
    check = _ImageCheck(
        side=train_tf.base_side,
        voi=voi,
        on_bad_image=on_bad_image,
        progress=progress,
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None,
    )

    good, quarantine = _checked_images(manifest, card, root, check)
    check_leakage(good)

    pool = []  # unlabelled manifests
    if label_fraction is not None or label_count is not None:
        train_rows = (good["split"] == "train").to_numpy()
        # Patients are keyed by their first image's path under the root, not by the salted hash: the salt
        # differs between machines, and the subset must depend on split_seed alone (as the splits do).
        rows = good.loc[train_rows]
        relative = rows["path"].map(lambda p: os.path.relpath(p, root))
        patient_key = relative.groupby(rows["patient"]).transform("min")
        mask = labeled_subset(rows["label"], patient_key, fraction=label_fraction, count=label_count, seed=split_seed)
        labeled = np.ones(len(good), dtype=bool)
        labeled[np.flatnonzero(train_rows)] = mask
        good = good.assign(labeled=labeled)
        withheld = good.loc[~labeled]
        pool.append(withheld.assign(withheld_target=withheld["target"].astype(int), target=-1))
        good.attrs = dict(manifest.attrs)

    def subset(split: str, tf) -> Optional[XrayDataset]:
        rows = good[good["split"] == split]
        if split == "train" and "labeled" in rows.columns:
            rows = rows[rows["labeled"]]
        return check.dataset(rows, tf) if len(rows) else None

    train = subset("train", train_tf)
    if train is None:
        raise DataError(
            f"no training images left for card {card.name!r} under {root} "
            f"({len(quarantine)} quarantined); check the split settings"
        )
    if unlabeled is not None:
        pool.append(_unlabeled_folder(unlabeled, good, check))
    pool = [rows for rows in pool if len(rows)]
    columns = ["path", "target", "withheld_target", "content_hash"]
    pool = [rows if "withheld_target" in rows.columns else rows.assign(withheld_target=-1) for rows in pool]
    unlabeled_set = (
        check.dataset(pd.concat([rows[columns] for rows in pool], ignore_index=True), train_tf) if pool else None
    )
    return DataBundle(
        card=card,
        classes=list(card.classes),
        manifest=good,
        train=train,
        val=subset("val", eval_tf),
        test=subset("test", eval_tf),
        quarantine=quarantine,
        unlabeled=unlabeled_set,
    )


_UNLABELED_KEYS = {"root", "card"}


def list_unlabeled(root, card=None) -> pd.DataFrame:
    """The images of an unlabelled folder as a manifest (``path``, ``target`` = -1): every image file
    under ``root`` (the image extensions of the folder layout, hidden and ``__MACOSX`` folders skipped),
    or with ``card`` the files that card lists there, whatever their labels or splits. No image is decoded."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise MissingFileError(f"data.unlabeled.root {str(root)!r} is not a folder; point it at the unlabelled images")
    if card is not None:
        rows = build_manifest(load_card(card), root, on_missing="keep")
        paths = sorted(str(p) for p in rows["path"])
    else:
        layout = FolderLayout(kind="folder")
        paths = [
            str(p)
            for p in walk_files(root, skip_dirs=tuple(layout.exclude_dirs))
            if p.suffix.lower() in layout.extensions
        ]
    if not paths:
        raise DataError(
            f"data.unlabeled: no image files under {root} "
            f"({'card ' + repr(card) if card else 'extensions png, jpg, jpeg, dcm, dicom, tif, tiff'})"
        )
    return pd.DataFrame({"path": paths, "label": "", "target": -1})


def _unlabeled_folder(spec: dict, labelled: pd.DataFrame, check: _ImageCheck) -> pd.DataFrame:
    """``data.unlabeled``: list, decode-check (bad images as ``on_bad_image`` says) and leakage-check the folder."""
    unknown = sorted(set(spec) - _UNLABELED_KEYS)
    if unknown or not spec.get("root"):
        raise ConfigError(f"data.unlabeled: expected keys {sorted(_UNLABELED_KEYS)} with a root, got {spec!r}")
    rows = list_unlabeled(spec["root"], spec.get("card"))
    good, bad = scan_images(
        rows,
        side=check.side,
        voi=check.voi,
        cache_dir=check.cache_dir,
        progress=check.progress,
        desc="checking unlabelled images",
    )
    if len(bad) and check.on_bad_image == "error":
        listed = "\n".join(f"  {p}: {r}" for p, r in zip(bad["path"][:20], bad["reason"][:20]))
        raise BadImageError(
            bad["path"].iloc[0],
            f"{len(bad)} unusable image(s) in data.unlabeled.root "
            f"{spec['root']}; fix or remove them, or set data.on_bad_image=skip:\n{listed}",
        )
    held = labelled[labelled["split"].isin(["val", "test"])]
    held_hashes = set(held["content_hash"]) if "content_hash" in held.columns else set()
    same = good[good["content_hash"].isin(held_hashes)]
    if len(same):
        raise LeakageError(
            f"data.unlabeled: {len(same)} image(s) are byte-identical to validation/test images "
            f"(e.g. {same['path'].iloc[0]}); training on them, even without labels, leaks the "
            "held-out images into the model. Remove them or point data.unlabeled at other images",
            sorted(same["path"]),
        )
    return good[["path", "target", "content_hash"]]


__all__ = [
    "XrayDataset",
    "DataBundle",
    "build_datasets",
    "build_eval_dataset",
    "scan_images",
    "resize_shorter_side",
    "list_unlabeled",
]
