"""Recipes: the whole experiment in one validated, resolved YAML document.

A recipe is YAML with the sections below. ``base: other.yaml`` inherits from another recipe (path
relative to the recipe file, deep-merged, chains allowed) and ``--set a.b=c`` overrides any key
after inheritance, with the value parsed as YAML (``0.05`` → float, ``true`` → bool, ``[1, 2]`` →
list, ``null`` → None). The resolved :class:`Recipe` is the single source of truth of a run: every
knob the run uses is in it, and it is logged to MLflow.

Example::

    from medtricks.recipe import load_recipe
    recipe = load_recipe("recipes/quickstart.yaml", overrides=["optim.lr=0.05"])
    print(recipe.optim.lr)
"""
from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from medtricks._yaml import cap_text, read_yaml_text, short_repr, strict_load
from medtricks._shipped import shipped_dir
from medtricks._schema import Section
from medtricks.errors import ConfigError, MedtricksError
from medtricks.audit.attack_names import check_attack_name
from medtricks.data.transforms import PRESETS as AUGMENT_PRESETS
from medtricks.models.weights import WEIGHT_NAMES
from medtricks.tricks.bn_gamma import BnGammaConfig, GammaRuleConfig  # noqa: F401 - re-exported
from medtricks.tricks.registry import ignoring_recipe_plugins, load_recipe_plugins, trick_tags, tricks_config_model

__all__ = [
    "Recipe",
    "RecipeError",
    "load_run_recipe",
    "load_recipe",
    "recipe_from_dict",
    "resolve_recipe_dict",
    "apply_overrides",
    "flatten_recipe",
    "dump_recipe",
    "recipe_digest",
    "check_weights_spec",
    "RUN_WEIGHTS_PREFIX",
]


class RecipeError(MedtricksError, ValueError):
    """A recipe that cannot be loaded: names the file, the key and what was expected."""


_Section = Section  # every recipe section: unknown keys and booleans-for-numbers are errors
#: Seeds (experiment.seed, data.split_seed, data.synth.seed, ablation.seeds) are 0 <= seed < 2**32: numpy's
#: legacy seeding and scikit-learn's random_state take no more, and default_rng refuses negatives.
SEED_LIMIT = 2**32


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
        raise ConfigError(f"{key}={value!r} cannot name a run folder: {reason}. The run folder is "
                          f"<experiment.output_dir>/<{key}>/...; use a plain name such as 'quickstart' "
                          "(put folders in experiment.output_dir)")
    return value


# --------------------------------------------------------------------------------------- sections
class ExperimentConfig(_Section):
    name: str = "medtricks"
    description: str = ""
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    output_dir: str = "runs"
    tags: dict[str, str] = Field(default_factory=dict)
    # Trick plug-ins imported before the recipe is validated: module names or .py paths (tricks/registry.py).
    plugins: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, value: str) -> str:
        # The run folder is <output_dir>/<name>/<stamp>-<id>: a name must stay one folder inside output_dir.
        return check_run_name(value, "experiment.name")


class SynthConfig(_Section):
    n: int = Field(300, ge=6)
    size: int = Field(64, ge=16)
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    format: Literal["png", "dicom"] = "png"


class UnlabeledConfig(_Section):
    """``data.unlabeled``: a folder of images without labels (issue 17). Without ``card``: every image file
    under ``root``; with a card: the files that card lists under ``root`` (their labels ignored)."""

    root: str
    card: Optional[str] = None


