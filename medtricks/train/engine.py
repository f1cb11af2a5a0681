"""The training loop: AMP, EMA, gradient clipping/accumulation, checkpoint/resume, progress.

The loop is plain: it takes an nn.Module, loaders, an optimizer, a timm scheduler stepped per
update, a loss and the run's tricks (called at their points, see ``medtricks/tricks/base.py``), and
reports through two callbacks (``on_step``, ``on_epoch``), so it knows nothing about MLflow.
Under torchrun (``medtricks.train.distributed``) the loop trains through ``DistributedDataParallel``,
logs, checkpoints and validates on rank 0 only, and every process sees rank 0's validation metrics
and the loss averaged over all processes; with one process none of that happens.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from medtricks.errors import MedtricksError, UnknownKeyError
import medtricks.train.distributed as distributed
from medtricks.train.compile import compile_for_training
from medtricks.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medtricks.train.inference import autocast_context
from medtricks.tricks.base import saved_trick_states

__all__ = [
    "EngineConfig",
    "FitResult",
    "NonFiniteLossError",
    "fit",
    "seed_everything",
    "seed_epoch",
    "evaluation_model",
]


class NonFiniteLossError(MedtricksError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class EngineConfig:
    epochs: int
    device: torch.device
    seed: int = 0
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    grad_clip: Optional[float] = None
    accumulate: int = 1
    max_steps_per_epoch: Optional[int] = None
    best_metric: str = "val/auroc"
    best_mode: str = "max"
    # Epochs tied on best_metric: the one better on this metric wins (None: the earlier epoch stays best).
    best_tiebreak: Optional[str] = None
    best_tiebreak_mode: str = "min"
    log_every: int = 10
    progress: bool = True
    compile: str = "off"  # auto | on | off: torch.compile for the training forward (medtricks.train.compile)


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: Optional[float] = None
    best_epoch: Optional[int] = None
    best_tiebreak_value: Optional[float] = None  # the best epoch's value of cfg.best_tiebreak
    last_checkpoint: Optional[Path] = None
    best_checkpoint: Optional[Path] = None
    steps: int = 0
    resumed_from_epoch: Optional[int] = None
    compile_report: dict = field(default_factory=dict)  # train.compile: {mode, compiled, reason}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, loader=None, rank: int = 0) -> None:
    """Re-seed at every epoch start so a resumed run replays the same data order and augmentation.

    Data-parallel (``rank`` > 0 or a loader with a ``DistributedSampler``): the sampler's permutation is
    drawn from the same epoch seed in every process (each takes its own slice of it); augmentation,
    dropout and mixup draw from the epoch seed offset by the rank, so processes do not repeat each
    other's draws. Rank 0 (and a single process) seeds exactly as without DDP.
    """
    epoch_seed = seed * 100_003 + epoch
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # DistributedSampler(seed=0): permutation seeded with 0 + epoch_seed
        sampler.set_epoch(epoch_seed)
    process_seed = epoch_seed + rank * 1_000_003
    seed_everything(process_seed)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(process_seed)


def steps_per_epoch(loader, cfg: EngineConfig, batches: Optional[int] = None) -> int:
    """Optimizer updates per epoch (what the scheduler is sized with); ``batches``: instead of ``len(loader)``."""
    batches = len(loader) if batches is None else batches
    if cfg.max_steps_per_epoch:
        batches = min(batches, cfg.max_steps_per_epoch * cfg.accumulate)
    return max(1, math.ceil(batches / cfg.accumulate))


def _set_epoch(loader, epoch: int) -> None:
    """Tell a loader or its dataset which epoch comes (progressive sizes, the cached view to serve)."""
    for target in (loader, getattr(loader, "dataset", None)):
        if callable(getattr(target, "set_epoch", None)):
            target.set_epoch(epoch)


def _schedule_at(scheduler, optimizer, epoch: int, update: int, updates: int, nominal: int, scale: float) -> None:
    """Set the lr for the next update: position ``epoch + update/updates`` of the schedule, times ``scale``."""
    scheduler.step_update(int(round(nominal * (epoch + update / max(1, updates)))))
    if scale != 1.0:
        for group in optimizer.param_groups:
            group["lr"] *= scale


def _check_finite_weights(model: nn.Module, epoch: int, last_path: Path) -> None:
    """A finite loss can hide inf/NaN weights (e.g. an exploding lr): never checkpoint those as "good"."""
    with torch.no_grad():
        total = torch.stack([p.detach().float().abs().sum() for p in model.parameters()]).sum()
    if not torch.isfinite(total):
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
        kept = f"the last good checkpoint is {last_path}" if last_path.is_file() else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"the weights became non-finite at epoch {epoch + 1} ({len(bad)} tensors, e.g. "
            f"{', '.join(bad[:3])}) although the loss stayed finite; not checkpointing them. "
            f"{kept}. Lower optim.lr, check the schedule (schedule.gamma, warmup) or set "
            "train.grad_clip."
        )


def evaluation_model(model: nn.Module, tricks: Sequence[Any] = ()) -> nn.Module:
    """The model to validate and save: ``model`` through the tricks' ``transform_eval_model`` (EMA's averaged
    weights), or ``model`` itself."""
    for trick in tricks:
        model = trick.transform_eval_model(model)
    return model


def _better(value: float, best: Optional[float], mode: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _tied(value: Optional[float], best: Optional[float]) -> bool:
    """Equal selection values (AUROC 1.000 at two epochs); float noise of a few ulps counts as equal."""
    if value is None or best is None or not (math.isfinite(value) and math.isfinite(best)):
        return False
    return math.isclose(value, best, rel_tol=1e-12, abs_tol=1e-12)


def _new_best(metrics: dict, result: "FitResult", cfg: EngineConfig) -> bool:
    """Whether this epoch's ``metrics`` beat the best epoch so far: ``cfg.best_metric`` first; on a tie,
    ``cfg.best_tiebreak`` (the earlier epoch stays best when that ties too or is not set)."""
    value = metrics.get(cfg.best_metric)
    if _tied(value, result.best_value):
        if cfg.best_tiebreak is None:
            return False
        tiebreak = metrics.get(cfg.best_tiebreak)
        return (
            tiebreak is not None
            and result.best_tiebreak_value is not None
            and _better(tiebreak, result.best_tiebreak_value, cfg.best_tiebreak_mode)
        )
    return _better(value, result.best_value, cfg.best_mode)


def _tiebreak_of(history: list, best_epoch: Optional[int], cfg: EngineConfig) -> Optional[float]:
    """The best epoch's tie-break value from the history (a last.pt written before the tie-break was stored)."""
    if cfg.best_tiebreak is None or not best_epoch or best_epoch > len(history):
        return None
    return history[best_epoch - 1].get(cfg.best_tiebreak)


