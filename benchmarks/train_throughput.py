"""Training throughput and peak memory: the medtricks engine vs a bare PyTorch loop vs timm's train.py loop.

Contenders (same model type built by ``medtricks.models.create_model`` with the same seed, same
synthetic batches, same loss, same SGD-momentum optimizer with the same no-decay groups for biases
and norm parameters, same per-update warmup + cosine LR schedule, so all three do the same
arithmetic; their final losses agree and the JSON records them as a check):

- ``medtricks``: :func:`medtricks.train.fit` with the recipe defaults that cost time per step
  (NaN check, loss bookkeeping, the tqdm bar, timm scheduler ``step_update``), built from
  ``build_param_groups`` / ``build_optimizer`` / ``build_scheduler`` / ``build_loss``.
- ``bare``: the shortest loop one writes by hand (forward, loss, zero_grad, backward, step); the LR
  of each update is set from a list computed before the loop.
- ``timm``: the body of ``train_one_epoch`` from timm's ``train.py`` (gradient accumulation 1, no
  prefetcher, no mixup/EMA): ``create_optimizer_v2``, ``CosineLRScheduler.step_update``,
  ``LabelSmoothingCrossEntropy``, ``AverageMeter`` bookkeeping and its log line every 50 updates.

What is timed: only optimizer updates. Each contender runs ``warmup + steps`` updates and calls a
tick after every update (the engine's tick is its ``on_step`` callback with ``log_every=1``); the
clock is read at tick ``warmup`` and tick ``warmup + steps`` (after ``cuda.synchronize`` on a GPU), so
model building, ``fit``'s checkpoint writing and the (no-op) evaluation at the end of the epoch lie
outside the window, while all that the engine does per step lies inside it. Contenders run
interleaved (each repeat rotates the order) in one process; the result is the median over repeats
and the ratio of medians (``ratio_vs_bare``, ``ratio_vs_timm``), plus the per-repeat paired ratios.

Peak RSS cannot be told apart for three loops sharing one process, so each contender also runs once
in a fresh process (``--rss-probe``) and reports its peak RSS at its last update.

A second configuration, one Linear layer on 1x8x8 inputs with batch 2, makes the arithmetic so cheap
that each loop's fixed per-update cost shows (what matters on a fast GPU): ``overhead`` in the JSON,
microseconds per update.

Run (from the repository root)::

    python -m benchmarks.train_throughput            # full, ~20 min on 2 CPU cores
    python -m benchmarks.train_throughput --quick    # seconds, smoke test
    python -m benchmarks.train_throughput --device cuda --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `medtricks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    current_rss_mb,
    format_table,
    interleaved_order,
    machine_info,
    peak_rss_mb,
    ratio,
    results_dir,
    summarize,
    write_results,
)

NAME = "train_throughput"
CONTENDERS = ("medtricks", "bare", "timm")
MODELS = ("resnet18", "tf_efficientnet_lite0")
TARGETS = {"ratio_vs_bare": 0.95, "ratio_vs_timm": 1.0}
LINEAR = "linear"  # build_model's stand-in for a free model (per-update overhead check)
_TIMM_LOG_INTERVAL = 50  # timm train.py's default --log-interval
_timm_logger = logging.getLogger("benchmarks.timm_train")


@dataclass(frozen=True)
class Config:
    """One measured configuration; the hyper-parameters are the same for every contender."""

    model: str
    in_chans: int
    batch_size: int = 32
    image_size: int = 224
    warmup: int = 1
    steps: int = 4
    device: str = "cpu"
    amp: str = "none"  # none | bf16
    channels_last: bool = False
    progress: bool = True  # the engine's tqdm bar, on by default in recipes (its output is discarded)
    lr: float = 0.01  # 0.1 makes the random-init lite0 diverge on noise within a few updates
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.25  # of the run, as LR warmup
    distinct_batches: int = 2

    def __post_init__(self):
        if self.warmup < 1 or self.steps < 1:
            raise ValueError(
                f"warmup and steps must be >= 1 (the clock starts at update `warmup`), "
                f"got warmup={self.warmup}, steps={self.steps}"
            )
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")

    @property
    def total(self) -> int:
        return self.warmup + self.steps

    @property
    def key(self) -> str:
        return f"{self.model}/{self.in_chans}x{self.image_size}"

    def torch_device(self):
        import torch

        return torch.device(self.device)

    def amp_dtype(self):
        import torch

        return torch.bfloat16 if self.amp == "bf16" else None

    def schedule_kwargs(self) -> dict[str, Any]:
        """``medtricks.tricks.build_scheduler`` arguments: one epoch of ``total`` updates."""
        return dict(
            name="cosine",
            epochs=1,
            steps_per_epoch=self.total,
            warmup_epochs=self.warmup_fraction,
            warmup_lr_init=self.lr * 0.01,
            min_lr=0.0,
        )


class SyntheticLoader:
    """Stands in for a DataLoader: ``length`` batches cycled from a few fixed CPU tensors (no decoding,
    no augmentation: this script measures the training loop; data_pipeline.py measures loaders)."""

    def __init__(self, batches: list, length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for index in range(self.length):
            yield self.batches[index % len(self.batches)]


class StepClock:
    """Called after every optimizer update as ``clock(update, loss)``; reads the time at update
    ``warmup`` and ``warmup + steps`` (synchronizing CUDA first), and the loss and peak RSS at the end.
    ``loss`` may be a tensor: it is read only at the last update, so the clock adds no sync."""

    def __init__(self, cfg: Config):
        self.start_update, self.end_update = cfg.warmup, cfg.total
        self.cuda = cfg.torch_device().type == "cuda"
        self.t0: Optional[float] = None
        self.t1: Optional[float] = None
        self.final_loss: Optional[float] = None
        self.peak_rss_mb: Optional[float] = None

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, update: int, loss) -> None:
        if update == self.start_update:
            self.t0 = self._now()
        elif update == self.end_update:
            self.t1 = self._now()
            self.final_loss = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
            self.peak_rss_mb = peak_rss_mb()

    @property
    def seconds(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"the loop did not reach updates {self.start_update} and {self.end_update}")
        return self.t1 - self.t0


def make_batches(cfg: Config, seed: int = 0) -> list:
    """``cfg.distinct_batches`` (images, targets) pairs of normal noise and random binary labels."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.batch_size, cfg.in_chans, cfg.image_size, cfg.image_size)
    return [
        (torch.randn(shape, generator=gen), torch.randint(0, 2, (cfg.batch_size,), generator=gen))
        for _ in range(cfg.distinct_batches)
    ]