class DataConfig(_Section):
    card: str = "synthetic-phantoms"
    root: str = "data/phantoms"
    synth: Optional[SynthConfig] = None
    image_size: int = Field(224, ge=8)
    augment: Literal[AUGMENT_PRESETS] = "cxr_light"  # medtricks.data.transforms
    split_seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    # Held out from training *and* model selection; a test folder the card declares wins over it.
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    test_by: Literal["random", "id_order"] = "random"  # id_order: earliest patient IDs per series
    on_bad_image: Literal["error", "skip"] = "error"
    cache_dir: Optional[str] = None
    num_workers: int = Field(0, ge=0)
    # Few labels (issue 17): keep a stratified, patient-level share (or number of images) of the training
    # split labelled (chosen with split_seed); the rest, and data.unlabeled, form the unlabelled pool.
    label_fraction: Optional[float] = Field(None, gt=0.0, le=1.0)
    label_count: Optional[int] = Field(None, ge=1)
    unlabeled: Optional[UnlabeledConfig] = None

    @model_validator(mode="after")
    def _one_label_knob(self) -> "DataConfig":
        if self.label_fraction is not None and self.label_count is not None:
            raise ValueError(f"data.label_fraction={self.label_fraction} and data.label_count={self.label_count}: "
                             "set one of them (a share of the training images, or a number of images)")
        return self


class ResizerConfig(_Section):
    enabled: bool = False
    input_size: int = Field(448, ge=8)
    output_size: int = Field(224, ge=8)
    n_filters: int = Field(16, ge=1)
    n_res_blocks: int = Field(1, ge=0)
    attention: Optional[Literal["cbam"]] = None
    interpolation: Literal["bilinear", "bicubic", "nearest", "area"] = "bilinear"
    lr_mult: float = Field(1.0, gt=0.0)


class VitConfig(_Section):
    """``model.vit``: locality for a timm ViT/DeiT trained on little data (Lee, Lee & Song 2021, "Vision Transformer
    for Small-Size Datasets"; docs/vit-small-data.md). Other models are refused when the model is built."""

    spt: bool = False  # Shifted Patch Tokenization: patches of the image + 4 half-patch diagonal shifts (weights: none)
    lsa: bool = False  # Locality Self-Attention: learnable softmax temperature, no attention of a token to itself


#: ``model.weights: run:<run folder or run id>``: start from a finished medtricks run (medtricks/chained.py).
RUN_WEIGHTS_PREFIX = "run:"


def check_weights_spec(value: str, key: str = "model.weights") -> str:
    """``value`` if it names a weights source; else a ConfigError naming ``key`` and the accepted forms.

    Accepted: ``none``, a zoo name (``imagenet``, ``sin``, ``sin_in``, ``sin_in_in``),
    ``file:/path/ckpt.pth[#sha256=HEX]`` and ``run:<run folder or run id>``. Whether the file or run
    exists is checked when the model is built (a stored run's recipe must load on any machine)."""
    if value == "none" or value in WEIGHT_NAMES:
        return value
    for prefix, what in (("file:", "a checkpoint path: file:/path/ckpt.pth[#sha256=HEX]"),
                         (RUN_WEIGHTS_PREFIX, "a finished run: run:<run folder> or run:<run id>")):
        if value.startswith(prefix):
            if not value[len(prefix):].partition("#")[0].strip():
                raise ConfigError(f"{key}={value!r} names nothing after {prefix!r}; expected {what}")
            return value
    close = difflib.get_close_matches(value, ["none", *WEIGHT_NAMES], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown {key} {value!r}{hint}; expected 'none', one of {', '.join(WEIGHT_NAMES)}, "
                      f"'file:/path/to/checkpoint.pth[#sha256=HEX]' or '{RUN_WEIGHTS_PREFIX}<run folder or run id>'")


class ModelConfig(_Section):
    name: str = "resnet18"
    weights: str = "none"
    in_chans: Literal[1, 3] = 1
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    freeze: Optional[Union[str, list[Union[int, str]]]] = None
    layer_decay: Optional[float] = Field(None, gt=0.0, le=1.0)
    resizer: ResizerConfig = Field(default_factory=ResizerConfig)
    vit: VitConfig = Field(default_factory=VitConfig)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("run", "file"):
            # `--set model.weights=run:` or `weights: run: x` reads as a YAML mapping
            raise ConfigError(f"model.weights={value!r} was read as a mapping: write it as one string, "
                              f"{next(iter(value))}:<...> with no space after the colon (quote it if needed)")
        return check_weights_spec(value) if isinstance(value, str) else value


