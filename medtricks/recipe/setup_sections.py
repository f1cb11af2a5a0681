"""The recipe sections that say what a run trains, on which images, from which weights: ``experiment``,
``data`` (with ``data.synth``, ``data.unlabeled``) and ``model`` (with ``model.resizer``, ``model.vit``), and
the checks of the run name and the weights spec they hold. Every name is importable from
:mod:`medtricks.recipe.sections`."""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from medtricks._schema import Section
from medtricks.data.transforms import PRESETS as AUGMENT_PRESETS
from medtricks.errors import ConfigError
from medtricks.models.weights import WEIGHT_NAMES

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
