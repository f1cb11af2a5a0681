"""The folders of a fine-tuning cross-fit: patient folds and their splits, each fold's data card on disk,
and the fold runs and final run already there (so the same command again resumes instead of retraining).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import yaml

from medtricks._atomic import atomic_path
from medtricks.data import assign_splits
from medtricks.deploy.adapt import ADAPTATION_FILE
from medtricks.deploy.calibrate import SiteSampleError
from medtricks.errors import ConfigError
from medtricks.evaluate.paired import load_predictions
from medtricks.recipe import Recipe, load_run_recipe, recipe_digest
from medtricks.rundir import RunDir

__all__ = [
    "fold_splits",
    "check_folds",
    "duplicate_bytes",
    "rel_paths",
    "write_fold_data",
    "finished_fold",
    "fold_predictions",
    "keep_parent_files",
    "find_final",
]


def fold_splits(
    y: Any, groups: Any, fold_of: np.ndarray, k: int, *, val_fraction: float, split_seed: int = 0
) -> np.ndarray:
    """``train`` / ``val`` / ``test`` per image for fold ``k``: fold ``k`` is the test; ``val_fraction`` of the
    other folds' images (whole patients, stratified) is the validation part, carved by
    :func:`medtricks.data.assign_splits` like a run carves its own validation split."""
    y, groups = np.asarray(y).astype(str), np.asarray(groups).astype(str)
    out = np.full(len(y), "test", dtype=object)
    pool = np.flatnonzero(fold_of != k)
    out[pool] = assign_splits(y[pool], groups[pool], seed=split_seed, val_fraction=val_fraction, test_fraction=0.0)
    return out.astype(str)


def check_folds(y: np.ndarray, splits: list[np.ndarray], classes: list[str], batch_size: int) -> None:
    """Every fold's train, val and test part holds every class; the training parts hold a full batch."""
    for k, split in enumerate(splits):
        for part in ("train", "val", "test"):
            have = set(np.unique(y[split == part]).tolist())
            lacking = [classes[c] for c in range(len(classes)) if c not in have]
            if lacking:
                raise SiteSampleError(
                    f"cross-fit fold {k + 1} of {len(splits)}: its {part} part holds no image of class(es) "
                    f"{lacking} ({int((split == part).sum())} images): too few patients of a class for this many "
                    "folds and this validation share; use fewer --folds, or --set data.val_fraction=0.25, or label "
                    "more site images"
                )
        n_train = int((split == "train").sum())
        if n_train < batch_size:
            raise ConfigError(
                f"cross-fit fold {k + 1}: {n_train} training images, fewer than train.batch_size="
                f"{batch_size}; lower it (--batch-size N)"
            )


def duplicate_bytes(manifest: pd.DataFrame) -> int:
    """Identical images (same bytes) filed under two patients: runs refuse them in two splits."""
    if "content_hash" not in manifest.columns or manifest["content_hash"].isna().any():
        return 0
    per = manifest.groupby("content_hash")["patient"].nunique()
    return int((per > 1).sum())


# ------------------------------------------------------------------------------- fold runs
def rel_paths(manifest: pd.DataFrame, root: Path) -> list[str]:
    rel = []
    for p in manifest["path"]:
        try:
            rel.append(Path(p).relative_to(root).as_posix())
        except ValueError:
            rel.append(Path(p).resolve().relative_to(root).as_posix())
    return rel


def write_fold_data(
    folder: Path, k: int, site_card, rel: list[str], labels: Sequence[str], patients: Sequence[str], split: np.ndarray
) -> Path:
    """Fold ``k``'s card: the site images (paths relative to the site root, their class and hashed patient)
    with the fold's train / val / test declared per image. Written to the cross-fit folder (never logged)."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / f"fold{k + 1}.csv"
    frame = pd.DataFrame({"path": rel, "label": list(labels), "patient": list(patients), "split": list(split)})
    with atomic_path(table) as tmp:
        frame.to_csv(tmp, index=False)
    norm = site_card.normalization
    # One card name for every fold: the fold runs' hashed patients (salted with the card name) compare across folds.
    card = {
        "name": f"{site_card.name}-finetune",
        "description": f"Fold {k + 1} of a medtricks finetune cross-fit on a site sample of card {site_card.name}: "
        "the images, their class and hashed patient, and the fold's split per image.",
        "source": "generated",
        "license": site_card.license,
        "citation": site_card.citation,
        "task": site_card.task,
        "classes": list(site_card.classes),
        "layout": {
            "kind": "csv",
            "tables": [{"file": str(table.resolve())}],
            "path_template": "{path}",
            "label_column": "label",
            "split_column": "split",
        },
        "patient": {"column": "patient"},
        "image_size": int(site_card.image_size),
        "normalization": {"mean": [float(v) for v in norm.mean], "std": [float(v) for v in norm.std]},
        "allow_conflicting_duplicates": bool(site_card.allow_conflicting_duplicates),
    }
    path = folder / f"fold{k + 1}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def finished_fold(folder: Path) -> Optional[RunDir]:
    """The fold's finished run with its saved predictions, if any."""
    run = RunDir.newest_finished(folder)
    if (
        run is None
        or not all(run.predictions(s).is_file() for s in ("val", "test"))
        or not run.split_manifest.is_file()
    ):
        return None
    return run