class OptimConfig(_Section):
    name: Literal["sgd", "nesterov", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    linear_scaling: bool = False  # lr = lr * batch_size / 256 (the paper's rule; torchrun: x the processes)


class ProgressiveResizeConfig(_Section):
    """Progressive resizing (fast.ai; FixRes, Touvron et al. 2019): low resolution first, the test resolution last."""
    start: int = Field(96, ge=8)  # the first epoch's image size
    end: Optional[int] = Field(None, ge=8)  # the last epochs' size; null = data.image_size (the test resolution)
    final_epochs: int = Field(1, ge=0)  # epochs at `end` after the ramp
    scale_batch: bool = True  # batch x (end/size)^2 at smaller sizes (memory stays flat), lr scaled with it
    multiple: int = Field(16, ge=1)  # ramp sizes rounded down to a multiple of this


class ScheduleConfig(_Section):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    warmup_lr_init: float = Field(0.0, ge=0.0)
    milestones: list[float] = Field(default_factory=lambda: [30, 60, 90])  # epochs
    gamma: float = Field(0.1, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    progressive_resize: Optional[ProgressiveResizeConfig] = None  # low resolution first, the test resolution last


class CacheFrozenConfig(_Section):
    """Train on cached features of the frozen early stages (model.freeze); see medtricks.train.frozen_cache."""
    views: int = Field(2, ge=1)  # augmented views per training image, drawn once, epoch e uses view e mod views
    dtype: Literal["float16", "float32"] = "float16"


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # per process under torchrun
    amp: Literal["none", "auto", "fp16", "bf16"] = "none"
    channels_last: bool = False
    device: str = "auto"
    grad_clip: Optional[float] = Field(None, gt=0.0)
    accumulate: int = Field(1, ge=1)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1)
    best_metric: str = "val/auroc"
    best_mode: Literal["max", "min"] = "max"
    # Epochs whose best_metric ties (e.g. val AUROC 1.000 twice) are told apart by this metric (null: the
    # earlier epoch stays best).
    best_tiebreak: Optional[str] = "val/loss"
    best_tiebreak_mode: Literal["max", "min"] = "min"
    log_every: int = Field(10, ge=1)
    progress: bool = True
    # torchrun (several processes): BatchNorm statistics over the global batch (CUDA only); no effect in one process
    sync_bn: bool = False
    cache_frozen: Optional[CacheFrozenConfig] = None  # train on cached features of the frozen early stages
    # torch.compile for the training forward: auto = on CUDA only (on a CPU its compile time outweighs the gain
    # in a run of a few hundred updates: benchmarks/cpu_paths.py); a failure falls back to eager with a warning
    compile: Literal["auto", "on", "off"] = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "mps") and not value.startswith("cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu', 'mps' or 'cuda[:N]', got {value!r}")
        return value


class EvalConfig(_Section):
    n_bootstrap: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0.0, lt=1.0)
    plots: bool = True
    # Binary models: the decision threshold chosen on validation and stored with the model.
    threshold: Literal["youden", "sensitivity", "none"] = "youden"
    target_sensitivity: Optional[float] = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _target_needs_method(self) -> "EvalConfig":
        if self.threshold == "sensitivity" and self.target_sensitivity is None:
            raise ConfigError("eval.threshold is 'sensitivity' but eval.target_sensitivity is not set (e.g. 0.95)")
        return self


class TrackingConfig(_Section):
    backend: Literal["mlflow", "none"] = "mlflow"
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: Optional[str] = None  # default: experiment.name
    run_name: Optional[str] = None  # default: experiment.name + short id
    log_model: bool = True