def build_model(cfg: Config):
    """The same randomly initialised model for every contender (seeded). ``linear`` is a one-layer
    classifier whose update costs microseconds, so that each loop's fixed per-update cost shows."""
    import torch

    from medtricks.models import create_model

    torch.manual_seed(0)
    if cfg.model == LINEAR:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(cfg.in_chans * cfg.image_size**2, 2))
    return create_model(cfg.model, weights="none", num_classes=2, in_chans=cfg.in_chans)


# ------------------------------------------------------------------------------------ contenders
def run_medtricks(cfg: Config, model, loader: SyntheticLoader, clock: StepClock, workdir: Path) -> None:
    """``medtricks.train.fit`` for one epoch of ``cfg.total`` updates; the clock is its ``on_step``."""
    from medtricks.train import EngineConfig, fit
    from medtricks.train.losses import build_loss
    from medtricks.train.param_groups import build_optimizer, build_param_groups
    from medtricks.train.schedules import build_scheduler

    groups = build_param_groups(model, weight_decay=cfg.weight_decay, no_bias_decay=True)
    optimizer = build_optimizer(groups, name="sgd", lr=cfg.lr, momentum=cfg.momentum)
    scheduler = build_scheduler(optimizer, **cfg.schedule_kwargs())
    engine_cfg = EngineConfig(
        epochs=1,
        device=cfg.torch_device(),
        seed=0,
        amp_dtype=cfg.amp_dtype(),
        channels_last=cfg.channels_last,
        max_steps_per_epoch=cfg.total,
        log_every=1,
        progress=cfg.progress,
    )
    with contextlib.redirect_stderr(io.StringIO()):  # the tqdm bar is drawn (its cost counts), not shown
        fit(
            model,
            loader,
            None,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=build_loss(label_smoothing=cfg.label_smoothing, mixup=None),
            cfg=engine_cfg,
            evaluate_fn=lambda _model: {"val/auroc": 0.0},
            checkpoint_dir=workdir,
            on_step=lambda update, metrics: clock(update, metrics["train/loss"]),
        )


