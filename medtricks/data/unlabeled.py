"""Images without labels (issue 17): the ``data.unlabeled`` folder, listed, decode-checked and checked
against leaking validation/test images into training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medtricks.errors import ConfigError, MissingFileError
from medtricks.data.cards import FolderLayout, load_card
from medtricks.data.errors import BadImageError, DataError, LeakageError
from medtricks.data.file_listing import walk_files
from medtricks.data.image_scan import _ImageCheck, scan_images
from medtricks.data.manifest import build_manifest

__all__ = ["list_unlabeled"]

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
