"""Resuming a run: which run folder to continue, and the refusals that keep a resumed run exact (a
finished run, another process count, a recipe that changes training, other data than the checkpoint's)."""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from typing import Any, Optional

import pandas as pd

from medtricks.data import export_manifest
from medtricks.data.splits import changed_splits, describe_data_changes, rows_fingerprint
from medtricks.errors import ConfigError, MissingFileError
from medtricks.recipe import Recipe, flatten_recipe, load_run_recipe
from medtricks.rundir import RunDir
from medtricks.run.prepare import PreparedRun
from medtricks.train import distributed
from medtricks.train.checkpoint import load_checkpoint

__all__ = ["RESUMABLE_CHANGES", "resume_target", "check_resume_data", "recipe_differences"]

# Keys a resumed run may change: they do not alter what is trained (how it is shown, evaluated, audited).
RESUMABLE_CHANGES = (
    "train.progress",
    "train.log_every",
    "data.num_workers",
    "data.cache_dir",
    "eval.",
    "audit.",
    "experiment.description",
    "experiment.tags",
    "tracking.run_name",
    "tracking.log_model",
)


def resume_target(recipe: Recipe, resume: Optional[str], say, held: Optional[ExitStack] = None) -> Optional[RunDir]:
    """The run folder to continue (``resume``: None, ``"auto"`` or a folder), refusing a finished run and a
    recipe that differs from the stored one in anything that changes training. With ``held`` the folder's
    lock is taken into it first: a folder another process trains into is refused at once."""
    if not resume:
        return None
    if resume == "auto":
        run = RunDir.find_resumable(recipe.experiment.output_dir, recipe.experiment.name)
        if run is None:
            say("no unfinished run to resume: starting a new one")
            return None
    else:
        run = RunDir(resume)
        if run.is_finished():
            raise ConfigError(
                f"--resume {resume}: that run already finished; nothing to resume (start a new run without --resume)"
            )
        if not run.last_checkpoint.is_file():
            raise MissingFileError(f"--resume {resume}: no checkpoints/last.pt in that folder")
    if held is not None:
        held.enter_context(run.locked())
        if run.is_finished():  # it finished while this process looked
            raise ConfigError(
                f"--resume {resume}: {run.path} has just finished; nothing to resume (start a new run without --resume)"
            )
    stored_world, world = run.read_state().get("world_size", 1), distributed.world_size()
    if stored_world != world:
        how = (
            f"--nproc {stored_world} (torchrun --nproc-per-node {stored_world})"
            if stored_world > 1
            else "in one process (no --nproc, no torchrun)"
        )
        raise ConfigError(
            f"cannot resume {run.path}: it was trained by {stored_world} process(es), this launch has "
            f"{world}; the data order, the global batch and the lr depend on it: resume it {how}"
        )
    blocking = [
        d for d in recipe_differences(load_run_recipe(run.recipe), recipe) if not d[0].startswith(RESUMABLE_CHANGES)
    ]
    if blocking:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in blocking[:12])
        raise ConfigError(
            f"cannot resume {run.path}: the recipe differs from the one it was started with ({listed}"
            f"{'; ...' if len(blocking) > 12 else ''}). A resumed run continues with its stored "
            "optimizer, schedule and data, so undo these changes, or run without --resume to start "
            "a new run"
        )
    say(f"resuming {run.path}")
    return run


def check_resume_data(run: RunDir, recipe: Recipe, prep: PreparedRun) -> None:
    """Refuse to resume on other data than the checkpoint was trained on (its ``data_fingerprint``: per split,
    the images, labels, bytes and patient grouping), naming the splits that changed and a few images.

    A ``last.pt`` of a version without the fingerprint is checked against the run's ``split_manifest.csv``
    (files, labels and splits; salted, so on this machine only), and resumes with a warning when that
    matches or cannot be read: refusing would strand every unfinished run of that version."""
    stored = load_checkpoint(run.last_checkpoint).get("data_fingerprint")
    current = prep.data_fingerprint
    manifest = prep.bundle.manifest
    stored_rows = _read_split_manifest(run)
    current_rows = export_manifest(manifest, recipe.data.root)
    legacy = stored is None
    if legacy:
        if stored_rows is None or not set(stored_rows["image_id"]) & set(current_rows["image_id"]):
            warnings.warn(
                f"{run.last_checkpoint} was written by an older medtricks without a data fingerprint and "
                f"{run.split_manifest} cannot be compared here: resuming without checking that the data "
                "is the same",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        stored, current = rows_fingerprint(stored_rows), rows_fingerprint(current_rows)
    if not changed_splits(stored, current):
        if legacy:
            warnings.warn(
                f"{run.last_checkpoint} was written by an older medtricks without a data fingerprint; the "
                f"data matches {run.split_manifest} (files, labels, splits; image bytes not checked)",
                RuntimeWarning,
                stacklevel=3,
            )
        return
    names = dict(zip(current_rows["image_id"], export_manifest(manifest, recipe.data.root, keep_paths=True)["path"]))
    changes = describe_data_changes(stored, current, stored_rows=stored_rows, current_rows=current_rows, names=names)
    hint = (
        (
            " Images no longer in the data are named by their image_id in the run's artifacts/split_manifest.csv "
            "(a run folder keeps no file names)."
        )
        if "(no longer in the data)" in changes
        else ""
    )
    raise ConfigError(
        f"cannot resume {run.path}: its data changed since the checkpoint (data.root "
        f"{recipe.data.root}; {changes}). A resumed run must train and choose its best epoch on the data "
        f"it started with: restore that data, or run without --resume to start a new run on this data.{hint}"
    )


def _read_split_manifest(run: RunDir) -> Optional[pd.DataFrame]:
    """The run's exported split manifest (salted image IDs, labels, splits), if it can be read."""
    try:
        rows = pd.read_csv(run.split_manifest, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return None
    return rows if {"image_id", "label", "split"} <= set(rows.columns) else None


def recipe_differences(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every flattened recipe key that differs."""
    a, b = flatten_recipe(old), flatten_recipe(new)
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
