"""Building a run's datasets: card -> manifest -> image scan (bad images found before training, the
decode cache filled on the way) -> leakage check -> train/val/test datasets.

:func:`build_datasets` is the one entry point a run needs, :func:`build_eval_dataset` the one
``medtricks evaluate`` needs. The pieces have their own modules, and their names stay importable
from here: the dataset with its cached decode step (:mod:`medtricks.data.xray_dataset`), the image
scan (:mod:`medtricks.data.image_scan`), unlabelled folders (:mod:`medtricks.data.unlabeled`).

Example::

    bundle = build_datasets("synthetic-phantoms", "data/phantoms", image_size=64, mean=(0.5,), std=(0.5,),
                            in_chans=1, synth={"n": 300, "size": 64})
    x, y = bundle.train[0]          # tensor (1, 64, 64), int
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from medtricks.errors import ConfigError
from medtricks.data.cards import DataCard, load_card
from medtricks.data.class_map import apply_class_map, resolve_class_map
from medtricks.data.errors import DataError
from medtricks.data.manifest import build_manifest
from medtricks.data.splits import check_leakage, labeled_subset
from medtricks.data.synthetic import MANIFEST_NAME, PARAMS_NAME, SYNTHETIC_CARD, synthesize_phantoms
from medtricks.data.transforms import build_transforms

# The dataset, the image scan and the unlabelled folder have their own modules; their public names
# stay importable from here (``X as X``: a re-export).
from medtricks.data.image_scan import ON_BAD_IMAGE as ON_BAD_IMAGE
from medtricks.data.image_scan import _checked_images, _ImageCheck, scan_images
from medtricks.data.unlabeled import _unlabeled_folder, list_unlabeled
from medtricks.data.xray_dataset import LoadXrayd as LoadXrayd
from medtricks.data.xray_dataset import XrayDataset, resize_shorter_side


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


__all__ = [
    "XrayDataset",
    "DataBundle",
    "build_datasets",
    "build_eval_dataset",
    "scan_images",
    "resize_shorter_side",
    "list_unlabeled",
]
