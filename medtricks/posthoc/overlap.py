"""Did the run see the evaluation data? Images (identical bytes) and patients shared with its split manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from medtricks.data.manifest import content_id, image_id, patient_salt
from medtricks.posthoc.store import run_file
from medtricks.rundir import RunDir

__all__ = ["SplitOverlap", "split_overlap"]


@dataclass
class SplitOverlap:
    """Evaluation images found in the trained run's split manifest, per split (``train``/``val``/``test``):
    ``images[split]``: evaluated images with identical bytes (or the same file) in that split;
    ``patients[split]``: evaluated patients (salted hashes) in that split."""

    n_images: int
    n_patients: int
    images: dict[str, int] = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)
    by_bytes: bool = True  # False: the run's manifest predates content ids; files compared by path under one root

    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "test") if self.images.get(s) or self.patients.get(s)]

    def summary(self) -> str:
        """``train: 40 images, 25 patients; val: 8 images, 5 patients`` ('' without overlap)."""
        return "; ".join(
            f"{s}: {self.images.get(s, 0)} images, {self.patients.get(s, 0)} patients" for s in self.splits()
        )

    def messages(self, synthetic: bool = False) -> tuple[list[str], list[str]]:
        """``(warnings, notes)``: overlap with train or val is a warning (those numbers are not from
        unseen data), with the run's own test split a note (it is the internal, not an external, test)."""
        warns, notes = [], []
        how = "identical bytes" if self.by_bytes else "the same files"
        for split in self.splits():
            text = (
                f"{self.images.get(split, 0)} of {self.n_images} evaluated images ({how}) and "
                f"{self.patients.get(split, 0)} of {self.n_patients} patients are in the run's {split} split "
                "(its artifacts/split_manifest.csv)"
            )
            if split == "test":
                notes.append(f"{text}: this is the run's own held-out test data, not an external set")
                continue
            why = (
                "the model was trained on them"
                if split == "train"
                else "they chose the model's checkpoint and operating point"
            )
            hint = (
                "; `medtricks data synth` with the same --n/--size/--seed redraws the run's own phantoms: use "
                "another --seed for an independent set"
                if synthetic
                else ""
            )
            warns.append(f"{text}: {why}, so these metrics overstate performance on unseen data{hint}")
        return warns, notes


def split_overlap(trained, manifest, root, tracking_uri: Optional[str] = None) -> Optional[SplitOverlap]:
    """How much of an evaluation set (``manifest``: the eval dataset's rows, with hashed ``patient`` and the
    image scan's ``content_hash``) the trained run saw: compared with its ``artifacts/split_manifest.csv``
    (read with :func:`~medtricks.posthoc.store.run_file`), by salted content ids (identical bytes) and salted patient hashes —
    the same salt (:func:`~medtricks.data.manifest.patient_salt`) as the run's, so this works on the
    machine that trained it (or with a shared ``MEDTRICKS_PATIENT_SALT``). Patient hashes include the
    card name, so patients match under the same card. Runs whose manifest has no ``content_id`` are
    compared by file (same data root) instead. ``None`` when the run kept no split manifest."""
    frame = run_file(trained, RunDir.manifest_artifact(), pd.read_csv, tracking_uri)
    if frame is None or "split" not in frame.columns:
        return None
    salt = patient_salt()
    eval_patients = manifest["patient"].astype(str) if "patient" in manifest.columns else pd.Series([], dtype=str)
    by_bytes = "content_id" in frame.columns and "content_hash" in manifest.columns
    if by_bytes:
        eval_keys = [content_id(h, salt) if isinstance(h, str) else None for h in manifest["content_hash"]]
        run_keys = frame["content_id"]
    else:
        eval_keys, run_keys = [None] * len(manifest), pd.Series([None] * len(frame))
        try:
            same_root = Path(root).expanduser().resolve() == Path(trained.recipe.data.root).expanduser().resolve()
        except (OSError, RuntimeError):
            same_root = False
        if same_root and "image_id" in frame.columns:
            base = Path(root).expanduser().resolve()
            eval_keys = []
            for p in manifest["path"]:
                try:
                    eval_keys.append(image_id(Path(p).resolve().relative_to(base).as_posix(), salt))
                except ValueError:
                    eval_keys.append(None)
            run_keys = frame["image_id"]
    overlap = SplitOverlap(n_images=len(manifest), n_patients=int(eval_patients.nunique()), by_bytes=by_bytes)
    for split in ("train", "val", "test"):
        rows = frame["split"] == split
        if not rows.any():
            continue
        keys = set(run_keys[rows].dropna().astype(str))
        patients = set(frame.loc[rows, "patient"].astype(str)) if "patient" in frame.columns else set()
        n_img = sum(1 for k in eval_keys if k is not None and k in keys)
        n_pat = int(eval_patients[eval_patients.isin(patients)].nunique())
        if n_img:
            overlap.images[split] = n_img
        if n_pat:
            overlap.patients[split] = n_pat
    return overlap