class AuditConfig(_Section):
    enabled: bool = False
    attacks: list[str] = Field(default_factory=lambda: ["fgsm", "pgd_linf"])
    eps: list[float] = Field(default_factory=lambda: [0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255])
    pgd_steps: int = Field(10, ge=1)
    corruptions: list[str] = Field(default_factory=lambda: ["all"])
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    n: int = Field(500, ge=1)
    surrogate: Optional[str] = None
    target_class: Optional[Union[int, str]] = None  # None = untargeted; a class name/index = targeted
    n_bootstrap: int = Field(200, ge=0)
    square_queries: int = Field(1000, ge=1)  # Square's query budget (standard AutoAttack: 5000)
    masking_checks: bool = True  # gradient-masking checks when pgd_linf (untargeted) runs
    shortcut: bool = False  # the shortcut audit (lungs hidden/only, border, Grad-CAM) after training
    shortcut_border: float = Field(0.08, gt=0.0, lt=0.5)  # width of the blanked frame, fraction of the side

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, value):
        return [check_attack_name(name) for name in value]  # a typo or a renamed attack fails before training


class AblationConfig(_Section):
    tricks: list[str] = Field(default_factory=list)
    seeds: Union[int, list[int]] = 5
    mode: Literal["cumulative", "one_at_a_time", "grid"] = "cumulative"
    metric: str = "val/auroc"
    jobs: int = Field(1, ge=1)
    test: Literal["t", "wilcoxon"] = "t"
    # Repeated hold-out for small sets: each seed also draws its own patient-level split (data.split_seed = seed),
    # so the intervals cover which patients land in the test split, not only the training noise.
    resplit: bool = False
    # Where the children train (medtricks/ablation/executors.py): not part of what is trained.
    executor: Literal["local", "ray"] = "local"
    address: Optional[str] = None
    cpus_per_run: float = Field(1.0, ge=0)
    gpus_per_run: float = Field(0.0, ge=0)
    retries: int = Field(2, ge=0)

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


class Recipe(_Section):
    """A fully resolved experiment: every knob a run uses."""

    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    # Assembled from the trick registry: every registered trick's keys (medtricks/tricks/).
    tricks: Any = Field(default_factory=lambda: tricks_config_model()())
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    ablation: AblationConfig = Field(default_factory=AblationConfig)

    @model_validator(mode="before")
    @classmethod
    def _load_plugins(cls, data: Any) -> Any:
        # Plug-ins first: their tricks add keys to the `tricks:` section validated next.
        experiment = data.get("experiment") if isinstance(data, dict) else None
        if isinstance(experiment, dict) and experiment.get("plugins"):
            load_recipe_plugins(experiment["plugins"])  # only with the user's opt-in
        return data

    @field_validator("tricks", mode="before")
    @classmethod
    def _tricks(cls, value: Any) -> Any:
        model = tricks_config_model()
        if isinstance(value, model):
            return value
        if isinstance(value, BaseModel):  # a section built before a plug-in registered
            value = value.model_dump()
        return model.model_validate({} if value is None else value)

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.schedule.warmup_epochs >= self.train.epochs:
            raise ValueError(f"schedule.warmup_epochs={self.schedule.warmup_epochs:g} must be less than "
                             f"train.epochs={self.train.epochs}: the lr would never leave warmup")
        progressive = self.schedule.progressive_resize
        if progressive is not None:
            end = progressive.end or self.data.image_size
            if progressive.start > end:
                raise ValueError(f"schedule.progressive_resize.start={progressive.start} is larger than its end "
                                 f"({end}): it ramps up to the test resolution")
            if progressive.final_epochs > self.train.epochs:
                raise ValueError(f"schedule.progressive_resize.final_epochs={progressive.final_epochs} is more than "
                                 f"train.epochs={self.train.epochs}")
            if self.model.resizer.enabled:
                raise ValueError("schedule.progressive_resize and model.resizer both set the input size; use one")
        if self.train.cache_frozen is not None and not self.model.freeze:
            raise ValueError("train.cache_frozen caches the frozen early stages, but model.freeze is not set: "
                             "freeze the stem and early stages, e.g. model.freeze: [0, 1, 2, 3]")
        if self.train.cache_frozen is not None and progressive is not None:
            raise ValueError("train.cache_frozen and schedule.progressive_resize cannot be combined: "
                             "schedule.progressive_resize changes the image size every epoch, the cache holds one size")
        if self.train.cache_frozen is not None and self.model.resizer.enabled:
            raise ValueError("train.cache_frozen cannot be used with model.resizer: the resizer trains in front of "
                             "the backbone, so nothing at the front is frozen")
        return self

    def input_image_size(self) -> int:
        """The size images are loaded at: the resizer's input when it is on, else ``data.image_size``."""
        return self.model.resizer.input_size if self.model.resizer.enabled else self.data.image_size

    def tricks_on(self) -> list[str]:
        """Names of the bag-of-tricks items this recipe switches on (for tags and tables)."""
        return trick_tags(self)


