"""One run: build everything a Recipe describes, fit, evaluate, log. The only place (with cli.py)
that knows every box of the data flow.

    from medtricks import load_recipe, run_recipe
    result = run_recipe(load_recipe("recipes/quickstart.yaml"))
    print(result.metrics.table())
"""
from __future__ import annotations

import difflib
import json
import math
import shutil
import subprocess
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

import matplotlib.pyplot as plt

from medtricks.chained import describe_lineage
from medtricks.errors import ConfigError, MedtricksError, MissingFileError
from medtricks.console import epoch_reporter, say as console_say, where_to_look
import medtricks
from medtricks._atomic import write_csvs
from medtricks.data import build_datasets, export_manifest, export_quarantine, load_card, redact_paths
from medtricks.data.splits import changed_splits, describe_data_changes, rows_fingerprint, split_fingerprint
from medtricks.evaluate import (compute_metrics, plot_confusion_matrix, plot_lr_schedule, plot_reliability_diagram,
                                plot_roc_curves)
from medtricks.evaluate.operating_point import class_priors, probs_at_threshold, select_threshold
from medtricks.evaluate.resizer_plots import resizer_comparison_figure
from medtricks.evaluate.split_table import bootstrap_note, headline_keys, split_gaps, split_table
from medtricks.posthoc.export import export_model
from medtricks.logged_params import run_params, tricks_summary
from medtricks.models import freeze_model, stage_of_parameter
from medtricks.models.reinit import init_new_head
from medtricks.posthoc import audit_model, log_audit, log_shortcut, shortcut_audit_model
from medtricks.recipe import Recipe, dump_recipe, flatten_recipe, load_run_recipe
from medtricks.rundir import MODEL_ARTIFACT_DIR, PREDICTIONS_ARTIFACT_DIR, RunDir, best_key
from medtricks.tracking import MLFLOW_MODEL_ARTIFACT_DIR, LocalStore, RunStore, check_store, create_store
from medtricks.train import EngineConfig, distributed, fit, predict, resolve_amp, resolve_device, seed_everything
from medtricks.train.checkpoint import load_checkpoint, save_checkpoint
from medtricks.train.engine import evaluation_model, steps_per_epoch
from medtricks.train.fast import prepare_cached_prefix, progressive_loader
from medtricks.train.frozen_cache import with_fused_frozen_norms
from medtricks.train.progressive import ProgressiveLoader
from medtricks.posthoc.load import TrainedModel, build_model, load_trained  # noqa: F401 - re-exported
from medtricks.tricks.base import TrickContext
from medtricks.gamma.report import GammaReport
from medtricks.tricks.class_balance import balanced_sample_weights
from medtricks.train.losses import build_loss
from medtricks.train.param_groups import build_optimizer, build_param_groups
from medtricks.tricks.registry import build_tricks, merged_options
from medtricks.train.schedules import build_scheduler, lr_curve, scaled_lr

__all__ = ["RunResult", "run_recipe", "find_resumable_run_dir", "TrainedModel", "load_trained", "build_model"]


@dataclass
class RunResult:
    run_dir: Path
    run_id: Optional[str]
    metrics: Any  # MetricsResult of the best checkpoint on the validation split
    test_metrics: Any = None
    history: list[dict] = field(default_factory=list)
    best_epoch: Optional[int] = None
    gamma_report: Any = None
    tracker: Optional[RunStore] = None


def find_resumable_run_dir(recipe: Recipe) -> Optional[Path]:
    """The newest run folder of this experiment that did not finish (has a last.pt), if any."""
    run = RunDir.find_resumable(recipe.experiment.output_dir, recipe.experiment.name)
    return run.path if run else None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------- builders
