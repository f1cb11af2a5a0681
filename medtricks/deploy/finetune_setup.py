"""What ``medtricks adapt --method finetune`` settles before any training (:mod:`medtricks.deploy.finetune`):
the parent run (checked against the site's card), the labelled site sample (checked for overlap with the
parent's data, duplicates and patients per class), and the plan (the fine-tuning recipe, the patient folds
and the cross-fit's id and folder); and the records the phases hand on to each other."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from medtricks.data import folder_id
from medtricks.data.manifest import image_id, patient_salt
from medtricks.deploy.calibrate import SiteSampleError, check_site_overlap
from medtricks.deploy.finetune_folds import check_folds, duplicate_bytes, fold_splits, keep_parent_files, rel_paths
from medtricks.deploy.finetune_recipe import finetune_recipe
from medtricks.deploy.fit import patient_folds
from medtricks.errors import ConfigError
from medtricks.posthoc.evaluation import eval_dataset
from medtricks.recipe import Recipe, recipe_digest
from medtricks.rundir import RunDir

_ID_IGNORES = (
    ("tracking",),
    ("train", "progress"),
    ("eval",),
    ("audit",),
    ("experiment", "output_dir"),
    ("experiment", "name"),
)


# ------------------------------------------------------------------------- what the phases share
@dataclass(frozen=True)
class FinetuneOptions:
    """The fine-tuning and cross-fit options of :func:`~medtricks.deploy.finetune.finetune_run`, handed to its
    phases unchanged."""

    folds: int
    epochs: int
    lr: Optional[float]
    freeze: Optional[Sequence]
    overrides: Sequence[str]
    seed: int
    n_bootstrap: int
    ci: float
    batch_size: Optional[int]
    device: str
    progress: bool


@dataclass(frozen=True)
class ParentRun:
    """The parent run: loaded, and the files every fold and the final run start from."""

    trained: Any  # TrainedModel (its model is dropped once the site is scored)
    name: str  # run id, else folder
    folder: RunDir
    local: bool  # False: a temporary copy of a run found by id in a run store
    weights: str  # run:<folder the fine-tuning starts from>
    out: Path  # holds the cross-fit folder and the final run


@dataclass(frozen=True)
class SiteSample:
    """The labelled site images in manifest order, as the cross-fit reads them."""

    card: Any  # the site's DataCard
    root: Path  # resolved
    dataset: Any
    manifest: pd.DataFrame
    y: np.ndarray
    groups: np.ndarray  # hashed patients
    labels: list[str]
    per_class: dict[str, int]
    patients_per_class: dict[str, int]


@dataclass(frozen=True)
class CrossFitPlan:
    """The fine-tuning recipe, the folds and where the cross-fit lives (its id digests all of them)."""

    recipe: Recipe
    fold_of: np.ndarray
    splits: list[np.ndarray]
    rel: list[str]  # image paths relative to the site root
    ids: list[str]  # salted image ids
    image_set: str
    id: str
    folder: Path


@dataclass(frozen=True)
class CrossFit:
    """The cross-fit's out-of-fold predictions, thresholds and report."""

    probs: np.ndarray
    fold_thresholds: list[float]
    parent_thresholds: list[float]
    fold_runs: list[dict[str, Any]]
    trained_folds: int
    metrics: dict[str, Any]


# ------------------------------------------------------------------ the phases before any training
def parent_run(trained, site_card, card, output_dir: Optional[str | Path]) -> ParentRun:
    """The loaded parent, checked against the site's card, and the folder the fine-tuning starts from."""
    parent_name = trained.run_id or str(trained.run_dir)
    if list(site_card.classes) != list(trained.classes):
        raise ConfigError(
            f"--card {card!r} has classes {list(site_card.classes)}, but run {parent_name} was trained on "
            f"{list(trained.classes)}: a run: start keeps the parent's head only for the same classes "
            "in the same order, so the site model would not be a fine-tuned version of the run; use a "
            "card with the run's classes"
        )
    if len(trained.classes) != 2:
        raise ConfigError(
            f"--method finetune reports decisions at thresholds and applies to binary models; run "
            f"{parent_name} has {len(trained.classes)} classes {trained.classes}"
        )
    parent = RunDir(trained.run_dir)
    local_parent = parent.state_file.is_file()  # else a temporary copy of a run found by id in a run store
    out = (
        Path(output_dir)
        if output_dir is not None
        else (parent.output_dir if local_parent else Path(trained.recipe.experiment.output_dir))
    )
    out = out.expanduser().resolve()
    start = parent.path.resolve() if local_parent else keep_parent_files(parent, trained.run_id, out)
    return ParentRun(
        trained=trained, name=parent_name, folder=parent, local=local_parent, weights=f"run:{start}", out=out
    )


