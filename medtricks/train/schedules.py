"""Per-iteration learning-rate schedules: linear warmup, then cosine, step or constant (timm)."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler

from medtricks.errors import ConfigError

__all__ = ["build_scheduler", "lr_curve", "scaled_lr"]


def scaled_lr(lr: float, batch_size: int, linear_scaling: bool) -> float:
    """The paper's linear scaling rule: ``lr * batch_size / 256`` when switched on."""
    return lr * batch_size / 256.0 if linear_scaling else lr


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_lr_init: float = 0.0,
    milestones: list[float] | tuple[float, ...] = (),
    gamma: float = 0.1,
    min_lr: float = 0.0,
) -> Scheduler:
    """A timm scheduler stepped once per optimizer update (``scheduler.step_update(n)``).

    Warmup is a prefix: the decay phase starts after it, so at the end of warmup the LR is exactly
    the base LR. ``milestones`` are in epochs (fractions allowed) and become update counts.
    Example::

        sched = build_scheduler(opt, name="cosine", epochs=10, steps_per_epoch=50, warmup_epochs=1)
        for n in range(500): ...; sched.step_update(n + 1)
    """
    total = max(1, int(round(epochs * steps_per_epoch)))
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup >= total:
        raise ConfigError(
            f"schedule.warmup_epochs={warmup_epochs} covers the whole run "
            f"({epochs} epochs); it must be shorter than train.epochs"
        )
    scheduler = _make(optimizer, name, total, warmup, warmup_lr_init, milestones, gamma, min_lr, steps_per_epoch)
    if warmup > 0:
        scheduler = OneUpdateAhead(scheduler)
    scheduler.step_update(0)  # LR (with each group's lr_scale) for the very first update
    return scheduler


class OneUpdateAhead:
    """A timm scheduler read one update ahead: with warmup, update ``n`` (from 1) trains at
    ``warmup_lr_init + n/m (lr - warmup_lr_init)``, so the first update is not spent at
    ``warmup_lr_init`` (0 by default) and the last warmup update reaches ``lr``."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def step_update(self, num_updates: int, metric=None) -> None:
        self.scheduler.step_update(num_updates + 1, metric)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)


def _make(optimizer, name, total, warmup, warmup_lr_init, milestones, gamma, min_lr, steps_per_epoch):
    common = dict(warmup_t=warmup, warmup_lr_init=warmup_lr_init, warmup_prefix=True, t_in_epochs=False)
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=min_lr, cycle_limit=1, **common)
    if name == "step":
        # timm decays once t + 1 >= decay_t; +1 makes update M the first one at the lower LR.
        decay_t = [max(0, int(round(m * steps_per_epoch)) - warmup) + 1 for m in milestones]
        return MultiStepLRScheduler(optimizer, decay_t=decay_t, decay_rate=gamma, **common)
    if name == "constant":
        return MultiStepLRScheduler(optimizer, decay_t=[total + 1], decay_rate=1.0, **common)
    raise ConfigError(f"schedule.name must be 'cosine', 'step' or 'constant', got {name!r}")


def lr_curve(base_lr: float, **schedule_kwargs) -> list[float]:
    """The LR at every optimizer update of a run (for the schedule plot and tests)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = build_scheduler(optimizer, **schedule_kwargs)
    total = max(1, int(round(schedule_kwargs["epochs"] * schedule_kwargs["steps_per_epoch"])))
    lrs = []
    for update in range(total):
        scheduler.step_update(update)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs
