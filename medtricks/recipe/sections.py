"""The recipe's sections: one pydantic model per section, each key with its type, default, bounds and meaning.

The ``description`` of every field is what the generated recipe reference (docs/gen_pages.py) shows as the
key's meaning, so it says what the key does, its unit, and its allowed values where the type does not. The
``tricks:`` section is not here: each trick owns its keys (medtricks/tricks/), and :class:`~medtricks.recipe.
Recipe` assembles them from the trick registry.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from medtricks._defaults import DEFAULT_METRIC
from medtricks._schema import Section
from medtricks.audit.attack_names import check_attack_name
from medtricks.data.transforms import PRESETS as AUGMENT_PRESETS
from medtricks.errors import ConfigError
from medtricks.models.weights import WEIGHT_NAMES

__all__ = [
    "SEED_LIMIT",
    "RUN_WEIGHTS_PREFIX",
    "check_run_name",
    "check_weights_spec",
    "ExperimentConfig",
    "SynthConfig",
    "UnlabeledConfig",
    "DataConfig",
    "ResizerConfig",
    "VitConfig",
    "ModelConfig",
    "OptimConfig",
    "ProgressiveResizeConfig",
    "ScheduleConfig",
    "CacheFrozenConfig",
    "TrainConfig",
    "EvalConfig",
    "TrackingConfig",
    "AuditConfig",
    "AblationConfig",
]

_Section = Section  # every recipe section: unknown keys and booleans-for-numbers are errors
#: Seeds (experiment.seed, data.split_seed, data.synth.seed, ablation.seeds) are 0 <= seed < 2**32: numpy's
#: legacy seeding and scikit-learn's random_state take no more, and default_rng refuses negatives.
SEED_LIMIT = 2**32
#: ``model.weights: run:<run folder or run id>``: start from a finished medtricks run (medtricks/chained.py).
RUN_WEIGHTS_PREFIX = "run:"


def check_run_name(value: str, key: str = "experiment.name") -> str:
    """``value`` if it can name one folder inside ``experiment.output_dir``; else a ConfigError naming ``key``.

    Refused: an empty name, path separators (``/``, ``\\``), ``.``/``..`` and other names starting with ``.``
    (hidden folders, which the run-store search skips), a drive (``C:``) and control characters."""
    reason = None
    if not value.strip():
        reason = "it is empty"
    elif "/" in value or "\\" in value:
        reason = "it holds a path separator"
    elif value.startswith("."):
        reason = "it starts with '.' ('..' leaves the output folder; '.name' is a hidden folder)"
    elif ":" in value[:2] or any(ord(c) < 32 for c in value):
        reason = "it holds a drive or a control character"
    if reason:
        raise ConfigError(
            f"{key}={value!r} cannot name a run folder: {reason}. The run folder is "
            f"<experiment.output_dir>/<{key}>/...; use a plain name such as 'quickstart' "
            "(put folders in experiment.output_dir)"
        )
    return value


def check_weights_spec(value: str, key: str = "model.weights") -> str:
    """``value`` if it names a weights source; else a ConfigError naming ``key`` and the accepted forms.

    Accepted: ``none``, a zoo name (``imagenet``, ``sin``, ``sin_in``, ``sin_in_in``),
    ``file:/path/ckpt.pth[#sha256=HEX]`` and ``run:<run folder or run id>``. Whether the file or run
    exists is checked when the model is built (a stored run's recipe must load on any machine)."""
    if value == "none" or value in WEIGHT_NAMES:
        return value
    for prefix, what in (
        ("file:", "a checkpoint path: file:/path/ckpt.pth[#sha256=HEX]"),
        (RUN_WEIGHTS_PREFIX, "a finished run: run:<run folder> or run:<run id>"),
    ):
        if value.startswith(prefix):
            if not value[len(prefix) :].partition("#")[0].strip():
                raise ConfigError(f"{key}={value!r} names nothing after {prefix!r}; expected {what}")
            return value
    close = difflib.get_close_matches(value, ["none", *WEIGHT_NAMES], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"unknown {key} {value!r}{hint}; expected 'none', one of {', '.join(WEIGHT_NAMES)}, "
        f"'file:/path/to/checkpoint.pth[#sha256=HEX]' or '{RUN_WEIGHTS_PREFIX}<run folder or run id>'"
    )


# ------------------------------------------------------------------------------- what, on what data
class ExperimentConfig(_Section):
    """What the run is called, where its folder goes, and the seed of everything random in training."""

    name: str = Field(
        "medtricks",
        description="the experiment's name: the run folder is "
        "`<output_dir>/<name>/<stamp>-<id>` and the MLflow experiment unless tracking.experiment is "
        "set; one plain folder name (no '/', not starting with '.')",
    )
    description: str = Field("", description="free text describing the experiment, logged with the recipe")
    seed: int = Field(
        0,
        ge=0,
        lt=SEED_LIMIT,
        description="seed of weight initialisation, data order and "
        "augmentation, 0 <= seed < 2**32 (an ablation sets it per child run)",
    )
    output_dir: str = Field("runs", description="folder that holds the run folders, relative to the working directory")
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="extra tags of the run, {name: value} (MLflow tags; not part of the run's identity)",
    )
    plugins: list[str] = Field(
        default_factory=list,
        description="trick plug-ins imported before the recipe is "
        "validated: module names or .py paths; imported only with --allow-plugins, never "
        "from a stored run (medtricks/tricks/registry.py)",
    )

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, value: str) -> str:
        # The run folder is <output_dir>/<name>/<stamp>-<id>: a name must stay one folder inside output_dir.
        return check_run_name(value, "experiment.name")


class SynthConfig(_Section):
    """``data.synth``: synthetic phantom chest X-rays generated into ``data.root`` when it holds none (the
    ``synthetic-phantoms`` card only; no download). A folder generated with other settings is an error."""

    n: int = Field(300, ge=6, description="number of images generated")
    size: int = Field(64, ge=16, description="side of the square images, in pixels")
    seed: int = Field(
        0,
        ge=0,
        lt=SEED_LIMIT,
        description="seed of the generator (the same seed gives the same images), 0 <= seed < 2**32",
    )
    format: Literal["png", "dicom"] = Field("png", description="file format of the generated images")


class UnlabeledConfig(_Section):
    """``data.unlabeled``: a folder of images without labels (issue 17). Without ``card``: every image file
    under ``root``; with a card: the files that card lists under ``root`` (their labels ignored)."""

    root: str = Field(description="folder of the unlabelled images")
    card: Optional[str] = Field(
        None,
        description="a data card that lists the files under root (their labels "
        "are ignored); null: every image file under root",
    )


class DataConfig(_Section):
    """Which images train and test the model: the data card and folder, the split, image size, augmentation."""

    card: str = Field(
        "synthetic-phantoms",
        description="the data card: the name of a shipped card (data_cards/) "
        "or a path to a card YAML; it says how to read labels, patients and splits",
    )
    root: str = Field(
        "data/phantoms", description="folder of the data set the card reads, relative to the working directory"
    )
    synth: Optional[SynthConfig] = Field(
        None,
        description="generate synthetic phantoms into root (the "
        "synthetic-phantoms card only); null: read what is there",
    )
    image_size: int = Field(
        224,
        ge=8,
        description="side of the square images the model sees, in pixels (the "
        "resizer's output size when model.resizer is on)",
    )
    augment: Literal[AUGMENT_PRESETS] = Field(
        "cxr_light", description="training augmentation preset (medtricks/data/transforms.py); none: resize only"
    )
    split_seed: int = Field(
        0,
        ge=0,
        lt=SEED_LIMIT,
        description="seed of the patient-level train/val/test split, "
        "0 <= seed < 2**32 (kept fixed across an ablation's seeds unless ablation.resplit)",
    )
    val_fraction: float = Field(
        0.15, gt=0.0, lt=1.0, description="share of patients held out for validation (model selection), 0 < x < 1"
    )
    test_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of patients held out from training and "
        "model selection, 0 <= x < 1; a test folder the card declares wins over it",
    )
    test_by: Literal["random", "id_order"] = Field(
        "random",
        description="how the test patients are drawn: random, or id_order (the earliest patient IDs of each series)",
    )
    on_bad_image: Literal["error", "skip"] = Field(
        "error",
        description="an image that cannot be read: error (list them and stop), or skip (quarantine and report them)",
    )
    cache_dir: Optional[str] = Field(
        None,
        description="folder for decoded, resized images reused by later runs (keyed by file content); null: no cache",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes; 0: load in the training process")
    # Few labels (issue 17): the rest of the training split, and data.unlabeled, form the unlabelled pool.
    label_fraction: Optional[float] = Field(
        None,
        gt=0.0,
        le=1.0,
        description="keep this share of the training "
        "split labelled (stratified, patient-level, drawn with split_seed), "
        "0 < x <= 1; the rest is unlabelled; null: all labelled",
    )
    label_count: Optional[int] = Field(
        None,
        ge=1,
        description="keep this many training images labelled (like label_fraction, as a number; set one of the two)",
    )
    unlabeled: Optional[UnlabeledConfig] = Field(
        None,
        description="a folder of unlabelled images added to the unlabelled pool (pseudo-labels, FixMatch); null: none",
    )

    @model_validator(mode="after")
    def _one_label_knob(self) -> "DataConfig":
        if self.label_fraction is not None and self.label_count is not None:
            raise ValueError(
                f"data.label_fraction={self.label_fraction} and data.label_count={self.label_count}: "
                "set one of them (a share of the training images, or a number of images)"
            )
        return self


# ------------------------------------------------------------------------------------------ model
class ResizerConfig(_Section):
    """``model.resizer``: a learnable resizer in front of the backbone (Talebi & Milanfar, ICCV 2021): images
    load at ``input_size`` and the resizer learns to bring them to ``output_size``."""

    enabled: bool = Field(False, description="put the learnable resizer in front of the backbone")
    input_size: int = Field(448, ge=8, description="side of the images loaded for the resizer, in pixels")
    output_size: int = Field(224, ge=8, description="side of the resizer's output (the backbone's input), in pixels")
    n_filters: int = Field(16, ge=1, description="channels of the resizer's convolutions")
    n_res_blocks: int = Field(1, ge=0, description="residual blocks in the resizer's body (0 allowed)")
    attention: Optional[Literal["cbam"]] = Field(
        None, description="cbam: CBAM attention in each residual block; null: none"
    )
    interpolation: Literal["bilinear", "bicubic", "nearest", "area"] = Field(
        "bilinear", description="the resizer's skip-path interpolation (bilinear/bicubic are anti-aliased)"
    )
    lr_mult: float = Field(1.0, gt=0.0, description="the resizer's learning rate as a multiple of optim.lr")


class VitConfig(_Section):
    """``model.vit``: locality for a timm ViT/DeiT trained on little data (Lee, Lee & Song 2021, "Vision Transformer
    for Small-Size Datasets"; docs/vit-small-data.md). Other models are refused when the model is built."""

    spt: bool = Field(
        False,
        description="Shifted Patch Tokenization: patches of the image and of 4 half-patch "
        "diagonal shifts (model.weights: none)",
    )
    lsa: bool = Field(
        False,
        description="Locality Self-Attention: a learnable softmax temperature and no attention of a token to itself",
    )


class ModelConfig(_Section):
    """The network: a timm backbone, its starting weights, input channels, what is frozen, and options."""

    name: str = Field(
        "resnet18",
        description="the backbone: a timm model name (timm:NAME for timm's own "
        "when an alias shadows it), an alias such as efficientnet_lite0, or monai:NAME",
    )
    weights: str = Field(
        "none",
        description="starting weights: none (random), a zoo name (imagenet, sin, sin_in, "
        "sin_in_in), `file:/path/ckpt.pth[#sha256=HEX]`, or `run:<run folder or run id>`",
    )
    in_chans: Literal[1, 3] = Field(
        1, description="input channels: 1 (grey X-rays; RGB weights are summed into one channel) or 3"
    )
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier, 0 <= p < 1")
    freeze: Optional[Union[str, list[Union[int, str]]]] = Field(
        None,
        description="what is not trained: none, stem, all_but_head, or a list of stage indices / module-name "
        "patterns (fnmatch); frozen BatchNorm layers keep their statistics; null: nothing",
    )
    layer_decay: Optional[float] = Field(
        None,
        gt=0.0,
        le=1.0,
        description="layer-wise LR decay: stage s of S trains at lr * layer_decay**(S - s), 0 < x <= 1; null: off",
    )
    resizer: ResizerConfig = Field(default_factory=ResizerConfig, description="the learnable resizer")
    vit: VitConfig = Field(default_factory=VitConfig, description="locality options for a ViT/DeiT backbone")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments for timm's create_model (e.g. drop_path_rate)"
    )

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("run", "file"):
            # `--set model.weights=run:` or `weights: run: x` reads as a YAML mapping
            raise ConfigError(
                f"model.weights={value!r} was read as a mapping: write it as one string, "
                f"{next(iter(value))}:<...> with no space after the colon (quote it if needed)"
            )
        return check_weights_spec(value) if isinstance(value, str) else value