def site_sample(
    parent: ParentRun, site_card, card, root, *, tracking_uri, opts: FinetuneOptions, warn: list[str]
) -> SiteSample:
    """The site sample, checked (overlap with the parent's data, duplicates, patients per class) before any training."""
    trained = parent.trained
    site_root = Path(root).expanduser().resolve()
    dataset, _ = eval_dataset(trained, card, root, split="all", progress=opts.progress)
    manifest = dataset.manifest.reset_index(drop=True)
    warn += check_site_overlap(
        trained,
        manifest,
        root,
        tracking_uri,
        parent.name,
        why="its out-of-the-box scores there are not a site measurement. Remove those images "
        "(their patients) from the sample",
    )
    duplicates = duplicate_bytes(manifest)
    if duplicates:
        raise SiteSampleError(
            f"{duplicates} image(s) of the site sample are filed (identical bytes) under two "
            "patients; a run refuses identical images in two splits: remove the copies"
        )
    y = manifest["target"].to_numpy().astype(int)
    groups = manifest["patient"].astype(str).to_numpy()
    labels = manifest["label"].astype(str).tolist()
    per_class = {c: int((y == i).sum()) for i, c in enumerate(trained.classes)}
    patients_per_class = {c: int(len(np.unique(groups[y == i]))) for i, c in enumerate(trained.classes)}
    if min(patients_per_class.values()) < int(opts.folds):
        raise SiteSampleError(
            f"the site sample has {patients_per_class} patients per class; cross-fitting in "
            f"{opts.folds} folds needs at least that many patients of every class (use fewer --folds)"
        )
    return SiteSample(
        card=site_card,
        root=site_root,
        dataset=dataset,
        manifest=manifest,
        y=y,
        groups=groups,
        labels=labels,
        per_class=per_class,
        patients_per_class=patients_per_class,
    )


def crossfit_plan(parent: ParentRun, sample: SiteSample, card, root, opts: FinetuneOptions) -> CrossFitPlan:
    """The fine-tuning recipe, the patient folds (checked) and the cross-fit's id and folder."""
    trained = parent.trained
    recipe = finetune_recipe(
        trained.recipe,
        weights=parent.weights,
        card=card,
        root=str(sample.root),
        epochs=opts.epochs,
        lr=opts.lr,
        freeze=opts.freeze,
        overrides=opts.overrides,
        output_dir=str(parent.out),
        name=f"{trained.recipe.experiment.name}-finetune",
        batch_size=opts.batch_size,
        device=None if opts.device == "auto" else opts.device,
    )
    y, groups = sample.y, sample.groups
    fold_of = patient_folds(y, groups, opts.folds, opts.seed)
    val_fraction, split_seed = recipe.data.val_fraction, recipe.data.split_seed
    splits = [
        fold_splits(sample.labels, groups, fold_of, k, val_fraction=val_fraction, split_seed=split_seed)
        for k in range(int(opts.folds))
    ]
    check_folds(y, splits, list(trained.classes), recipe.train.batch_size)
    salt = patient_salt()
    rel = rel_paths(sample.manifest, sample.root)
    ids = [image_id(r, salt) for r in rel]
    h = hashlib.sha256()
    for line in sorted(
        f"{i}\t{lab}\t{p}\t{c}"
        for i, lab, p, c in zip(
            ids, sample.labels, groups, sample.manifest.get("content_hash", pd.Series([""] * len(ids)))
        )
    ):
        h.update(line.encode() + b"\n")
    image_set = h.hexdigest()
    crossfit_id = recipe_digest(
        recipe,
        ignore=_ID_IGNORES,
        parent=trained.run_id or parent.weights,
        site=folder_id(root),
        images=image_set,
        folds=int(opts.folds),
        seed=int(opts.seed),
        card=sample.card.name,
    )
    return CrossFitPlan(
        recipe=recipe,
        fold_of=fold_of,
        splits=splits,
        rel=rel,
        ids=ids,
        image_set=image_set,
        id=crossfit_id,
        folder=parent.out / f"finetune-{crossfit_id}",
    )
