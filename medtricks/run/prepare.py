"""Preparing a run: everything built from the recipe before the run folder exists -- device, data,
model, tricks, loaders, optimizer, schedule, loss -- so bad input fails before anything is written."""

from __future__ import annotations

import difflib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medtricks.data import build_datasets, load_card
from medtricks.data.splits import split_fingerprint
from medtricks.errors import ConfigError, MissingFileError
from medtricks.evaluate import compute_metrics
from medtricks.models import freeze_model, stage_of_parameter
from medtricks.models.reinit import init_new_head
from medtricks.posthoc.load import build_model, load_trained
from medtricks.recipe import Recipe
from medtricks.train import EngineConfig, distributed, resolve_amp, resolve_device, seed_everything
from medtricks.train.engine import steps_per_epoch
from medtricks.train.fast import prepare_cached_prefix, progressive_loader
from medtricks.train.loaders import make_train_loader
from medtricks.train.losses import build_loss
from medtricks.train.param_groups import build_optimizer, build_param_groups
from medtricks.train.schedules import build_scheduler, scaled_lr
from medtricks.tricks.base import TrickContext
from medtricks.tricks.registry import build_tricks, merged_options

__all__ = [
    "PreparedRun",
    "prepare_run",
    "check_recipe",
    "run_device",
    "eval_loader",
    "Optimization",
    "build_optimization",
]


def check_recipe(recipe: Recipe, classes: list[str]) -> None:
    """Checks that need the card's classes or the file system (the rest is in the Recipe schema)."""
    root = Path(recipe.data.root).expanduser()
    if not root.exists() and recipe.data.synth is None:
        raise MissingFileError(
            f"data.root {recipe.data.root!r} does not exist (from {Path.cwd()}); point it at the "
            f"dataset folder the card {recipe.data.card!r} describes"
        )
    k = len(classes)
    probe = compute_metrics(np.arange(2 * k) % k, np.full((2 * k, k), 1 / k), classes, n_bootstrap=0)
    known = sorted({f"val/{name}" for name in probe.values if name != "n"} | {"val/loss", "train/epoch_loss"})
    if recipe.train.best_metric not in known:
        close = difflib.get_close_matches(recipe.train.best_metric, known, n=1)
        raise ConfigError(
            f"train.best_metric {recipe.train.best_metric!r} is not a metric the run computes"
            f"{f'; did you mean {close[0]!r}?' if close else ''} Known: {', '.join(known)}"
        )
    tiebreak = recipe.train.best_tiebreak
    if tiebreak is not None and tiebreak not in known:
        close = difflib.get_close_matches(tiebreak, known, n=1)
        raise ConfigError(
            f"train.best_tiebreak {tiebreak!r} is not a metric the run computes"
            f"{f'; did you mean {close[0]!r}?' if close else ''} Known: {', '.join(known)} (or null: "
            "no tie-break)"
        )


@dataclass
class PreparedRun:
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


def run_device(recipe: Recipe) -> torch.device:
    """``train.device`` resolved; under torchrun with CUDA, this process's ``cuda:LOCAL_RANK``."""
    return distributed.local_device(resolve_device(recipe.train.device), recipe.train.device)


def prepare_run(recipe: Recipe) -> PreparedRun:
    """Build everything the recipe describes, in the order the run needs it (the tricks act at their points)."""
    device = run_device(recipe)
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
        raise ConfigError(
            f"train.batch_size={recipe.train.batch_size} is larger than the training split "
            f"({len(bundle.train)} images{per}): every epoch would be one short batch and the lr is "
            "scaled for the configured batch; lower train.batch_size"
        )

    # The tricks act on the loaded weights (BN-gamma) before the optimizer sees the parameters.
    # extras: the unlabelled pool (data.label_fraction / data.unlabeled) for pseudo-labelling, the updates per
    # epoch (set once the loader exists) for tricks that ramp by epochs, and the schedule's build_scheduler
    # arguments (set once the optimizer exists) for a trick that trains a model of its own (MPL's teacher).
    ctx = TrickContext(
        recipe=recipe,
        classes=classes,
        train_targets=bundle.train.targets,
        device=device,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        extras={"unlabeled": bundle.unlabeled},
        load_run=load_trained,
    )
    tricks = build_tricks(recipe, ctx)
    for trick in tricks:
        trick.on_model(model)
    own_modules = [trick.name for trick in tricks if trick.extra_modules()] if world > 1 else []
    if own_modules:  # DDP averages the gradients of the model it wraps, not those of a trick's own module
        raise ConfigError(
            f"tricks {', '.join(own_modules)} train a module of their own next to the model (e.g. "
            "DRLoc's head), which does not run data-parallel (torchrun) yet: switch it off or train "
            "in one process"
        )
    frozen = freeze_model(model, recipe.model.freeze) if recipe.model.freeze else []
    for trick in tricks:
        trick.on_freeze(model, frozen)
    model = distributed.sync_batchnorm(model, device, recipe.train.sync_bn)  # torchrun only: BN over the global batch
    loader_options = merged_options(tricks, "loader_options")

    def train_loader_of(dataset, batch_size: int, num_workers: int = recipe.data.num_workers):
        return make_train_loader(
            dataset,
            batch_size=batch_size,
            seed=recipe.experiment.seed,
            num_workers=num_workers,
            num_replicas=world,
            rank=distributed.rank(),
            **loader_options,
        )

    cached = None
    if recipe.train.cache_frozen is not None:  # issue 29: train the unfrozen rest on cached prefix features
        started = time.perf_counter()
        cached = prepare_cached_prefix(
            recipe, model, bundle, tricks, device=device, amp_dtype=amp_dtype, world_size=world
        )
        timings["frozen_prefix_cache"] = time.perf_counter() - started
        train_loader = train_loader_of(cached.train_views, recipe.train.batch_size, num_workers=0)  # in memory
        val_loader = cached.val_loader(recipe.train.batch_size)
    elif recipe.schedule.progressive_resize is not None:
        train_loader = progressive_loader(recipe, bundle, data_config, train_loader_of)
        val_loader = eval_loader(bundle.val, recipe)
    else:
        train_loader = train_loader_of(bundle.train, recipe.train.batch_size)
        val_loader = eval_loader(bundle.val, recipe)
    engine_cfg = engine_config(recipe, device, amp_dtype)
    ctx.extras["updates_per_epoch"] = steps_per_epoch(train_loader, engine_cfg)
    opt = build_optimization(recipe, model, tricks, ctx.extras["updates_per_epoch"])
    ctx.extras["schedule_kwargs"] = dict(opt.schedule_kwargs)  # a trick's own optimizer follows the run's schedule
    loss_fn = build_loss(**merged_options(tricks, "loss_options"))
    for trick in tricks:
        loss_fn = trick.transform_loss_fn(loss_fn)

    return PreparedRun(
        device=device,
        amp_dtype=amp_dtype,
        classes=classes,
        model=model,
        data_config=data_config,
        info=info,
        bundle=bundle,
        tricks=tricks,
        frozen=frozen,
        train_loader=train_loader,
        val_loader=val_loader,
        engine_cfg=engine_cfg,
        opt=opt,
        loss_fn=loss_fn,
        cached=cached,
        timings=timings,
        data_fingerprint=split_fingerprint(bundle.manifest, recipe.data.root, _unlabeled_rows(bundle)),
    )