# ---------------------------------------------------------------------------- optimisation, training
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


# ------------------------------------------------------------------------- evaluation, tracking, audit
class EvalConfig(_Section):
    """The final evaluation of the best checkpoint: intervals, plots, the decision threshold."""

    n_bootstrap: int = Field(
        1000, ge=0, description="bootstrap resamples for the metrics' confidence intervals; 0: no intervals"
    )
    ci: float = Field(0.95, gt=0.0, lt=1.0, description="confidence level of every interval, 0 < x < 1")
    plots: bool = Field(True, description="log the plots (confusion matrix, ROC, reliability, LR schedule)")
    threshold: Literal["youden", "sensitivity", "none"] = Field(
        "youden",
        description="binary models: the decision threshold chosen on validation and stored with the "
        "model: youden (max sensitivity + specificity - 1), sensitivity (reach target_sensitivity) or none (the "
        "arg-max class)",
    )
    target_sensitivity: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="threshold: sensitivity: the sensitivity to reach on validation, 0 < x <= 1"
    )

    @model_validator(mode="after")
    def _target_needs_method(self) -> "EvalConfig":
        if self.threshold == "sensitivity" and self.target_sensitivity is None:
            raise ConfigError("eval.threshold is 'sensitivity' but eval.target_sensitivity is not set (e.g. 0.95)")
        return self