def make_train_loader(dataset, *, batch_size: int, seed: int, num_workers: int, drop_last: bool = False,
                      class_balanced: bool = False, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """The one place the training sampler is made.

    ``class_balanced``: draw images with probability 1 / (their class's count), with replacement, so
    each class fills about the same share of every epoch (as many draws per epoch as images).

    ``num_replicas`` > 1 (torchrun): a ``DistributedSampler``; process ``rank`` takes every
    ``num_replicas``-th image of one permutation of the split (padded with repeats to equal slices, so
    every process makes the same number of updates). The engine calls its ``set_epoch`` with the epoch
    seed each epoch: the same seed gives the same order, and a resumed run replays it.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    # A last batch of one image cannot train through BatchNorm (one value per channel at a 1x1 feature map):
    # leave that one image out of the epoch (another one each epoch: the order is shuffled).
    per_process = -(-len(dataset) // num_replicas) if num_replicas > 1 else len(dataset)
    drop_last = drop_last or (per_process > 1 and per_process % batch_size == 1)
    if num_replicas > 1:
        if class_balanced:
            raise ConfigError("tricks.class_balance=sampler does not run data-parallel (torchrun) yet: use "
                              "tricks.class_balance=loss, or train in one process")
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=0)
        if drop_last and len(sampler) < batch_size:
            raise ConfigError(f"each of the {num_replicas} processes gets {len(sampler)} training images, fewer "
                              f"than train.batch_size={batch_size} (per process); mixup/cutmix need full batches: "
                              "lower the batch size")
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                          num_workers=num_workers, drop_last=drop_last, persistent_workers=False)
    if drop_last and len(dataset) < batch_size:
        raise ConfigError(f"the training split has {len(dataset)} images, fewer than train.batch_size="
                         f"{batch_size}; mixup/cutmix need full batches: lower the batch size")
    if class_balanced:
        # The sampler draws from the loader's generator, which the engine re-seeds every epoch (exact resume).
        sampler = torch.utils.data.WeightedRandomSampler(balanced_sample_weights(dataset.targets),
                                                         num_samples=len(dataset), replacement=True,
                                                         generator=generator)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                          num_workers=num_workers, drop_last=drop_last, persistent_workers=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                      num_workers=num_workers, drop_last=drop_last, persistent_workers=False)


def _eval_loader(dataset, recipe: Recipe) -> DataLoader:
    return DataLoader(dataset, batch_size=recipe.train.batch_size, shuffle=False,
                      num_workers=recipe.data.num_workers)


# ----------------------------------------------------------------------------------------- run
def run_recipe(recipe: Recipe, *, resume: Optional[str] = None, tracker: Optional[RunStore] = None,
               parent_run_id: Optional[str] = None, extra_tags: Optional[dict[str, str]] = None,
               quiet: bool = False) -> RunResult:
    """Train, evaluate and log one recipe. ``resume``: None, ``"auto"`` or a run folder path.

    With ``resume="auto"`` the newest unfinished run folder of the experiment is continued (same
    MLflow run); when there is none a new run starts.

    Under torchrun (``torchrun --nproc-per-node N -m medtricks run RECIPE``) every process calls this
    inside one process group: rank 0 makes the run folder, logs, checkpoints, validates and prints, and
    returns the full result; the others train their slice of the data in step with it and return a
    result without metrics.
    """
    with distributed.process_group(_device(recipe)), warnings.catch_warnings():
        if not distributed.is_main():
            warnings.simplefilter("ignore")  # rank 0 says it once
        return _run_recipe(recipe, resume=resume, tracker=tracker, parent_run_id=parent_run_id,
                           extra_tags=extra_tags, quiet=quiet)


def _run_recipe(recipe: Recipe, **kwargs) -> RunResult:
    # The run folder's lock (rank 0), from choosing the folder until the run ends: a second process on it
    # (two `--resume auto` at once) fails at once instead of training the same epochs again.
    with ExitStack() as held:
        return _run_held(recipe, held, **kwargs)


def _run_held(recipe: Recipe, held: ExitStack, *, resume, tracker, parent_run_id, extra_tags, quiet) -> RunResult:
    main = distributed.is_main()
    say = (lambda *a: None) if quiet or not main else console_say  # tqdm.write: lines stay above a progress bar
    # torchrun: every process checks (a refusal stops them all alike); nothing is written before _prepare's barrier
    run = _resume_target(recipe, resume, say, held if main else None)
    resuming = run is not None
    # Everything that can fail on the recipe or the data fails here, before a run folder or a tracked run exists.
    if tracker is None:  # an unknown or unreachable tracking URI: one line, in seconds
        check_store(recipe.tracking.backend, recipe.tracking.uri)
    prep = _prepare(recipe)
    if resuming:  # before anything is written: a refused resume leaves recipe.yaml, split_manifest.csv as they were
        _check_resume_data(run, recipe, prep)
    if main and run is None:
        run = RunDir.create(recipe.experiment.output_dir, recipe.experiment.name)
        held.enter_context(run.locked())
    if distributed.world_size() > 1:  # torchrun: rank 0 made (or chose) the run folder; the others train into it
        path, resuming = distributed.broadcast((str(run.path), resuming) if main else None)
        if not main:
            return _follow(RunDir(path), resuming, prep)
    run.recipe.write_text(dump_recipe(recipe))
    state = run.read_state()

    # Tracking first: an unreachable server fails here, before any training.
    tracker = tracker or create_store(recipe.tracking.backend, recipe.tracking.uri, root=recipe.experiment.output_dir)
    run_name = recipe.tracking.run_name or f"{recipe.experiment.name}-{run.short_id}"
    # medtricks.role: train (ablation children: ablation_child, from extra_tags); variant: the recipe's
    # experiment name unless an ablation names the variant. Post-hoc runs carry medtricks.kind instead.
    tags = {"medtricks.version": medtricks.__version__, "tricks": tricks_summary(recipe), "run_dir": str(run.path),
            "medtricks.role": "train", "variant": recipe.experiment.name, **recipe.experiment.tags,
            **(extra_tags or {})}
    commit = _git_commit()
    if commit:
        tags["git.commit"] = commit
    run_id = tracker.start(experiment=recipe.tracking.experiment or recipe.experiment.name, run_name=run_name,
                           tags=tags, resume_run_id=state.get("run_id") if resuming else None,
                           parent_run_id=parent_run_id)
    try:
        world = distributed.world_size()  # kept (when > 1) so a resume can refuse another process count
        run.write_state(status="running", run_id=run_id, experiment=recipe.experiment.name, tracking="ok",
                        **({"world_size": world} if world > 1 else {}))
        result = _run(recipe, run, tracker, resuming, say, prep)
    except BaseException as err:
        # Logged and stored with data paths hashed (file names hold patient IDs); the traceback keeps them.
        message = redact_paths(f"{type(err).__name__}: {err}", recipe.data.root)
        try:
            run.write_state(status="failed", error=message)
        except OSError as state_err:  # full disk: raise the run's own error, not this one
            warnings.warn(f"could not record the failure in {run.state_file}: {state_err}", RuntimeWarning)
        finally:  # a full disk must not leave the tracked run RUNNING
            _end_tracking(run, tracker, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                          error=message)
        raise
    try:
        run.write_state(status="finished")
    except BaseException as err:  # e.g. disk full: the tracked run ends FAILED, not stuck RUNNING
        _end_tracking(run, tracker, "FAILED", error=f"could not write {run.state_file}: {type(err).__name__}: {err}")
        raise
    _end_tracking(run, tracker, "FINISHED")
    result.run_id = run_id
    say(where_to_look(run_id, run.path, experiment=recipe.tracking.experiment or recipe.experiment.name,
                      mlflow_uri=None if isinstance(tracker, LocalStore) else getattr(tracker, "uri", None),
                      runs_dir=getattr(tracker, "root", None) or recipe.experiment.output_dir
                      if isinstance(tracker, LocalStore) else None))
    return result


def _end_tracking(run: RunDir, tracker: RunStore, status: str, error: Optional[str] = None) -> None:
    """End the tracked run (always); a store that could not send everything marks state.json degraded."""
    try:
        if error:
            tracker.set_tags({"medtricks.error": error[:5000]})
    finally:
        tracker.end(status)
    if getattr(tracker, "degraded", False):
        try:  # the store's warning already named the spool file and the replay command
            run.write_state(tracking="degraded", unsent=str(tracker.unsent_path))
        except OSError:
            pass


# Keys a resumed run may change: they do not alter what is trained (how it is shown, evaluated, audited).
RESUMABLE_CHANGES = ("train.progress", "train.log_every", "data.num_workers", "data.cache_dir", "eval.",
                     "audit.", "experiment.description", "experiment.tags", "tracking.run_name", "tracking.log_model")


def _resume_target(recipe: Recipe, resume: Optional[str], say, held: Optional[ExitStack] = None) -> Optional[RunDir]:
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
            raise ConfigError(f"--resume {resume}: that run already finished; nothing to resume (start a new run "
                              "without --resume)")
        if not run.last_checkpoint.is_file():
            raise MissingFileError(f"--resume {resume}: no checkpoints/last.pt in that folder")
    if held is not None:
        held.enter_context(run.locked())
        if run.is_finished():  # it finished while this process looked
            raise ConfigError(f"--resume {resume}: {run.path} has just finished; nothing to resume (start a new run "
                              "without --resume)")
    stored_world, world = run.read_state().get("world_size", 1), distributed.world_size()
    if stored_world != world:
        how = f"--nproc {stored_world} (torchrun --nproc-per-node {stored_world})" if stored_world > 1 else \
            "in one process (no --nproc, no torchrun)"
        raise ConfigError(f"cannot resume {run.path}: it was trained by {stored_world} process(es), this launch has "
                          f"{world}; the data order, the global batch and the lr depend on it: resume it {how}")
    blocking = [d for d in recipe_differences(load_run_recipe(run.recipe), recipe)
                if not d[0].startswith(RESUMABLE_CHANGES)]
    if blocking:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in blocking[:12])
        raise ConfigError(f"cannot resume {run.path}: the recipe differs from the one it was started with ({listed}"
                          f"{'; ...' if len(blocking) > 12 else ''}). A resumed run continues with its stored "
                          "optimizer, schedule and data, so undo these changes, or run without --resume to start "
                          "a new run")
    say(f"resuming {run.path}")
    return run


def _unlabeled_rows(bundle):
    return getattr(bundle.unlabeled, "manifest", None) if bundle.unlabeled is not None else None


def _check_resume_data(run: RunDir, recipe: Recipe, prep: "_Prepared") -> None:
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
            warnings.warn(f"{run.last_checkpoint} was written by an older medtricks without a data fingerprint and "
                          f"{run.split_manifest} cannot be compared here: resuming without checking that the data "
                          "is the same", RuntimeWarning, stacklevel=3)
            return
        stored, current = rows_fingerprint(stored_rows), rows_fingerprint(current_rows)
    if not changed_splits(stored, current):
        if legacy:
            warnings.warn(f"{run.last_checkpoint} was written by an older medtricks without a data fingerprint; the "
                          f"data matches {run.split_manifest} (files, labels, splits; image bytes not checked)",
                          RuntimeWarning, stacklevel=3)
        return
    names = dict(zip(current_rows["image_id"], export_manifest(manifest, recipe.data.root, keep_paths=True)["path"]))
    changes = describe_data_changes(stored, current, stored_rows=stored_rows, current_rows=current_rows, names=names)
    hint = (" Images no longer in the data are named by their image_id in the run's artifacts/split_manifest.csv "
            "(a run folder keeps no file names).") if "(no longer in the data)" in changes else ""
    raise ConfigError(f"cannot resume {run.path}: its data changed since the checkpoint (data.root "
                      f"{recipe.data.root}; {changes}). A resumed run must train and choose its best epoch on the data "
                      f"it started with: restore that data, or run without --resume to start a new run on this data.{hint}")


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


def check_recipe(recipe: Recipe, classes: list[str]) -> None:
    """Checks that need the card's classes or the file system (the rest is in the Recipe schema)."""
    root = Path(recipe.data.root).expanduser()
    if not root.exists() and recipe.data.synth is None:
        raise MissingFileError(f"data.root {recipe.data.root!r} does not exist (from {Path.cwd()}); point it at the "
                               f"dataset folder the card {recipe.data.card!r} describes")
    k = len(classes)
    probe = compute_metrics(np.arange(2 * k) % k, np.full((2 * k, k), 1 / k), classes, n_bootstrap=0)
    known = sorted({f"val/{name}" for name in probe.values if name != "n"} | {"val/loss", "train/epoch_loss"})
    if recipe.train.best_metric not in known:
        close = difflib.get_close_matches(recipe.train.best_metric, known, n=1)
        raise ConfigError(f"train.best_metric {recipe.train.best_metric!r} is not a metric the run computes"
                          f"{f'; did you mean {close[0]!r}?' if close else ''} Known: {', '.join(known)}")
    tiebreak = recipe.train.best_tiebreak
    if tiebreak is not None and tiebreak not in known:
        close = difflib.get_close_matches(tiebreak, known, n=1)
        raise ConfigError(f"train.best_tiebreak {tiebreak!r} is not a metric the run computes"
                          f"{f'; did you mean {close[0]!r}?' if close else ''} Known: {', '.join(known)} (or null: "
                          "no tie-break)")


@dataclass
class _Prepared:
    """Everything built from the recipe before the run folder exists (so bad input fails early)."""

    device: Any
    amp_dtype: Any
    classes: list[str]
    model: Any
    data_config: dict
    info: dict
    bundle: Any
    tricks: list
    frozen: list[str]
    train_loader: Any
    val_loader: Any
    engine_cfg: EngineConfig
    opt: Any
    loss_fn: Any
    data_fingerprint: dict = field(default_factory=dict)  # stored in last.pt; a resume checks its data against it
    cached: Any = None  # train.cache_frozen: medtricks.train.fast.CachedPrefix
    timings: dict = field(default_factory=dict)  # seconds per phase of the run, logged as time/<phase>_s


def _device(recipe: Recipe) -> torch.device:
    """``train.device`` resolved; under torchrun with CUDA, this process's ``cuda:LOCAL_RANK``."""
    return distributed.local_device(resolve_device(recipe.train.device), recipe.train.device)


def _prepare(recipe: Recipe) -> _Prepared:
    device = _device(recipe)
    amp_dtype = resolve_amp(recipe.train.amp, device)
    card = load_card(recipe.data.card)
    classes = list(card.classes)
    check_recipe(recipe, classes)
    seed_everything(recipe.experiment.seed)
    model, data_config = build_model(recipe, num_classes=len(classes))
    # Common random numbers (issue 28): a new head is drawn from a seed derived from experiment.seed only, so
    # every ablation variant of one seed starts from the same head whatever was built or drawn before it.
    init_new_head(model, recipe.experiment.seed)
    info = dict(getattr(model, "medtricks_info", {}))
    started = time.perf_counter()
    with distributed.main_first():  # torchrun: rank 0 draws the phantoms / fills the cache, the others read them
        bundle = _build_data(recipe, card, data_config)
    timings = {"data": time.perf_counter() - started}
    world = distributed.world_size()
    if recipe.train.batch_size > math.ceil(len(bundle.train) / world):  # each process's slice of the split
        per = f" / {world} processes" if world > 1 else ""
        raise ConfigError(f"train.batch_size={recipe.train.batch_size} is larger than the training split "
                          f"({len(bundle.train)} images{per}): every epoch would be one short batch and the lr is "
                          "scaled for the configured batch; lower train.batch_size")

    # The tricks act on the loaded weights (BN-gamma) before the optimizer sees the parameters.
    # extras: the unlabelled pool (data.label_fraction / data.unlabeled) for pseudo-labelling, and the
    # updates per epoch (set once the loader exists) for tricks that ramp by epochs.
    ctx = TrickContext(recipe=recipe, classes=classes, train_targets=bundle.train.targets, device=device,
                       mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                       extras={"unlabeled": bundle.unlabeled}, load_run=load_trained)
    tricks = build_tricks(recipe, ctx)
    for trick in tricks:
        trick.on_model(model)
    own_modules = [trick.name for trick in tricks if trick.trainable_modules()] if world > 1 else []
    if own_modules:  # DDP averages the gradients of the model it wraps, not those of a trick's own module
        raise ConfigError(f"tricks {', '.join(own_modules)} train a module of their own next to the model (e.g. "
                          "DRLoc's head), which does not run data-parallel (torchrun) yet: switch it off or train "
                          "in one process")
    frozen = freeze_model(model, recipe.model.freeze) if recipe.model.freeze else []
    _warn_frozen_zero_gamma(tricks, frozen)
    model = distributed.sync_batchnorm(model, device, recipe.train.sync_bn)  # torchrun only: BN over the global batch
    loader_options = merged_options(tricks, "loader_options")

    def train_loader_of(dataset, batch_size: int, num_workers: int = recipe.data.num_workers):
        return make_train_loader(dataset, batch_size=batch_size, seed=recipe.experiment.seed, num_workers=num_workers,
                                 num_replicas=world, rank=distributed.rank(), **loader_options)

    cached = None
    if recipe.train.cache_frozen is not None:  # issue 29: train the unfrozen rest on cached prefix features
        started = time.perf_counter()
        cached = prepare_cached_prefix(recipe, model, bundle, tricks, device=device, amp_dtype=amp_dtype,
                                       world_size=world)
        timings["frozen_prefix_cache"] = time.perf_counter() - started
        train_loader = train_loader_of(cached.train_views, recipe.train.batch_size, num_workers=0)  # in memory
        val_loader = cached.val_loader(recipe.train.batch_size)
    elif recipe.schedule.progressive_resize is not None:
        train_loader = progressive_loader(recipe, bundle, data_config, train_loader_of)
        val_loader = _eval_loader(bundle.val, recipe)
    else:
        train_loader = train_loader_of(bundle.train, recipe.train.batch_size)
        val_loader = _eval_loader(bundle.val, recipe)
    engine_cfg = _engine_config(recipe, device, amp_dtype)
    ctx.extras["updates_per_epoch"] = steps_per_epoch(train_loader, engine_cfg)
    opt = _build_optimization(recipe, model, tricks, ctx.extras["updates_per_epoch"])
    loss_fn = build_loss(**merged_options(tricks, "loss_options"))
    for trick in tricks:
        loss_fn = trick.wrap_loss(loss_fn)

    return _Prepared(device=device, amp_dtype=amp_dtype, classes=classes, model=model, data_config=data_config,
                     info=info, bundle=bundle, tricks=tricks, frozen=frozen, train_loader=train_loader,
                     val_loader=val_loader, engine_cfg=engine_cfg, opt=opt, loss_fn=loss_fn, cached=cached,
                     timings=timings,
                     data_fingerprint=split_fingerprint(bundle.manifest, recipe.data.root, _unlabeled_rows(bundle)))


def _warn_frozen_zero_gamma(tricks, frozen: list[str]) -> None:
    """A block whose gamma was set to 0 and then frozen stays the identity forever: say so."""
    report = next((getattr(t, "report", None) for t in tricks if t.name == "bn_gamma"), None)
    if report is None or not frozen:
        return
    frozen_names = set(frozen)
    dead = [row["name"] for row in report.rows if row["new_gamma"] == 0 and f"{row['name']}.weight" in frozen_names]
    if dead:
        warnings.warn(f"model.freeze freezes {len(dead)} norm layer(s) whose gamma tricks.bn_gamma set to 0 "
                      f"({', '.join(dead[:4])}{', ...' if len(dead) > 4 else ''}): those residual branches can never "
                      "learn and stay the identity; unfreeze those stages or choose other blocks", RuntimeWarning,
                      stacklevel=3)


def _run(recipe: Recipe, run: RunDir, tracker: RunStore, resuming: bool, say, prep: _Prepared) -> RunResult:
    device, amp_dtype, classes, bundle, tricks = prep.device, prep.amp_dtype, prep.classes, prep.bundle, prep.tricks
    model, data_config, info, opt, val_loader = prep.model, prep.data_config, prep.info, prep.opt, prep.val_loader
    _log_inputs(recipe, run, tracker, say, bundle=bundle, tricks=tricks, frozen=prep.frozen, opt=opt,
                device=device, amp_dtype=amp_dtype, classes=classes, data_config=data_config, info=info)

    if prep.cached is not None:
        tracker.log_params(prep.cached.params())
        say(f"frozen prefix cached: training from {prep.cached.split.cut} on; "
            f"{recipe.train.cache_frozen.views} view(s) per image, {prep.cached.megabytes:.0f} MB in memory")
    if isinstance(prep.train_loader, ProgressiveLoader):
        tracker.log_params({"resolved.progressive_sizes": ",".join(map(str, prep.train_loader.sizes)),
                            "resolved.progressive_batches": ",".join(map(str, prep.train_loader.batches))})
        say("progressive resizing: image size by epoch " + ", ".join(map(str, prep.train_loader.sizes)) +
            "; batch " + ", ".join(map(str, prep.train_loader.batches)))

    def evaluate_fn(eval_model) -> dict[str, float]:
        # cache_frozen: val_loader yields cached prefix features, so the rest of eval_model (or EMA's copy) runs
        module = prep.cached.eval_module(eval_model) if prep.cached is not None else eval_model
        targets, probs, loss = predict(module, val_loader, device=device, amp_dtype=amp_dtype,
                                       channels_last=recipe.train.channels_last)
        values = compute_metrics(targets, probs, classes, n_bootstrap=0).values
        return {**{f"val/{k}": float(v) for k, v in values.items() if k != "n"}, "val/loss": loss}

    # A resumed run replays the updates after its last checkpoint, and the engine hands the checkpointed
    # epoch over again (it may have died before logging it): log each step and each epoch once.
    logged = _last_logged_step(tracker) if resuming else 0
    logged_epoch = _last_logged_step(tracker, "epoch") if resuming else 0

    def log_step(step: int, metrics: dict) -> None:
        if step > logged:
            tracker.log_metrics(metrics, step=step)

    report_epoch = epoch_reporter(lambda step, m: tracker.log_metrics(m, step=step), say,
                                  epochs=recipe.train.epochs, best_metric=recipe.train.best_metric,
                                  lr=lambda: opt.optimizer.param_groups[0]["lr"])

    def log_epoch(step: int, metrics: dict) -> None:
        if step > logged_epoch:
            report_epoch(step, metrics)

    world = distributed.world_size()
    parallel = (f" x {world} processes (global batch {recipe.train.batch_size * world}, validation on rank 0)"
                if world > 1 else "")
    say(f"training {info.get('name', recipe.model.name)} on {len(bundle.train)} images "
        f"({len(bundle.val)} val), {recipe.train.epochs} epochs, device {device}{parallel}; run folder {run.path}")
    timings = prep.timings
    started = time.perf_counter()
    fit_result = fit(model, prep.train_loader, val_loader, optimizer=opt.optimizer, scheduler=opt.scheduler,
                     loss_fn=prep.loss_fn, cfg=prep.engine_cfg, evaluate_fn=evaluate_fn, checkpoint_dir=run.checkpoints,
                     tricks=tricks, on_step=log_step,
                     on_epoch=log_epoch,
                     resume=resuming, checkpoint_extra={"data_fingerprint": prep.data_fingerprint},
                     train_module=prep.cached.train_module if prep.cached is not None else None)

    # ---- the best checkpoint: evaluated with CIs on val and test, audited, saved with its model card
    timings["training"], started = time.perf_counter() - started, time.perf_counter()
    if fit_result.compile_report:
        tracker.set_tags({"compile": fit_result.compile_report.get("reason", "")[:250]})
    eval_model = evaluation_model(model, tricks)
    eval_model.load_state_dict(load_checkpoint(fit_result.best_checkpoint, map_location=device)["model"])
    final = _final_evaluation(recipe, run, tracker, say, with_fused_frozen_norms(eval_model), bundle, classes, device,
                              amp_dtype, step=fit_result.steps, best_epoch=fit_result.best_epoch)
    timings["final_evaluation"], started = time.perf_counter() - started, time.perf_counter()
    _audit(recipe, tracker, say, eval_model, bundle.val, classes, data_config, device)
    timings["audit"], started = time.perf_counter() - started, time.perf_counter()
    if recipe.eval.plots and recipe.model.resizer.enabled:
        images = torch.stack([bundle.val[i][0] for i in range(min(4, len(bundle.val)))])
        tracker.log_figure(resizer_comparison_figure(model.resizer, images.to(device)), "plots/resizer.png")
    plt.close("all")
    _save_model(recipe, run, tracker, eval_model, classes, info, data_config, fit_result, final)
    timings["saving"] = time.perf_counter() - started
    # Where the run's time went (a resumed run: this process's share), so a slow phase is visible in the MLflow UI.
    tracker.log_metrics({f"time/{phase}_s": seconds for phase, seconds in timings.items()}, step=fit_result.steps)
    say("time: " + ", ".join(f"{phase.replace('_', ' ')} {seconds:.0f} s" for phase, seconds in timings.items()))
    tracker.set_tags({"best_epoch": str(fit_result.best_epoch)})
    bn_gamma = next((t for t in tricks if t.name == "bn_gamma"), None)
    return RunResult(run_dir=run.path, run_id=None, metrics=final.by_split.get("val", {}),
                     test_metrics=final.by_split.get("test"), history=fit_result.history,
                     best_epoch=fit_result.best_epoch, gamma_report=getattr(bn_gamma, "report", None) or
                     GammaReport([], strategy="none"), tracker=tracker)


def _follow(run: RunDir, resuming: bool, prep: _Prepared) -> RunResult:
    """A torchrun process other than rank 0: trains its slice of every epoch in step with rank 0 (DDP
    averages the gradients; rank 0 validates and broadcasts the metrics); writes, logs and prints nothing."""
    opt = prep.opt
    fit_result = fit(prep.model, prep.train_loader, prep.val_loader, optimizer=opt.optimizer, scheduler=opt.scheduler,
                     loss_fn=prep.loss_fn, cfg=prep.engine_cfg, evaluate_fn=lambda model: {},  # rank 0 validates
                     checkpoint_dir=run.checkpoints, tricks=prep.tricks, resume=resuming)
    return RunResult(run_dir=run.path, run_id=None, metrics=None, history=fit_result.history,
                     best_epoch=fit_result.best_epoch)


# ------------------------------------------------------------------------------- run pieces
def _last_logged_step(tracker: RunStore, key: str = "train/loss") -> int:
    """The last training step at which this run already logged ``key`` (0 when the store cannot say)."""
    try:
        return max((step for step, _ in tracker.metric_history(tracker.run_id, key)), default=0)
    except MedtricksError:  # an in-memory store of a new process knows nothing of the earlier one
        return 0


def _build_data(recipe: Recipe, card, data_config):
    return build_datasets(
        card, recipe.data.root, image_size=recipe.input_image_size(), mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]), in_chans=recipe.model.in_chans, augment=recipe.data.augment,
        split_seed=recipe.data.split_seed, val_fraction=recipe.data.val_fraction,
        test_fraction=recipe.data.test_fraction, test_by=recipe.data.test_by, on_bad_image=recipe.data.on_bad_image,
        cache_dir=recipe.data.cache_dir,
        synth=recipe.data.synth.model_dump() if recipe.data.synth else None,
        progress=recipe.train.progress and distributed.is_main(),
        label_fraction=recipe.data.label_fraction, label_count=recipe.data.label_count,
        unlabeled=recipe.data.unlabeled.model_dump() if recipe.data.unlabeled else None)