def eval_loader(dataset, recipe: Recipe) -> DataLoader:
    return DataLoader(dataset, batch_size=recipe.train.batch_size, shuffle=False, num_workers=recipe.data.num_workers)


def _unlabeled_rows(bundle):
    return getattr(bundle.unlabeled, "manifest", None) if bundle.unlabeled is not None else None


def _build_data(recipe: Recipe, card, data_config):
    return build_datasets(
        card,
        recipe.data.root,
        image_size=recipe.input_image_size(),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        in_chans=recipe.model.in_chans,
        augment=recipe.data.augment,
        split_seed=recipe.data.split_seed,
        val_fraction=recipe.data.val_fraction,
        test_fraction=recipe.data.test_fraction,
        test_by=recipe.data.test_by,
        on_bad_image=recipe.data.on_bad_image,
        cache_dir=recipe.data.cache_dir,
        synth=recipe.data.synth.model_dump() if recipe.data.synth else None,
        progress=recipe.train.progress and distributed.is_main(),
        label_fraction=recipe.data.label_fraction,
        label_count=recipe.data.label_count,
        unlabeled=recipe.data.unlabeled.model_dump() if recipe.data.unlabeled else None,
    )


def engine_config(recipe: Recipe, device, amp_dtype) -> EngineConfig:
    train = recipe.train
    return EngineConfig(
        epochs=train.epochs,
        device=device,
        seed=recipe.experiment.seed,
        amp_dtype=amp_dtype,
        channels_last=train.channels_last,
        grad_clip=train.grad_clip,
        accumulate=train.accumulate,
        max_steps_per_epoch=train.max_steps_per_epoch,
        best_metric=train.best_metric,
        best_mode=train.best_mode,
        best_tiebreak=train.best_tiebreak,
        best_tiebreak_mode=train.best_tiebreak_mode,
        log_every=train.log_every,
        progress=train.progress,
        compile=train.compile,
    )


@dataclass
class Optimization:
    optimizer: Any
    scheduler: Any
    lr: float
    updates_per_epoch: int
    schedule_kwargs: dict


def build_optimization(recipe: Recipe, model, tricks, updates_per_epoch: int) -> Optimization:
    """Param groups (tricks add their options, e.g. no-bias-decay) -> optimizer -> per-update schedule.

    Linear scaling uses the global batch: ``train.batch_size`` (per process) x the torchrun processes."""
    lr = scaled_lr(recipe.optim.lr, recipe.train.batch_size * distributed.world_size(), recipe.optim.linear_scaling)
    resizer = recipe.model.resizer
    options = merged_options(tricks, "param_options")
    groups = build_param_groups(
        model,
        weight_decay=recipe.optim.weight_decay,
        layer_decay=recipe.model.layer_decay,
        stage_of=stage_of_parameter if recipe.model.layer_decay is not None else None,
        lr_mults={"resizer.": resizer.lr_mult} if resizer.enabled else None,
        **options,
    )
    for trick in tricks:  # modules a trick trains next to the model (DRLoc's head): same options, no layer decay
        for module in trick.extra_modules().values():
            groups += build_param_groups(module, weight_decay=recipe.optim.weight_decay, **options)
    optimizer = build_optimizer(
        groups, name=recipe.optim.name, lr=lr, momentum=recipe.optim.momentum, betas=recipe.optim.betas
    )
    sched = recipe.schedule
    schedule_kwargs = dict(
        name=sched.name,
        epochs=recipe.train.epochs,
        steps_per_epoch=updates_per_epoch,
        warmup_epochs=sched.warmup_epochs,
        warmup_lr_init=sched.warmup_lr_init,
        milestones=sched.milestones,
        gamma=sched.gamma,
        min_lr=sched.min_lr,
    )
    return Optimization(
        optimizer, build_scheduler(optimizer, **schedule_kwargs), lr, updates_per_epoch, schedule_kwargs
    )