class TrackingConfig(_Section):
    """Where the run is logged: MLflow, or a local run store inside the run folders."""

    backend: Literal["mlflow", "none"] = Field(
        "mlflow", description="mlflow, or none (a local run store of plain files in each run folder)"
    )
    uri: Optional[str] = Field(
        None, description="MLflow tracking URI; null: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`"
    )
    experiment: Optional[str] = Field(None, description="MLflow experiment; null: experiment.name")
    run_name: Optional[str] = Field(None, description="MLflow run name; null: experiment.name and a short id")
    log_model: bool = Field(
        True, description="log the trained model (model/ and the servable mlflow_model/) as artifacts"
    )


class AuditConfig(_Section):
    """Audits of the best checkpoint on the validation split after training: adversarial attacks, image
    corruptions, and the shortcut audit."""

    enabled: bool = Field(False, description="run the robustness audit (attacks and corruptions) after training")
    attacks: list[str] = Field(
        default_factory=lambda: ["fgsm", "pgd_linf"],
        description="attacks: any of fgsm, "
        "pgd_linf, pgd_l2, apgd_ce, apgd_square, square, transfer (transfer needs surrogate)",
    )
    eps: list[float] = Field(
        default_factory=lambda: [0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255],
        description="attack budgets, in units of the [0, 1] pixel range (1/255 = one grey level)",
    )
    pgd_steps: int = Field(10, ge=1, description="iterations of the PGD attacks")
    corruptions: list[str] = Field(
        default_factory=lambda: ["all"], description="image corruptions: all, or names from medtricks.audit.corruptions"
    )
    severities: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5],
        description="corruption severities, distinct integers 0..5 (0: the clean image)",
    )
    n: int = Field(500, ge=1, description="validation images audited")
    surrogate: Optional[str] = Field(
        None, description="transfer attack: the run (folder or id) whose model crafts the attacks"
    )
    target_class: Optional[Union[int, str]] = Field(
        None, description="a class name or index: targeted attacks toward it; null: untargeted"
    )
    n_bootstrap: int = Field(200, ge=0, description="bootstrap resamples for the audit's intervals; 0: none")
    square_queries: int = Field(1000, ge=1, description="the Square attack's query budget (standard AutoAttack: 5000)")
    masking_checks: bool = Field(True, description="gradient-masking checks when pgd_linf (untargeted) runs")
    shortcut: bool = Field(
        False, description="run the shortcut audit (lungs hidden / lungs only, border, Grad-CAM) after training"
    )
    shortcut_border: float = Field(
        0.08, gt=0.0, lt=0.5, description="shortcut audit: width of the blanked frame, as a fraction of the image side"
    )

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, value):
        return [check_attack_name(name) for name in value]  # a typo or a renamed attack fails before training