def _engine_config(recipe: Recipe, device, amp_dtype) -> EngineConfig:
    train = recipe.train
    return EngineConfig(epochs=train.epochs, device=device, seed=recipe.experiment.seed, amp_dtype=amp_dtype,
                        channels_last=train.channels_last, grad_clip=train.grad_clip, accumulate=train.accumulate,
                        max_steps_per_epoch=train.max_steps_per_epoch, best_metric=train.best_metric,
                        best_mode=train.best_mode, best_tiebreak=train.best_tiebreak,
                        best_tiebreak_mode=train.best_tiebreak_mode, log_every=train.log_every, progress=train.progress,
                        compile=train.compile)


@dataclass
class _Optimization:
    optimizer: Any
    scheduler: Any
    lr: float
    updates_per_epoch: int
    schedule_kwargs: dict


def _build_optimization(recipe: Recipe, model, tricks, updates_per_epoch: int) -> _Optimization:
    """Param groups (tricks add their options, e.g. no-bias-decay) -> optimizer -> per-update schedule.

    Linear scaling uses the global batch: ``train.batch_size`` (per process) x the torchrun processes."""
    lr = scaled_lr(recipe.optim.lr, recipe.train.batch_size * distributed.world_size(), recipe.optim.linear_scaling)
    resizer = recipe.model.resizer
    options = merged_options(tricks, "param_options")
    groups = build_param_groups(model, weight_decay=recipe.optim.weight_decay, layer_decay=recipe.model.layer_decay,
                                stage_of=stage_of_parameter if recipe.model.layer_decay is not None else None,
                                lr_mults={"resizer.": resizer.lr_mult} if resizer.enabled else None, **options)
    for trick in tricks:  # modules a trick trains next to the model (DRLoc's head): same options, no layer decay
        for module in trick.trainable_modules().values():
            groups += build_param_groups(module, weight_decay=recipe.optim.weight_decay, **options)
    optimizer = build_optimizer(groups, name=recipe.optim.name, lr=lr, momentum=recipe.optim.momentum,
                                betas=recipe.optim.betas)
    sched = recipe.schedule
    schedule_kwargs = dict(name=sched.name, epochs=recipe.train.epochs, steps_per_epoch=updates_per_epoch,
                           warmup_epochs=sched.warmup_epochs, warmup_lr_init=sched.warmup_lr_init,
                           milestones=sched.milestones, gamma=sched.gamma, min_lr=sched.min_lr)
    return _Optimization(optimizer, build_scheduler(optimizer, **schedule_kwargs), lr, updates_per_epoch,
                         schedule_kwargs)


def _log_inputs(recipe: Recipe, run: RunDir, tracker: RunStore, say, *, bundle, tricks, frozen, opt, device,
                amp_dtype, classes, data_config, info) -> None:
    """What the run is, logged before training: params (the sections that are on; the whole recipe is the
    recipe.yaml artifact), recipe, split manifest, trick reports, schedule."""
    params = run_params(recipe)
    world = distributed.world_size()
    if world > 1:  # torchrun: train.batch_size is per process
        params.update({"resolved.world_size": world, "resolved.global_batch_size": recipe.train.batch_size * world})
    params.update({"resolved.lr": opt.lr, "resolved.device": str(device), "resolved.amp_dtype": str(amp_dtype),
                   "resolved.num_classes": len(classes), "resolved.classes": ",".join(classes),
                   "resolved.updates_per_epoch": opt.updates_per_epoch, "resolved.image_size": recipe.input_image_size(),
                   "resolved.mean": str(tuple(data_config["mean"])), "resolved.std": str(tuple(data_config["std"])),
                   "weights.source": info.get("weights_source"), "weights.sha256": info.get("weights_sha256"),
                   "frozen_params": len(frozen), "n_train": len(bundle.train), "n_val": len(bundle.val),
                   "n_test": len(bundle.test) if bundle.test is not None else 0,
                   "n_unlabeled": len(bundle.unlabeled) if bundle.unlabeled is not None else 0,
                   "n_quarantined": len(bundle.quarantine)})
    unseen = bundle.manifest.attrs.get("unseen_labels") or {}  # the card's unknown_labels policy acted on these
    params["n_unseen_label_images"] = sum(unseen.values())
    if unseen:
        policy = bundle.card.unknown_labels
        say(f"data: {sum(unseen.values())} image(s) carry raw labels card {bundle.card.name!r} does not name, "
            f"{'left out' if policy == 'drop' else f'labelled {policy!r}'} by its unknown_labels: "
            + ", ".join(f"{raw!r} ({n})" for raw, n in sorted(unseen.items())))
    lineage = info.get("lineage")
    if lineage:  # model.weights: run:...: the run it started from, and what that run started from
        params.update({"lineage.parent_run": lineage["parent_run_id"] or lineage["parent_run_dir"],
                       "lineage.parent_recipe_digest": lineage["parent_recipe_digest"],
                       "lineage.parent_weights": lineage["parent_weights"]})
    for trick in tricks:
        params.update(trick.log_params())
    tracker.log_params(params)
    run.artifacts.mkdir(exist_ok=True)
    tracker.log_artifact(run.recipe)
    write_csvs({run.split_manifest: export_manifest(bundle.manifest, recipe.data.root)})  # atomic, spreadsheet-safe
    tracker.log_artifact(run.split_manifest, "data")
    if len(bundle.quarantine):
        # image_id (as in the split manifest) and reasons with data paths hashed; the real paths only on the console
        write_csvs({run.quarantine: export_quarantine(bundle.quarantine, recipe.data.root)})
        tracker.log_artifact(run.quarantine, "data")
        say(f"warning: {len(bundle.quarantine)} unreadable images skipped (data.on_bad_image=skip); "
            f"listed in {run.quarantine}:")
        for path, reason in zip(bundle.quarantine["path"][:20], bundle.quarantine["reason"][:20]):
            say(f"  {path}: {reason}")
        if len(bundle.quarantine) > 20:
            say(f"  ... and {len(bundle.quarantine) - 20} more")
    for trick in tricks:
        for path, folder in trick.artifacts(run):
            tracker.log_artifact(path, folder)
        summary = trick.summary()
        if summary:
            say(summary)
    if recipe.eval.plots:
        tracker.log_figure(plot_lr_schedule(lr_curve(opt.lr, **opt.schedule_kwargs),
                                            steps_per_epoch=opt.updates_per_epoch), "plots/lr_schedule.png")


