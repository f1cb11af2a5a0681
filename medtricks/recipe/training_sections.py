"""The recipe sections that say how the model trains: ``optim``, ``schedule`` (with
``schedule.progressive_resize``) and ``train`` (with ``train.cache_frozen``). Every name is importable from
:mod:`medtricks.recipe.sections`."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from medtricks._defaults import DEFAULT_METRIC
from medtricks._schema import Section
from medtricks.errors import ConfigError

_Section = Section  # every recipe section: unknown keys and booleans-for-numbers are errors


class OptimConfig(_Section):
    """The optimizer and its hyper-parameters."""

    name: Literal["sgd", "nesterov", "adamw"] = Field(
        "sgd", description="sgd (with momentum), nesterov (the paper's NAG) or adamw"
    )
    lr: float = Field(0.1, gt=0.0, description="peak learning rate (after warmup; before linear_scaling)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="momentum of sgd/nesterov, 0 <= x < 1")
    weight_decay: float = Field(1e-4, ge=0.0, description="L2 weight decay (decoupled for adamw)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw's (beta1, beta2)")
    linear_scaling: bool = Field(
        False,
        description="lr = lr * batch_size / 256 (the paper's rule; under torchrun the batch is times the processes)",
    )


class ProgressiveResizeConfig(_Section):
    """Progressive resizing (fast.ai; FixRes, Touvron et al. 2019): low resolution first, the test resolution last."""

    start: int = Field(96, ge=8, description="the first epoch's image size, in pixels")
    end: Optional[int] = Field(
        None, ge=8, description="the last epochs' image size, in pixels; null: data.image_size (the test resolution)"
    )
    final_epochs: int = Field(1, ge=0, description="epochs at `end` after the ramp")
    scale_batch: bool = Field(
        True, description="batch x (end/size)^2 at smaller sizes (memory stays flat), with the lr scaled with it"
    )
    multiple: int = Field(16, ge=1, description="ramp sizes are rounded down to a multiple of this, in pixels")


class ScheduleConfig(_Section):
    """The learning-rate schedule (per iteration): linear warmup, then cosine, step or constant."""

    name: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="the schedule after warmup: cosine decay, step decay at milestones, or constant"
    )
    warmup_epochs: float = Field(
        0.0, ge=0.0, description="epochs of linear warmup (fractions allowed); must be less than train.epochs; 0: none"
    )
    warmup_lr_init: float = Field(0.0, ge=0.0, description="the learning rate warmup starts from")
    milestones: list[float] = Field(
        default_factory=lambda: [30, 60, 90], description="step: the epochs at which the lr is multiplied by gamma"
    )
    gamma: float = Field(0.1, gt=0.0, description="step: the lr factor at each milestone")
    min_lr: float = Field(0.0, ge=0.0, description="cosine: the lr at the end of training")
    progressive_resize: Optional[ProgressiveResizeConfig] = Field(
        None, description="low resolution first, the test resolution last; null: off"
    )


class CacheFrozenConfig(_Section):
    """Train on cached features of the frozen early stages (model.freeze); see medtricks.train.frozen_cache."""

    views: int = Field(
        2, ge=1, description="augmented views per training image, drawn once; epoch e uses view e mod views"
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="precision of the cached features")


class TrainConfig(_Section):
    """The training loop: epochs, batch, precision, device, checkpoint selection, progress."""

    epochs: int = Field(10, ge=1, description="training epochs")
    batch_size: int = Field(32, ge=1, description="images per batch (per process under torchrun)")
    amp: Literal["none", "auto", "fp16", "bf16"] = Field(
        "none", description="mixed precision: auto (bf16/fp16 on CUDA, off elsewhere), fp16 (CUDA only), bf16 or none"
    )
    channels_last: bool = Field(False, description="channels-last memory format (faster convolutions on some hardware)")
    device: str = Field("auto", description="auto, cpu, mps, cuda or cuda:N")
    grad_clip: Optional[float] = Field(None, gt=0.0, description="clip the gradient norm to this; null: off")
    accumulate: int = Field(1, ge=1, description="batches whose gradients are summed per optimizer step")
    max_steps_per_epoch: Optional[int] = Field(
        None, ge=1, description="cap on optimizer steps per epoch (quick tries); null: the whole training split"
    )
    best_metric: str = Field(
        DEFAULT_METRIC,
        description="the validation metric that picks the best checkpoint (best.pt), e.g. val/auroc or val/loss",
    )
    best_mode: Literal["max", "min"] = Field(
        "max", description="whether best_metric is better higher (max) or lower (min)"
    )
    best_tiebreak: Optional[str] = Field(
        "val/loss",
        description="epochs whose best_metric ties (e.g. val AUROC "
        "1.000 twice) are told apart by this metric; null: the earlier stays best",
    )
    best_tiebreak_mode: Literal["max", "min"] = Field(
        "min", description="whether best_tiebreak is better higher (max) or lower (min)"
    )
    log_every: int = Field(10, ge=1, description="log train/loss and lr every this many optimizer steps")
    progress: bool = Field(True, description="show progress bars")
    sync_bn: bool = Field(
        False, description="torchrun: BatchNorm statistics over the global batch (CUDA only); no effect in one process"
    )
    cache_frozen: Optional[CacheFrozenConfig] = Field(
        None, description="train on cached features of the frozen early stages (needs model.freeze); null: off"
    )
    # on a CPU torch.compile's compile time outweighs the gain in a run of a few hundred updates
    # (benchmarks/cpu_paths.py)
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile for the training forward: "
        "auto (CUDA only), on or off; a failure falls back to eager with "
        "a warning",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "mps") and not value.startswith("cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu', 'mps' or 'cuda[:N]', got {value!r}")
        return value
