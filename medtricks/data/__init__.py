"""Medical data layer: data cards, X-ray/DICOM readers, manifests, patient-level splits, leakage
checks, augmentation presets, datasets with a decode cache, synthetic phantoms.

Names are re-exported lazily (PEP 562), so ``import medtricks.data`` does not import
albumentations, pydicom or MONAI until a function that needs them is used.

Example::

    from medtricks.data import load_card, build_manifest, read_image
    card = load_card("kermany-pneumonia")
    manifest = build_manifest(card, "../shared/data/kermany224/train", split_seed=0)
    image = read_image(manifest.path[0])           # float32 (H, W) in [0, 1], bright = dense
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # cards
    "DataCard": "medtricks.data.cards",
    "load_card": "medtricks.data.cards",
    "list_cards": "medtricks.data.cards",
    "cards_dir": "medtricks.data.cards",
    "card_from_dict": "medtricks.data.cards",
    # errors
    "DataError": "medtricks.data.errors",
    "CardError": "medtricks.data.errors",
    "BadImageError": "medtricks.data.errors",
    "ManifestError": "medtricks.data.errors",
    "LeakageError": "medtricks.data.errors",
    "UnseenLabelWarning": "medtricks.data.errors",
    # readers
    "read_image": "medtricks.data.readers",
    "read_image_with_meta": "medtricks.data.readers",
    # manifests and splits
    "build_manifest": "medtricks.data.manifest",
    "split_summary": "medtricks.data.manifest",
    "export_manifest": "medtricks.data.redaction",
    "export_quarantine": "medtricks.data.redaction",
    "redact_paths": "medtricks.data.redaction",
    "folder_id": "medtricks.data.hashed_ids",
    "hash_patient": "medtricks.data.hashed_ids",
    "assign_splits": "medtricks.data.splits",
    "check_leakage": "medtricks.data.splits",
    # transforms and datasets
    "build_transforms": "medtricks.data.transforms",
    "XrayTransform": "medtricks.data.transforms",
    "XrayDataset": "medtricks.data.xray_dataset",
    "DataBundle": "medtricks.data.datasets",
    "build_datasets": "medtricks.data.datasets",
    "build_eval_dataset": "medtricks.data.datasets",
    "scan_images": "medtricks.data.image_scan",
    # synthetic data and reports
    "synthesize_phantoms": "medtricks.data.synthetic",
    "data_check_report": "medtricks.data.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cache: later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 'medtricks.data' has no attribute {name!r}")


def __dir__():
    return __all__