@dataclass
class _FinalEvaluation:
    by_split: dict = field(default_factory=dict)  # split -> MetricsResult at argmax / 0.5
    at_op: dict = field(default_factory=dict)  # split -> MetricsResult at the operating point
    operating_point: Any = None


def _final_evaluation(recipe: Recipe, run: RunDir, tracker: RunStore, say, eval_model, bundle, classes, device,
                      amp_dtype, *, step: int, best_epoch) -> _FinalEvaluation:
    """Val and test with bootstrap CIs, the operating point (chosen on val only), per-image
    predictions, plots, the test-val gaps, and the side-by-side report."""
    out = _FinalEvaluation()
    ci = dict(n_bootstrap=recipe.eval.n_bootstrap, ci=recipe.eval.ci, seed=recipe.experiment.seed)
    for split, dataset in (("val", bundle.val), ("test", bundle.test)):
        if dataset is None or len(dataset) == 0:
            continue
        targets, probs, loss = predict(eval_model, _eval_loader(dataset, recipe), device=device,
                                       amp_dtype=amp_dtype, channels_last=recipe.train.channels_last)
        metrics = out.by_split[split] = compute_metrics(targets, probs, classes, **ci)
        flat = {best_key(split, k): float(v) for k, v in metrics.to_dict().items() if isinstance(v, (int, float))}
        flat[best_key(split, "loss")] = loss
        # val comes first: the operating point is chosen there, then applied to test
        if split == "val" and len(classes) == 2 and recipe.eval.threshold != "none":
            out.operating_point = choose_operating_point(targets, probs, recipe, bundle.train.targets, say)
        if out.operating_point is not None:
            at_op = out.at_op[split] = compute_metrics(
                targets, probs_at_threshold(probs, out.operating_point.threshold), classes, **ci)
            flat.update({best_key(split, k, op=True): float(v) for k, v in at_op.to_dict().items()
                         if isinstance(v, (int, float))})
        # per-image predictions: ablations and `compare` pair runs image by image
        np.savez_compressed(run.predictions(split), y_true=targets, probs=probs.astype(np.float32))
        tracker.log_artifact(run.predictions(split), PREDICTIONS_ARTIFACT_DIR)
        tracker.log_metrics(flat, step=step)
        if recipe.eval.plots:
            tracker.log_figure(plot_confusion_matrix(targets, probs.argmax(1), classes),
                               f"plots/{split}_confusion_matrix.png")
            tracker.log_figure(plot_roc_curves(targets, probs, classes), f"plots/{split}_roc.png")
            tracker.log_figure(plot_reliability_diagram(targets, probs), f"plots/{split}_reliability.png")
    if "test" in out.by_split:
        keys = headline_keys(out.by_split["val"].values, _positive_class(classes))
        tracker.log_metrics(split_gaps(out.by_split, keys=keys), step=step)
    say(_final_report(recipe, best_epoch, classes, out.by_split, out.at_op, out.operating_point))
    return out