def run_bare(cfg: Config, model, loader: SyntheticLoader, clock: StepClock, workdir: Path) -> None:
    """A hand-written loop: forward, loss, zero_grad, backward, step; LR per update from a list."""
    import torch
    from torch import nn

    from medtricks.train.schedules import lr_curve

    device = cfg.torch_device()
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
    )
    lrs = lr_curve(cfg.lr, **cfg.schedule_kwargs())  # the same warmup + cosine values, computed up front
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    amp = cfg.amp_dtype()
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    model.train()
    for update, (images, targets) in enumerate(loader, start=1):
        for group in optimizer.param_groups:
            group["lr"] = lrs[update - 1]
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clock(update, loss)


def run_timm(cfg: Config, model, loader: SyntheticLoader, clock: StepClock, workdir: Path) -> None:
    """timm ``train.py``'s setup and ``train_one_epoch`` body (accumulation 1, single process)."""
    import torch
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import AverageMeter

    device = cfg.torch_device()
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # timm's "momentum" is SGD with classical momentum ("sgd" would be Nesterov); its default
    # filter_bias_and_bn puts biases and 1-D parameters in a no-decay group, as medtricks does.
    optimizer = create_optimizer_v2(
        model, opt="momentum", lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    kwargs = cfg.schedule_kwargs()
    warmup_t = int(round(kwargs["warmup_epochs"] * cfg.total))
    lr_scheduler = CosineLRScheduler(
        optimizer,
        t_initial=cfg.total - warmup_t,
        lr_min=kwargs["min_lr"],
        warmup_t=warmup_t,
        warmup_lr_init=kwargs["warmup_lr_init"],
        warmup_prefix=True,
        t_in_epochs=False,
        cycle_limit=1,
    )
    lr_scheduler.step_update(num_updates=1)  # the first update's lr, one ahead as in medtricks
    loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing).to(device)
    amp = cfg.amp_dtype()
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp) if amp else contextlib.suppress

    epoch = 0
    update_time_m, data_time_m, losses_m = AverageMeter(), AverageMeter(), AverageMeter()
    model.train()
    updates_per_epoch = len(loader)
    num_updates = epoch * updates_per_epoch
    data_start_time = update_start_time = time.time()
    optimizer.zero_grad()
    update_sample_count = 0
    for batch_idx, (input, target) in enumerate(loader):
        update_idx = batch_idx
        input, target = input.to(device), target.to(device)
        if cfg.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        data_time_m.update(time.time() - data_start_time)
        with amp_autocast():
            output = model(input)
            loss = loss_fn(output, target)
        loss.backward()
        optimizer.step()
        losses_m.update(loss.item(), input.size(0))
        update_sample_count += input.size(0)
        num_updates += 1
        optimizer.zero_grad()
        time_now = time.time()
        update_time_m.update(time.time() - update_start_time)
        update_start_time = time_now
        if update_idx % _TIMM_LOG_INTERVAL == 0:
            lrl = [param_group["lr"] for param_group in optimizer.param_groups]
            lr = sum(lrl) / len(lrl)
            _timm_logger.info(
                f"Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} "
                f"({100.0 * update_idx / max(updates_per_epoch - 1, 1):>3.0f}%)]  "
                f"Loss: {losses_m.val:#.3g} ({losses_m.avg:#.3g})  "
                f"Time: {update_time_m.val:.3f}s, {update_sample_count / max(update_time_m.val, 1e-9):>7.2f}/s  "
                f"LR: {lr:.3e}  Data: {data_time_m.val:.3f} ({data_time_m.avg:.3f})"
            )
        # medtricks reads the schedule one update ahead (no update spent at warmup_lr_init): match it
        lr_scheduler.step_update(num_updates=num_updates + 1, metric=losses_m.avg)
        update_sample_count = 0
        data_start_time = time.time()
        clock(num_updates, loss)


RUNNERS: dict[str, Callable] = {"medtricks": run_medtricks, "bare": run_bare, "timm": run_timm}


def measure(contender: str, cfg: Config, batches: list) -> dict[str, Any]:
    """Train a fresh model with one contender; img/s over the timed updates, final loss, peak RSS."""
    if contender not in RUNNERS:
        raise ValueError(f"unknown contender {contender!r}; expected one of {sorted(RUNNERS)}")
    model = build_model(cfg)
    clock = StepClock(cfg)
    rss_before = current_rss_mb()
    with tempfile.TemporaryDirectory(prefix="medtricks-bench-") as workdir:
        RUNNERS[contender](cfg, model, SyntheticLoader(batches, cfg.total), clock, Path(workdir))
    del model
    gc.collect()
    return {
        "img_per_s": cfg.steps * cfg.batch_size / clock.seconds,
        "seconds": clock.seconds,
        "final_loss": clock.final_loss,
        "peak_rss_mb": clock.peak_rss_mb,
        "rss_before_mb": rss_before,
    }