class AblationConfig(_Section):
    """``medtricks ablate``: the tricks to compare, the seeds, the table's metric and where the children train.
    The command line's options win over these keys; ``medtricks run`` ignores the section."""

    tricks: list[str] = Field(
        default_factory=list,
        description="trick specs to ablate, e.g. [warmup, "
        "bn_gamma=zero_late] (the ablate names in the recipe reference's tricks table)",
    )
    seeds: Union[int, list[int]] = Field(
        5, description="seeds per variant: a count (experiment.seed, +1, ...) or a list of distinct seeds"
    )
    mode: Literal["cumulative", "one_at_a_time", "grid"] = Field(
        "cumulative",
        description="cumulative (add the tricks one by one), one_at_a_time (each alone on the base) "
        "or grid (every combination)",
    )
    metric: str = Field(
        DEFAULT_METRIC, description="the table's metric, `val/<name>` or `test/<name>` (the best checkpoint's value)"
    )
    jobs: int = Field(1, ge=1, description="children trained at once by the local executor")
    test: Literal["t", "wilcoxon"] = Field("t", description="the seed-level paired test vs the baseline")
    # so the intervals cover which patients land in the test split, not only the training noise
    resplit: bool = Field(
        False,
        description="repeated hold-out: each seed also draws its own patient-level split (data.split_seed = seed)",
    )
    # Where the children train (medtricks/ablation/executors.py): not part of what is trained.
    executor: Literal["local", "ray"] = Field(
        "local", description="where the children train: local (this machine) or ray (one Ray task each)"
    )
    address: Optional[str] = Field(
        None,
        description="ray: null starts a local Ray, auto joins this machine's "
        "cluster, `ray://host:10001` connects a client",
    )
    cpus_per_run: float = Field(1.0, ge=0, description="ray: CPUs (and torch threads) per child")
    gpus_per_run: float = Field(0.0, ge=0, description="ray: GPUs per child (fractions share a GPU)")
    retries: int = Field(
        2, ge=0, description="ray: restarts of a child whose worker died (it resumes from its checkpoint)"
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if isinstance(value, int) and value < 1:
            raise ConfigError("ablation.seeds must be >= 1 (a count) or a list of seeds")
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ConfigError("ablation.seeds as a list must be non-empty and without repeats")
        if isinstance(value, list) and any(not 0 <= seed < SEED_LIMIT for seed in value):
            raise ConfigError(f"ablation.seeds: every seed must be 0 <= seed < 2**32 ({SEED_LIMIT}), got {value}")
        return value