def _audit(recipe: Recipe, tracker: RunStore, say, eval_model, dataset, classes, data_config, device) -> None:
    """The recipe's audits of the best checkpoint on the validation split: robustness, shortcut."""
    if recipe.audit.enabled:
        surrogate = None
        if recipe.audit.surrogate:
            surrogate = load_trained(recipe.audit.surrogate, tracking_uri=recipe.tracking.uri, device=str(device),
                                     runs_dir=recipe.experiment.output_dir).model
        result = audit_model(eval_model, dataset, audit_cfg=recipe.audit, classes=classes, data_config=data_config,
                             device=device, seed=recipe.experiment.seed, surrogate=surrogate,
                             progress=recipe.train.progress, batch_size=recipe.train.batch_size)
        log_audit(tracker, result)
        say(result.table())
    if recipe.audit.shortcut:
        shortcut = shortcut_audit_model(eval_model, dataset, audit_cfg=recipe.audit, classes=classes,
                                        data_config=data_config, device=device, seed=recipe.experiment.seed,
                                        progress=recipe.train.progress, batch_size=recipe.train.batch_size)
        log_shortcut(tracker, shortcut)
        say(shortcut.table())


def _save_model(recipe: Recipe, run: RunDir, tracker: RunStore, eval_model, classes, info, data_config,
                fit_result, final: _FinalEvaluation) -> None:
    """The model: state dict, data config, operating point and a model card (enough to rebuild it)."""
    run.model_dir.mkdir(exist_ok=True)
    save_checkpoint(eval_model.state_dict(), run.model_state)  # atomic; a full disk is one clear error
    run.data_config.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}))
    run.model_card.write_text(_model_card(recipe, classes, info, data_config, fit_result,
                                          final.by_split.get("val")))
    files = [run.model_state, run.model_card, run.data_config]
    if final.operating_point is not None:
        final.operating_point.to_json(run.operating_point)
        files.insert(0, run.operating_point)
    if recipe.tracking.log_model:
        for path in files:
            tracker.log_artifact(path, MODEL_ARTIFACT_DIR)
        if tracker.logs_models:
            _log_mlflow_model(recipe, run, tracker)


