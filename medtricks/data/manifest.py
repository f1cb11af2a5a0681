"""Manifests: one row per image (path, label, target, patient, split), built from a card and a root.

Building a manifest only lists files (:mod:`medtricks.data.file_listing`: following symlinked folders
and files) and reads label tables; it decodes no image, and hashes only the bytes of files that share
their byte size with another (to find one image filed under two labels), so it is fast even for tens of
thousands of files. Patients are replaced by a salted hash (:mod:`medtricks.data.hashed_ids`) before the
manifest leaves this module; splits are computed on the raw IDs, so ``split_seed`` alone decides them.
The copies that are safe to log are made in :mod:`medtricks.data.redaction`.

Example::

    from medtricks.data import build_manifest
    m = build_manifest("kermany-pneumonia", "../shared/data/kermany224/train", split_seed=0)
    m.groupby(["split", "label"]).size()
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import pandas as pd

from medtricks.errors import ConfigError
from medtricks.data.cards import DROP, SPLITS, DataCard, load_card
from medtricks.data.errors import LeakageError, ManifestError, UnseenLabelWarning
from medtricks.data.file_listing import _first_group, list_records
from medtricks.data.hashed_ids import content_id, folder_id, hash_patient, image_id, patient_salt
from medtricks.data.redaction import REDACTED_ROOT, export_manifest, export_quarantine, redact_paths
from medtricks.data.splits import assign_splits, conflicting_duplicates

MANIFEST_COLUMNS = ["path", "label", "target", "patient", "split"]
_MAX_LISTED = 10


def _raw_patient(card: DataCard, rec: dict, patient_re: Optional[re.Pattern]) -> str:
    spec = card.patient
    if spec.per_image:
        return str(rec["path"])
    if spec.column or spec.template:
        value = str(rec["row"][spec.column]).strip() if spec.column else spec.template.format(**rec["row"]).strip()
        if not value or (
            spec.column is None
            and not any(str(rec["row"][f]).strip() for f in re.findall(r"\{([^{}:!]+)", spec.template))
        ):
            raise ManifestError(f"{rec['where']}: empty patient ({spec.column or spec.template!r}) for {rec['path']}")
        return value
    m = patient_re.search(rec["path"].name)
    if not m:
        raise ManifestError(
            f"{rec['path']}: file name does not match the card's patient regex "
            f"{spec.regex!r}; expected e.g. a name the card describes"
        )
    return _first_group(m, "patient")


def _summarise(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def build_manifest(
    card,
    root,
    split_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    *,
    on_missing: str = "error",
    test_by: str = "random",
    on_conflicting_duplicates: str = "error",
    unknown_labels: Optional[str] = None,
) -> pd.DataFrame:
    """One row per image: ``path`` (absolute), ``label``, ``target``, ``patient`` (salted hash), ``split``.

    ``card``: a card name, a YAML path or a :class:`DataCard`. Unknown raw labels, files missing from a
    label table (with ``on_missing='error'``), conflicting labels for one file and file names that do
    not match the card's patient rule are errors naming the file. Rows left out on purpose (card
    filters, ``drop`` labels, non-image files, identical duplicate rows) are counted in
    ``manifest.attrs['notes']``. ``on_missing='keep'`` keeps rows of missing files (the image scan
    of :func:`build_datasets` then reports or quarantines them).

    Identical image bytes under two different labels raise a :class:`ManifestError` (in one split)
    or :class:`LeakageError` (across splits) listing the files, unless the card sets
    ``allow_conflicting_duplicates`` or ``on_conflicting_duplicates='keep'`` (``medtricks data
    check`` reports them instead); either
    way they are in ``manifest.attrs['conflicting_duplicates']`` (groups of ``(path, label, split)``).
    Only files that share a byte size are hashed.

    Raw labels the card does not name follow its ``unknown_labels`` policy (``unknown_labels`` here overrides
    it): ``error`` stops naming them; ``drop`` or a class leaves them out or maps them, counted in ``notes``,
    listed with their counts in ``manifest.attrs['unseen_labels']`` and warned about (:class:`UnseenLabelWarning`).
    """
    if on_missing not in ("error", "keep"):
        raise ConfigError(f"on_missing={on_missing!r}: expected 'error' or 'keep'")
    if on_conflicting_duplicates not in ("error", "keep"):
        raise ConfigError(f"on_conflicting_duplicates={on_conflicting_duplicates!r}: expected 'error' or 'keep'")
    card = load_card(card)
    if unknown_labels is not None and unknown_labels != card.unknown_labels:
        card = type(card).model_validate({**card.model_dump(by_alias=True), "unknown_labels": unknown_labels})
    if card.task == "multilabel":
        raise NotImplementedError(
            f"card {card.name!r} is multilabel; multilabel manifests and training are not "
            "supported yet (the card is validated and documented only)"
        )
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ManifestError(f"data root {root} does not exist or is not a folder (card {card.name!r})")

    notes: Counter = Counter()
    records = list_records(card, root, notes)
    if not records:
        raise ManifestError(
            f"no images found under {root} for card {card.name!r} "
            f"(layout {card.layout.kind}; check the root and the card's layout)"
        )

    unknown: dict[str, list[str]] = {}
    unseen: Counter = Counter()
    kept = []
    for rec in records:
        target = card.map_label(rec["raw_label"])
        if target is None:
            target = card.map_unseen_label(rec["raw_label"])
            if target is None:
                unknown.setdefault(rec["raw_label"], []).append(str(rec["path"]))
                continue
            unseen[rec["raw_label"]] += 1
        if target == DROP:
            why = "card unknown_labels" if rec["raw_label"] in unseen else "card drop list"
            notes[f"images with label {rec['raw_label']!r} dropped ({why})"] += 1
        else:
            rec["label"] = target
            kept.append(rec)
    if unknown:
        details = "; ".join(f"{raw!r} ({len(p)} files, e.g. {p[0]})" for raw, p in sorted(unknown.items()))
        raise ManifestError(
            f"card {card.name!r}: unknown raw label(s): {details}. Expected one of "
            f"{sorted(set(card.label_map) | set(card.classes))} or a match of its label_patterns; "
            "add them to the card's label_map (or to 'drop' to leave them out on purpose), or set "
            "the card's unknown_labels to a class or 'drop' for every label it does not know"
        )
    if unseen:
        for raw, count in unseen.items():
            if card.unknown_labels != DROP:
                notes[f"images with unseen label {raw!r} mapped to {card.unknown_labels!r} (card unknown_labels)"] += (
                    count
                )
        listed = ", ".join(f"{raw!r} ({n})" for raw, n in sorted(unseen.items()))
        warnings.warn(
            f"card {card.name!r}: {sum(unseen.values())} image(s) carry raw label(s) the card does not "
            f"name: {listed}; unknown_labels: {card.unknown_labels!r} "
            f"{'left them out' if card.unknown_labels == DROP else 'mapped them to that class'}",
            UnseenLabelWarning,
            stacklevel=2,
        )

    missing = [str(r["path"]) for r in kept if not r["path"].is_file()]
    if missing and on_missing == "error":
        raise ManifestError(
            f"{len(missing)} file(s) named in the label table(s) do not exist under {root}: {_summarise(missing)}"
        )

    patient_re = re.compile(card.patient.regex) if card.patient.regex else None
    df = pd.DataFrame(
        {
            "path": [str(r["path"]) for r in kept],
            "label": [r["label"] for r in kept],
            "raw_patient": [_raw_patient(card, r, patient_re) for r in kept],
            "declared_split": [r["declared_split"] for r in kept],
        }
    )
    # A file listed twice with the same label (RSNA: one row per box) is one image; with two labels, an error.
    conflicts = df.groupby("path")["label"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        raise ManifestError(
            f"{len(conflicts)} file(s) have conflicting labels in the label table(s): "
            f"{_summarise(list(conflicts.index))}"
        )
    n_before = len(df)
    df = df.drop_duplicates(subset=["path"]).sort_values("path", kind="stable").reset_index(drop=True)
    if len(df) < n_before:
        notes["duplicate rows of one file collapsed"] += n_before - len(df)

    df["split"] = assign_splits(
        df["label"],
        df["raw_patient"],
        df["declared_split"],
        seed=split_seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        test_by=test_by,
    )
    conflicting = conflicting_duplicates(df)
    if conflicting and on_conflicting_duplicates == "error" and not card.allow_conflicting_duplicates:
        shown = "\n".join(
            "  same bytes: "
            + ", ".join(f"{p} ({label}, {split})" for p, label, split in group[:4])
            + (f", ... ({len(group) - 4} more)" if len(group) > 4 else "")
            for group in conflicting[:_MAX_LISTED]
        )
        more = f"\n  ... and {len(conflicting) - _MAX_LISTED} more group(s)" if len(conflicting) > _MAX_LISTED else ""
        message = (
            f"{len(conflicting)} image(s) appear with identical bytes under different labels "
            f"(card {card.name!r}, root {root}); fix the labels or remove the copies, or set "
            f"allow_conflicting_duplicates: true in the card if that is intended:\n{shown}{more}"
        )
        if any(len({split for *_, split in group}) > 1 for group in conflicting):  # in two splits: leakage too
            raise LeakageError(message, sorted({p for group in conflicting for p, _, _ in group}))
        raise ManifestError(message)
    salt = patient_salt()
    hashes = {raw: hash_patient(raw, card.name, salt) for raw in df["raw_patient"].unique()}
    df["patient"] = df["raw_patient"].map(hashes)
    df["target"] = df["label"].map({c: i for i, c in enumerate(card.classes)}).astype("int64")
    out = df[MANIFEST_COLUMNS].copy()
    out.attrs.update(
        card=card.name,
        root=str(root),
        notes=dict(notes),
        missing=missing,
        unseen_labels={str(raw): int(n) for raw, n in sorted(unseen.items())},
        declared_splits=sorted(set(df["declared_split"].dropna())),
        conflicting_duplicates=conflicting,
    )
    return out


def split_summary(manifest: pd.DataFrame, classes) -> pd.DataFrame:
    """Images per split x class, plus totals and patients per split (for reports and logs)."""
    table = pd.crosstab(manifest["split"], pd.Categorical(manifest["label"], categories=list(classes)), dropna=False)
    table.columns = [str(c) for c in table.columns]
    table = table.reindex([s for s in SPLITS if s in table.index])
    table["total"] = table.sum(axis=1)
    table["patients"] = manifest.groupby("split")["patient"].nunique().reindex(table.index).astype(int)
    return table


# The IDs and the logged copies live in hashed_ids / redaction; re-exported here, where other layers import them.
__all__ = [
    "build_manifest",
    "export_manifest",
    "export_quarantine",
    "redact_paths",
    "image_id",
    "content_id",
    "folder_id",
    "hash_patient",
    "patient_salt",
    "split_summary",
    "MANIFEST_COLUMNS",
    "REDACTED_ROOT",
]