# ---------------------------------------------------------------------------------- key checking
def _section_model(annotation: Any) -> Optional[type[BaseModel]]:
    """The BaseModel class inside an annotation like ``Optional[SynthConfig]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None and typing.get_origin(annotation) is not list:
            return found
    return None


# Sections whose schema comes from a registry at validation time (plug-ins can add keys).
_DYNAMIC_SECTIONS = {"tricks": tricks_config_model}


def _list_item_model(annotation: Any) -> Optional[type[BaseModel]]:
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return _section_model(item)
    for arg in typing.get_args(annotation):
        found = _list_item_model(arg)
        if found is not None:
            return found
    return None


def _check_keys(data: Any, model: type[BaseModel], where: str, source: str) -> None:
    """Raise a RecipeError for the first unknown key, naming its section and the closest key."""
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            section = where or "the top level"
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(
                f"{source}: unknown key {key!r} in section {section!r}{hint} "
                f"Valid keys: {', '.join(fields)}"
            )
        annotation = fields[key].annotation
        sub = _DYNAMIC_SECTIONS[key]() if model is Recipe and key in _DYNAMIC_SECTIONS else _section_model(annotation)
        path = f"{where}.{key}" if where else key
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, path, source)
        item = _list_item_model(annotation)
        if item is not None and isinstance(value, list):
            for i, entry in enumerate(value):
                _check_keys(entry, item, f"{path}[{i}]", source)


# ---------------------------------------------------------------------------------- load / merge
def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:  # duplicate keys and anchors/aliases are refused (medtricks/_yaml.py)
        data = strict_load(read_yaml_text(path), "recipe", name=str(path))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve_recipe_dict(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and its ``base:`` chain into one merged dict (no validation yet)."""
    path = Path(path).expanduser().resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise RecipeError(f"recipe inheritance cycle: {cycle}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for entry in bases:
        if not isinstance(entry, str):
            raise RecipeError(f"{path}: 'base' must be a file name or a list of them, got {entry!r}")
        base_path = (path.parent / entry).resolve()
        if not base_path.is_file():
            raise RecipeError(f"{path}: base recipe {entry!r} not found (looked at {base_path})")
        merged = _deep_merge(merged, resolve_recipe_dict(base_path, (*_chain, path)))
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b=c`` overrides to a recipe dict; values are parsed as YAML scalars/lists."""
    data = _deep_merge({}, data)
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.05")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise RecipeError(f"--set {item!r}: the key must be dotted section.key, e.g. optim.lr")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {item!r}: value {raw!r} is not valid YAML: {err}") from err
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is a value ({child!r}), not a section")
            node = child
        node[parts[-1]] = value
    return data


def _format_validation_error(err: ValidationError, source: str, data: dict) -> str:
    lines = [f"{source}: invalid recipe"]
    for problem in err.errors():
        loc = ".".join(str(p) for p in problem["loc"])
        value: Any = data
        for part in problem["loc"]:
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                value = problem.get("input")
                break
        msg = problem["msg"]
        if not problem["loc"]:  # a rule between sections: the message names the keys
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        lines.append(f"  {loc} = {short_repr(value)}: {cap_text(msg.removeprefix('Value error, '))}")  # values capped
    return "\n".join(lines)


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    """Validate a merged recipe dict into a :class:`Recipe` with clear error messages."""
    experiment = data.get("experiment") if isinstance(data, dict) else None
    if isinstance(experiment, dict) and experiment.get("plugins"):
        # before the key check: plug-ins add keys to `tricks:`; imported only with the user's opt-in
        load_recipe_plugins(experiment["plugins"], source)
    _check_keys(data, Recipe, "", source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, source, data)) from None


def shipped_recipes_dir() -> Path:
    """``recipes/`` of the checkout, else the copy a regular install puts in ``<prefix>/share/medtricks``."""
    return shipped_dir("recipes", Path(__file__).resolve().parents[1])


def find_recipe(path: str | Path) -> Path:
    """``path`` if it exists; a bare name such as ``quickstart`` is looked up among the shipped recipes."""
    candidate = Path(path).expanduser()
    if candidate.is_file() or candidate.parent != Path("."):
        return candidate
    shipped = shipped_recipes_dir()
    for name in (candidate.name, f"{candidate.name}.yaml"):
        if (shipped / name).is_file():
            return shipped / name
    names = sorted(p.stem for p in shipped.glob("*.yaml")) if shipped.is_dir() else []
    raise RecipeError(f"recipe file not found: {candidate} (nor a shipped recipe of that name in {shipped}; "
                      f"shipped: {', '.join(names) or 'none'})")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file, resolve its ``base:`` chain, apply ``--set`` overrides and validate.

    ``path`` may also be a shipped recipe's name (``"quickstart"``), see :func:`find_recipe`.

    Relative data paths stay relative to the working directory (where ``medtricks run`` is
    started), as users expect from a command line tool.
    """
    data = resolve_recipe_dict(find_recipe(path))
    data = apply_overrides(data, overrides)
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return recipe_from_dict(data, source)


def load_run_recipe(path: str | Path) -> Recipe:
    """A stored run's ``recipe.yaml`` (a run folder you may have received, or a tracking server's copy).

    Its ``experiment.plugins`` list is never imported, even with ``--allow-plugins``: loading a model
    must not run code that a file beside it names. Import a plug-in you trust yourself first (``import
    my_lab.tricks``; on the command line ``--plugin``).
    """
    with ignoring_recipe_plugins():
        try:
            return load_recipe(path)
        except RecipeError as err:
            try:
                listed = (yaml.safe_load(Path(path).read_text()) or {}).get("experiment", {}).get("plugins")
            except Exception:  # noqa: BLE001 - the recipe error above says what is wrong with the file
                listed = None
            if not listed:
                raise
            raise RecipeError(f"{err}\n  the run's recipe names plug-ins {listed}, which medtricks never imports from "
                              "a stored run; if you trust them, name them yourself with --plugin") from None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what ``--dry-run`` prints and what MLflow stores)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def flatten_recipe(recipe: Recipe | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten to ``{"optim.lr": 0.1, ...}`` for MLflow params (lists become strings)."""
    data = recipe.model_dump(mode="json") if isinstance(recipe, BaseModel) else recipe
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_recipe(value, name + "."))
        else:
            flat[name] = value if not isinstance(value, (list, dict)) else str(value)
    return flat


#: Bump when a schema default changes meaning (see :func:`recipe_digest`). 2: defaults left out of the id.
_DIGEST_VERSION = 2


def recipe_digest(recipe: "Recipe", *, ignore: tuple[tuple[str, ...], ...] = (), **extra: Any) -> str:
    """A short stable id of ``recipe`` without the keys in ``ignore`` (paths like ``("train", "progress")``)
    plus ``extra`` values: the same experiment gets the same id (ablation and self-training folders).

    Keys left at their schema default do not enter the id, so a medtricks release that adds a key (off by
    default) keeps every existing ablation resumable; a release that changes a default bumps
    ``_DIGEST_VERSION`` so that old and new experiments never share an id."""
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    for path in ignore:
        node = data
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    blob = json.dumps({"recipe": data, "digest_version": _DIGEST_VERSION, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