def _log_mlflow_model(recipe: Recipe, run: RunDir, tracker: RunStore) -> None:
    """The MLflow pyfunc model (``runs:/<id>/mlflow_model``: ``mlflow models serve`` answers it), made by
    ``export --format mlflow`` from the saved model (parity-checked). Training is over: a failure here
    warns and tags the run, it does not fail it."""
    try:
        shutil.rmtree(run.mlflow_model, ignore_errors=True)  # a resumed run makes it again
        result = export_model(str(run.path), "mlflow", run.mlflow_model)
        tracker.log_model(run.mlflow_model, MLFLOW_MODEL_ARTIFACT_DIR)
        tracker.set_tags({"medtricks.mlflow_model": f"{MLFLOW_MODEL_ARTIFACT_DIR} (parity max |delta prob| "
                                                    f"{result.max_abs_diff:.1e})"})
    except Exception as err:  # noqa: BLE001 - the trained model is saved; only its MLflow flavour is missing
        message = f"{type(err).__name__}: {str(err)[:500]}"
        warnings.warn(f"the MLflow model of run {run.path} was not logged ({message}); the run's model/ is; "
                      f"make one later with `medtricks export {run.path} --format mlflow --out DIR`",
                      RuntimeWarning, stacklevel=2)
        tracker.set_tags({"medtricks.mlflow_model": f"not logged: {redact_paths(message, recipe.data.root)}"})