def fit(
    model: nn.Module,
    train_loader,
    val_loader,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: nn.Module,
    cfg: EngineConfig,
    evaluate_fn: Callable[[nn.Module], dict[str, float]],
    checkpoint_dir: str | Path,
    tricks: Sequence[Any] = (),
    on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
    on_epoch: Optional[Callable[[int, dict[str, float]], None]] = None,
    resume: bool = False,
    checkpoint_extra: Optional[dict[str, Any]] = None,
    train_module: Optional[nn.Module] = None,
) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs; checkpoint every epoch; keep the best.

    ``evaluate_fn(model)`` returns validation metrics such as ``{"val/auroc": 0.9, ...}``; the
    one named ``cfg.best_metric`` chooses ``best.pt`` (ties broken by ``cfg.best_tiebreak``). With ``resume=True`` and a ``last.pt`` in
    ``checkpoint_dir`` the run continues after the last finished epoch and reaches the same result
    as an uninterrupted run (each epoch re-seeds data order and augmentation from the seed).

    ``tricks`` (:class:`medtricks.tricks.base.Trick` objects) act at their points: ``on_fit_start``,
    ``transform_batch``, ``extra_loss``, ``on_step_end``, ``transform_eval_model``, ``on_epoch_end``; their
    ``state_dict`` goes into ``last.pt``. ``checkpoint_extra`` (plain values) is stored in every ``last.pt`` as
    well (the run's: the data fingerprint a resume checks).

    Under torchrun every process calls ``fit`` with its slice of the data (a ``DistributedSampler``): the
    forward/backward passes go through ``DistributedDataParallel``; tricks, EMA, checkpoints and
    ``evaluate_fn`` see the unwrapped ``model``. Rank 0 alone validates (on the whole validation split),
    writes the checkpoints and calls ``on_step``/``on_epoch``; the others wait for its metrics. The loss
    that is logged, checked for NaN and averaged into ``train/epoch_loss`` is the mean over all processes.

    ``train_module`` (default ``model``): what the training batches go through, when it is not ``model``
    itself — a :class:`~medtricks.train.frozen_cache.SuffixModel` sharing ``model``'s trainable layers and fed
    cached features. ``model`` is still what is checkpointed, averaged (EMA) and validated. A training loader
    (or its dataset) with ``set_epoch`` is told each epoch before it is iterated (cached views, progressive
    resizing); one with ``lr_scale`` (progressive resizing) has the lr schedule stepped in fractions of an epoch
    and scaled by ``lr_scale(epoch)``.
    """
    main = distributed.is_main()
    checkpoint_dir = Path(checkpoint_dir)
    if main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    device = cfg.device
    model.to(device)
    loss_fn = loss_fn.to(device) if isinstance(loss_fn, nn.Module) else loss_fn  # class weights live on the device
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp_dtype == torch.float16 else None
    result = FitResult(last_checkpoint=last_path, best_checkpoint=best_path)
    start_epoch, step = 0, 0
    for trick in tricks:
        trick.on_fit_start(model)

    if resume and last_path.is_file():
        state = load_checkpoint(last_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        saved = saved_trick_states(state)  # by trick name; a last.pt from before tricks were plug-ins too
        for trick in tricks:
            if saved.get(trick.name) is not None:
                trick.load_state_dict(saved[trick.name])
        set_rng_state(state["rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        result.history = state["history"]
        result.best_value, result.best_epoch = state["best_value"], state["best_epoch"]
        result.best_tiebreak_value = (
            state["best_tiebreak_value"]
            if "best_tiebreak_value" in state
            else _tiebreak_of(result.history, result.best_epoch, cfg)
        )
        result.resumed_from_epoch = state["epoch"]
        if on_epoch and main and result.history:
            # The process may have died between this checkpoint and the epoch's logging (kill -9, a lost
            # Ray worker): hand the checkpointed epoch to on_epoch again; the run skips what its store has.
            on_epoch(step, result.history[-1])

    # DDP: rank 0's weights (resumed ones included) are broadcast here; gradients are averaged at each backward.
    forward_module = train_module if train_module is not None else model
    train_model = distributed.wrap(forward_module, device)
    ddp = train_model is not forward_module
    # The training forward only: checkpoints, EMA and validation keep the eager model (no second graph).
    train_model, result.compile_report = compile_for_training(train_model, cfg.compile, device)
    # Progressive resizing: the batch (so the updates per epoch) changes by epoch; the lr schedule stays in epochs.
    progressive = hasattr(train_loader, "lr_scale")
    nominal_updates = steps_per_epoch(train_loader, cfg, train_loader.nominal_batches) if progressive else None
    # Clipping covers every parameter the optimizer updates: the model's and a trick's own (DRLoc's head).
    clipped = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(start_epoch, cfg.epochs):
        _set_epoch(train_loader, epoch)
        updates_per_epoch = steps_per_epoch(train_loader, cfg)  # per process: its slice of the epoch
        seed_epoch(cfg.seed, epoch, train_loader, rank=distributed.rank())
        if progressive:
            _schedule_at(
                scheduler, optimizer, epoch, 0, updates_per_epoch, nominal_updates, train_loader.lr_scale(epoch)
            )
        train_model.train()
        epoch_loss, epoch_images, started = 0.0, 0, time.perf_counter()
        max_batches = updates_per_epoch * cfg.accumulate
        iterator = train_loader
        bar = None
        if cfg.progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=min(len(train_loader), max_batches),
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
        optimizer.zero_grad(set_to_none=True)
        for batch_index, (images, targets) in enumerate(iterator):
            if batch_index >= max_batches:
                break
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            for trick in tricks:
                images, targets = trick.transform_batch(images, targets)
            last_in_epoch = batch_index + 1 == min(len(train_loader), max_batches)
            updating = (batch_index + 1) % cfg.accumulate == 0 or last_in_epoch
            # DDP: accumulated micro-batches are averaged once, in the backward before the update (no_sync
            # covers the forward pass: that is where DDP decides whether the next backward synchronizes).
            with (
                train_model.no_sync() if ddp and not updating else nullcontext(),
                autocast_context(device, cfg.amp_dtype),
            ):
                logits = train_model(images)
                loss = loss_fn(logits.float(), targets)
                for trick in tricks:
                    extra = trick.extra_loss(model, images, targets, logits)
                    if extra is not None:
                        loss = loss + extra.float()
            # One host sync per batch: the value serves the finiteness check, the epoch mean and the bar.
            loss_value = loss.item()
            batch = images.shape[0]
            if ddp:  # the mean over every process's images: all processes stop together on a NaN, rank 0 logs it
                loss_sum, images_seen = distributed.sum_across([loss_value * batch, float(batch)])
                loss_value, batch = loss_sum / images_seen, int(images_seen)
            if not math.isfinite(loss_value):
                if bar is not None:
                    bar.close()
                kept = (
                    f"the last good checkpoint is {last_path}"
                    if last_path.is_file()
                    else "no checkpoint was written yet (it failed in the first epoch)"
                )
                raise NonFiniteLossError(
                    f"training loss is {loss_value} at epoch {epoch + 1}, update {step}; stopping. "
                    f"{kept}. Lower optim.lr, add warmup (schedule.warmup_epochs) or set "
                    "train.grad_clip."
                )
            (scaler.scale(loss / cfg.accumulate) if scaler else loss / cfg.accumulate).backward()
            if updating:
                if cfg.grad_clip:
                    if scaler:
                        scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(clipped, cfg.grad_clip)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if progressive:
                    _schedule_at(
                        scheduler,
                        optimizer,
                        epoch,
                        (batch_index + 1) // cfg.accumulate if not last_in_epoch else updates_per_epoch,
                        updates_per_epoch,
                        nominal_updates,
                        train_loader.lr_scale(epoch),
                    )
                else:
                    scheduler.step_update(step)
                for trick in tricks:
                    trick.on_step_end(model, step)
                if on_step and step % cfg.log_every == 0 and main:
                    on_step(step, {"train/loss": loss_value, "lr": optimizer.param_groups[0]["lr"]})
            epoch_loss += loss_value * batch
            epoch_images += batch
            if bar is not None:
                # Every batch (a 9-batch epoch must not show the first batch for the whole epoch); cheap:
                # refresh=False stores the postfix and update() redraws at the bar's own rate (mininterval).
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                    img_s=f"{epoch_images / elapsed:.1f}",
                    refresh=False,
                )
                bar.update(1)
        if bar is not None:
            bar.close()
        elapsed = max(time.perf_counter() - started, 1e-9)
        metrics = {
            "train/epoch_loss": epoch_loss / max(epoch_images, 1),
            "train/img_per_s": epoch_images / elapsed,
            "epoch": float(epoch + 1),
        }
        eval_model = evaluation_model(model, tricks)
        # DDP: rank 0 validates the model it saves, on the whole split; the others wait for its metrics here.
        metrics.update(distributed.broadcast(evaluate_fn(eval_model) if main else None))
        result.history.append(metrics)
        value = metrics.get(cfg.best_metric)
        if cfg.best_metric not in metrics:
            raise UnknownKeyError(
                f"train.best_metric {cfg.best_metric!r} is not among the validation metrics: {sorted(metrics)}"
            )
        if _new_best(metrics, result, cfg):
            result.best_value, result.best_epoch = value, epoch + 1
            result.best_tiebreak_value = metrics.get(cfg.best_tiebreak) if cfg.best_tiebreak else None
            if main:
                save_checkpoint(
                    {"model": eval_model.state_dict(), "epoch": epoch, "metric": cfg.best_metric, "value": value},
                    best_path,
                )
        elif result.best_value is None:
            # The metric is undefined (e.g. AUROC on a validation split missing a class): keep the
            # latest epoch as "best" so the run still ends with a checkpoint, and say so.
            if main:
                warnings.warn(
                    f"train.best_metric {cfg.best_metric!r} is {value} at epoch {epoch + 1}; keeping "
                    "the latest epoch as the best checkpoint until it becomes defined",
                    RuntimeWarning,
                    stacklevel=2,
                )
                save_checkpoint(
                    {"model": eval_model.state_dict(), "epoch": epoch, "metric": cfg.best_metric, "value": value},
                    best_path,
                )
            result.best_epoch = epoch + 1
            result.best_tiebreak_value = metrics.get(cfg.best_tiebreak) if cfg.best_tiebreak else None
        _check_finite_weights(model, epoch, last_path)  # the same weights in every process: all stop together
        if main:  # DDP: rank 0's RNG state; every process re-seeds from the epoch seed at the next epoch anyway
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "tricks": {t.name: saved_state for t in tricks if (saved_state := t.state_dict()) is not None},
                    "rng": rng_state(),
                    "epoch": epoch,
                    "step": step,
                    "history": result.history,
                    "best_value": result.best_value,
                    "best_epoch": result.best_epoch,
                    "best_tiebreak": cfg.best_tiebreak,
                    "best_tiebreak_value": result.best_tiebreak_value,
                    **(checkpoint_extra or {}),
                },
                last_path,
            )
        for trick in tricks:
            trick.on_epoch_end(epoch, metrics)
        if on_epoch and main:  # after the checkpoint: a logging failure loses nothing
            on_epoch(step, metrics)
    result.steps = step
    return result