def compare(cfg: Config, repeats: int, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """All contenders on one configuration, interleaved; medians, ratios and paired ratios."""
    batches = make_batches(cfg)
    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for r, order in enumerate(interleaved_order(CONTENDERS, repeats)):
        for contender in order:
            runs[contender].append(measure(contender, cfg, batches))
            say(f"  {cfg.key} repeat {r + 1}/{repeats} {contender:9s} {runs[contender][-1]['img_per_s']:8.2f} img/s")
    rates = {c: summarize(run["img_per_s"] for run in runs[c]) for c in CONTENDERS}
    medians = {c: rates[c]["median"] for c in CONTENDERS}
    paired = {
        other: summarize(m["img_per_s"] / o["img_per_s"] for m, o in zip(runs["medtricks"], runs[other]))
        for other in ("bare", "timm")
    }
    losses = {c: runs[c][0]["final_loss"] for c in CONTENDERS}
    out = {
        "model": cfg.model,
        "in_chans": cfg.in_chans,
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "img_per_s": medians,
        "ratio_vs_bare": ratio(medians["medtricks"], medians["bare"]),
        "ratio_vs_timm": ratio(medians["medtricks"], medians["timm"]),
        "timm_vs_bare": ratio(medians["timm"], medians["bare"]),
        "paired_ratio_vs_bare": paired["bare"],
        "paired_ratio_vs_timm": paired["timm"],
        "img_per_s_runs": rates,
        "seconds_per_update": {c: 1.0 / medians[c] * cfg.batch_size for c in CONTENDERS},
        "final_loss": losses,
        "max_final_loss_diff": max(losses.values()) - min(losses.values()),
    }
    out["meets_targets"] = all(out[k] is not None and out[k] >= v for k, v in TARGETS.items())
    out["verdict"] = {k: verdict(out[k], target, out[f"paired_{k}"]) for k, target in TARGETS.items()}
    return out


def verdict(value: Optional[float], target: float, paired: dict[str, Any]) -> str:
    """``met`` (ratio of medians >= target), ``within noise`` (below, but some repeat's paired ratio
    reaches the target: the machine's noise is larger than the gap) or ``missed``."""
    if value is not None and value >= target:
        return "met"
    return "within noise" if paired["max"] >= target else "missed"


# ------------------------------------------------------------------------------- peak RSS probes
def _probe_args(contender: str, cfg: Config) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--rss-probe",
        contender,
        "--models",
        cfg.model,
        "--in-chans",
        str(cfg.in_chans),
        "--batch-size",
        str(cfg.batch_size),
        "--image-size",
        str(cfg.image_size),
        "--device",
        cfg.device,
        "--amp",
        cfg.amp,
    ] + (["--channels-last"] if cfg.channels_last else [])