def choose_operating_point(y_val, probs_val, recipe: Recipe, train_targets, say):
    """The decision threshold on validation (``eval.threshold``), with the training class priors."""
    # The prior the posteriors are calibrated to (what --prevalence shifts from): a class-balanced
    # loss or sampler trains against equal priors, not the split's frequencies.
    priors = [0.5, 0.5] if recipe.tricks.class_balance != "none" else class_priors(train_targets, 2)
    try:
        op = select_threshold(y_val, probs_val, method=recipe.eval.threshold,
                              target_sensitivity=recipe.eval.target_sensitivity, train_priors=priors)
    except ValueError as err:  # e.g. a validation split with one class: keep 0.5 and say why
        say(f"warning: no operating point chosen ({err}); predictions use the 0.5 threshold")
        return None
    return op


def _positive_class(classes) -> Optional[str]:
    """Binary: the positive class ``classes[1]`` (whose sensitivity/specificity lead the tables); else None."""
    return classes[1] if len(classes) == 2 else None


def _final_report(recipe: Recipe, best_epoch, classes, by_split: dict, at_op: dict, operating_point) -> str:
    """Validation and test side by side (with the gap), at 0.5 and at the stored operating point."""
    name, seed = recipe.experiment.name, recipe.experiment.seed
    keys = headline_keys(by_split["val"].values, _positive_class(classes))
    parts = [split_table(by_split, keys=keys, ci_note=False,
                         title=f"{name} — best epoch {best_epoch} (chosen on val), seed {seed}, "
                               f"{'argmax' if len(classes) > 2 else 'threshold 0.5'}")]
    if operating_point is not None:
        parts.append(split_table(at_op, keys=[k for k in keys if k not in ("auroc", "ece")], ci_note=False,
                                 title=f"at the stored operating point: {operating_point.describe()} "
                                       "(val is optimistic here: the threshold was chosen on it)"))
    if bootstrap_note(by_split["val"]):  # said once, under every table of the report
        parts[-1] += "\n" + bootstrap_note(by_split["val"])
    if "test" not in by_split:
        parts.append("no test split: these numbers come from the split that chose the checkpoint and will "
                     "flatter the model; set data.test_fraction (or give the card a test folder)")
    return "\n\n".join(parts)


def _model_card(recipe: Recipe, classes, info, data_config, fit_result, metrics) -> str:
    lines = [f"# {recipe.experiment.name}", "",
             f"- architecture: {info.get('name', recipe.model.name)}",
             f"- weights: {recipe.model.weights} ({info.get('weights_source')}, sha256 {info.get('weights_sha256')})",
             *([f"- parent run: {describe_lineage(info)}"] if info.get("lineage") else []),
             f"- classes: {', '.join(classes)}",
             f"- input: {recipe.model.in_chans} channel(s), normalize mean {tuple(data_config['mean'])} "
             f"std {tuple(data_config['std'])}",
             f"- resizer: {recipe.model.resizer.model_dump() if recipe.model.resizer.enabled else 'off'}",
             f"- tricks: {', '.join(recipe.tricks_on()) or 'none'}",
             f"- best epoch: {fit_result.best_epoch} by {recipe.train.best_metric} = {fit_result.best_value}"
             + (f" (ties broken by {recipe.train.best_tiebreak}, {recipe.train.best_tiebreak_mode}: "
                f"{fit_result.best_tiebreak_value})" if recipe.train.best_tiebreak else ""),
             "", "Rebuild: `medtricks.run.build_model(load_recipe('recipe.yaml'), num_classes)` then "
             "`load_state_dict(torch.load('model_state.pt'))`.", "", "```", metrics.table() if metrics else "", "```"]
    return "\n".join(lines) + "\n"