def fold_predictions(
    run: RunDir, k: int, expected_test: list[str], expected_val: set[str], y_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(test probs, val labels, val probs)`` of a fold run, checked image by image against the cross-fit's
    fold (the run's split manifest: salted image ids in manifest order)."""
    rows = pd.read_csv(run.split_manifest, dtype=str, keep_default_na=False)
    test_ids = rows.loc[rows["split"] == "test", "image_id"].tolist()
    val_ids = set(rows.loc[rows["split"] == "val", "image_id"])
    y_t, p_t = load_predictions(run.predictions("test"))
    y_v, p_v = load_predictions(run.predictions("val"))
    if test_ids != expected_test or val_ids != expected_val or not np.array_equal(y_t.astype(int), y_test):
        raise ConfigError(
            f"cross-fit fold {k + 1}: run {run.path} holds other images than this fold (the site data "
            f"or the salt changed?); delete {run.path.parent.parent} and run the command again"
        )
    return p_t, y_v, p_v


def keep_parent_files(files: RunDir, run_id: Optional[str], out: Path) -> Path:
    """A parent found by its run id in a run store, with no folder on this machine: its recipe and model (the
    temporary copy :func:`~medtricks.posthoc.load.load_trained` made) kept in ``<out>/finetune-parents/<run id>/``, so
    every fold run and a rerun start from the same files (``state.json`` keeps the run id for the lineage)."""
    keep = RunDir(out / "finetune-parents" / str(run_id))
    if not (keep.model_state.is_file() and keep.recipe.is_file()):
        keep.path.mkdir(parents=True, exist_ok=True)
        shutil.copytree(files.model_dir, keep.model_dir, dirs_exist_ok=True)
        shutil.copy2(files.recipe, keep.recipe)
    keep.write_state(status="finished", run_id=run_id, note="the recipe and model of a run found by its id")
    return keep.path


def _same_recipe(run: RunDir, recipe: Recipe) -> bool:
    try:
        return recipe_digest(load_run_recipe(run.recipe)) == recipe_digest(recipe)
    except Exception:  # noqa: BLE001 - an unreadable recipe is another run's
        return False


def _same_images(run: RunDir, ids: set[str]) -> bool:
    try:
        return set(pd.read_csv(run.split_manifest, dtype=str)["image_id"]) == ids
    except (OSError, KeyError, ValueError):
        return False


def find_final(folder: Path, recipe: Recipe, crossfit_id: str, ids: set[str]) -> tuple[Optional[RunDir], Optional[str]]:
    """A final run of this cross-fit in the experiment folder: ``done`` (finished, record written), ``finished``
    (trained on these images with this recipe, record missing: the command stopped before writing it),
    ``resume`` (interrupted, same recipe) or ``(None, None)``. A run completed for another cross-fit is never
    reused (its record and threshold are that cross-fit's)."""
    if not folder.is_dir():
        return None, None
    runs = [RunDir(p) for p in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)]
    for run in runs:
        state = run.read_state()
        if (
            state.get("finetune_id") == crossfit_id
            and state.get("finetune_status") == "complete"
            and run.is_finished()
            and (run.model_dir / ADAPTATION_FILE).is_file()
        ):
            return run, "done"
    for run in runs:
        if run.read_state().get("finetune_status") == "complete" or not run.recipe.is_file():
            continue
        if _same_recipe(run, recipe):
            if run.is_finished() and run.model_state.is_file() and _same_images(run, ids):
                return run, "finished"
            if not run.is_finished() and run.last_checkpoint.is_file():
                return run, "resume"
    return None, None