def rss_probe(contender: str, cfg: Config, timeout: float = 900) -> dict[str, Any]:
    """Run one contender for 2 updates in a fresh process; its peak RSS at the last update (MiB) and
    its RSS just before training (model and batches built), so ``loop_rss_mb`` is what training adds."""
    proc = subprocess.run(_probe_args(contender, cfg), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"peak-RSS probe for {contender} on {cfg.key} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"peak-RSS probe for {contender} on {cfg.key} printed no JSON:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def _probe_main(contender: str, cfg: Config) -> None:
    result = measure(contender, replace(cfg, warmup=1, steps=1), make_batches(cfg))
    print(
        json.dumps(
            {"contender": contender, "peak_rss_mb": result["peak_rss_mb"], "rss_before_mb": result["rss_before_mb"]}
        )
    )


# ------------------------------------------------------------------------------------------ main
def _parser():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"timm model names (default {MODELS})")
    parser.add_argument("--in-chans", type=int, nargs="+", default=[1, 3], help="input channels (default 1 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates before the clock starts")
    parser.add_argument("--steps", type=int, default=5, help="timed updates per repeat (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats, median reported (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="engine without its tqdm bar")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process peak-RSS probes")
    parser.add_argument("--no-overhead", action="store_true", help="skip the tiny per-update overhead check")
    parser.add_argument("--rss-probe", choices=CONTENDERS, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.in_chans = args.models[:1], args.in_chans[:1]
        args.batch_size, args.image_size, args.steps, args.repeats = 4, 64, 2, 2
    base = dict(
        batch_size=args.batch_size,
        image_size=args.image_size,
        warmup=args.warmup,
        steps=args.steps,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        progress=not args.no_progress,
    )
    if args.rss_probe:
        _probe_main(args.rss_probe, Config(model=args.models[0], in_chans=args.in_chans[0], **base))
        return {}

    import timm

    machine = machine_info(timm=timm.__version__)
    print(
        f"training throughput on {machine['cpu']} ({machine['logical_cpus']} CPUs, {machine['torch_threads']} "
        f"torch threads, device {args.device}), load {machine['loadavg_start']}"
    )
    results: dict[str, Any] = {}
    for model_name in args.models:
        for in_chans in args.in_chans:
            cfg = Config(model=model_name, in_chans=in_chans, **base)
            entry = compare(cfg, args.repeats)
            if not args.no_rss:
                probes = {c: rss_probe(c, cfg) for c in CONTENDERS}
                entry["peak_rss_mb"] = {c: probes[c]["peak_rss_mb"] for c in CONTENDERS}
                entry["loop_rss_mb"] = {c: probes[c]["peak_rss_mb"] - probes[c]["rss_before_mb"] for c in CONTENDERS}
            results[cfg.key] = entry

    overhead = None
    if not args.no_overhead:
        tiny = Config(
            model=LINEAR,
            in_chans=1,
            batch_size=2,
            image_size=8,
            warmup=20,
            steps=100 if args.quick else 1000,
            device=args.device,
            progress=not args.no_progress,
        )
        small = compare(tiny, args.repeats, say=lambda s: None)
        per_update = {c: 1e6 * tiny.batch_size / small["img_per_s"][c] for c in CONTENDERS}
        # The engine once more without its tqdm bar, to split the bar's cost from the loop's.
        quiet = compare(replace(tiny, progress=False), args.repeats, say=lambda s: None)
        per_update["medtricks_no_progress"] = 1e6 * tiny.batch_size / quiet["img_per_s"]["medtricks"]
        overhead = {
            "config": asdict(tiny),
            "us_per_update": per_update,
            "medtricks_minus_bare_us": per_update["medtricks"] - per_update["bare"],
            "medtricks_minus_timm_us": per_update["medtricks"] - per_update["timm"],
            "progress_bar_us": per_update["medtricks"] - per_update["medtricks_no_progress"],
            "final_loss": small["final_loss"],
        }

    payload = {
        "benchmark": NAME,
        "quick": bool(args.quick),
        "method": (
            "img/s over timed optimizer updates only (clock read in a per-update callback at update "
            "`warmup` and `warmup+steps`; engine: on_step with log_every=1); interleaved repeats in one "
            "process, median; ratios = medtricks median / other median; peak RSS from a fresh process "
            "per contender, read at its last update"
        ),
        "config": {
            **base,
            "repeats": args.repeats,
            "contenders": list(CONTENDERS),
            "optimizer": "SGD momentum 0.9",
            "lr": Config.lr,
            "weight_decay": Config.weight_decay,
            "label_smoothing": Config.label_smoothing,
            "schedule": "warmup 25% + cosine, per update",
        },
        "targets": TARGETS,
        "machine": machine,
        "results": results,
        "overhead": overhead,
    }
    rows = []
    for key, entry in results.items():
        rss = entry.get("peak_rss_mb") or {}
        rows.append(
            {
                "model/input": key,
                **{f"{c} img/s": entry["img_per_s"][c] for c in CONTENDERS},
                "x bare": entry["ratio_vs_bare"],
                "x timm": entry["ratio_vs_timm"],
                **{f"RSS {c} MiB": rss.get(c) for c in CONTENDERS},
                "vs bare": entry["verdict"]["ratio_vs_bare"],
                "vs timm": entry["verdict"]["ratio_vs_timm"],
            }
        )
    print(format_table(rows, list(rows[0]) if rows else ["model/input"]))
    if overhead:
        print(
            "fixed cost per update (one Linear layer, 1x8x8, batch 2): "
            + ", ".join(f"{c} {v:,.0f} us" for c, v in overhead["us_per_update"].items())
        )
    path = write_results(payload, results_dir(args.out, args.quick), NAME)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
