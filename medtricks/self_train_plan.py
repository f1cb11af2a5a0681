"""Noisy Student's round plan (pure, no training): the students' noise and size (:class:`NoiseConfig`), the
unlabelled-pool check, each round's ``--set`` overrides and recipe, and the self-training id that names its
folder and parent run. :mod:`medtricks.self_train` runs the rounds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from medtricks.data.transforms import PRESETS as AUGMENT_PRESETS
from medtricks.errors import ConfigError
from medtricks.models.model_names import resolve_model_name
from medtricks.recipe import Recipe, apply_overrides, recipe_digest, recipe_from_dict

__all__ = [
    "NoiseConfig",
    "RoundPlan",
    "TEACHER_INPUT",
    "plan_rounds",
    "round_overrides",
    "round_recipe",
    "self_train_id",
    "check_unlabeled_pool",
    "supports_drop_path",
]

# Keys that do not change what is trained: out of the self-training id (as in ablations).
_NOT_IDENTITY = (("tracking",), ("train", "progress"), ("ablation",))


@dataclass(frozen=True)
class NoiseConfig:
    """The student's noise and size (rounds >= 1). Defaults follow Noisy Student (Xie et al. 2020):
    dropout 0.5 before the classifier, stochastic depth 0.2 (survival 0.8), a strong augmentation.

    Attributes:
        drop_rate: ``model.drop_rate`` of every student (0 leaves the recipe's value).
        drop_path_rate: ``model.kwargs.drop_path_rate`` (stochastic depth) where the timm model takes it
            (0 leaves the recipe's value).
        augment: ``data.augment`` of every student, one of :data:`medtricks.data.transforms.PRESETS`;
            ``None`` keeps the recipe's preset. Default ``cxr_shift`` (the strongest X-ray preset;
            paper_baseline is ImageNet's, with horizontal flips).
        student: ``model.name`` of every student (an equal or larger model); ``None`` = the recipe's model.
    """

    drop_rate: float = 0.5
    drop_path_rate: float = 0.2
    augment: Optional[str] = "cxr_shift"
    student: Optional[str] = None

    def __post_init__(self) -> None:
        for key in ("drop_rate", "drop_path_rate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"self-train noise {key} must be a number in [0, 1), got {value!r}")
        if self.augment is not None and self.augment not in AUGMENT_PRESETS:
            raise ConfigError(
                f"self-train noise augment must be one of {', '.join(AUGMENT_PRESETS)} "
                f"(or keep: the recipe's data.augment), got {self.augment!r}"
            )
        if self.student is not None and (not isinstance(self.student, str) or not self.student.strip()):
            raise ConfigError(f"self-train student must be a model name (model.name), got {self.student!r}")


def supports_drop_path(model_name: str) -> bool:
    """Whether the timm model takes ``drop_path_rate`` (stochastic depth); built on the meta device, so
    nothing is allocated or downloaded. MONAI nets: False."""
    name = resolve_model_name(model_name)
    if name.startswith("monai:"):
        return False
    import timm
    import torch

    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, num_classes=2, drop_path_rate=0.1)
    except TypeError:
        return False
    return True


def _param_count(model_name: str, in_chans: int) -> Optional[int]:
    name = resolve_model_name(model_name)
    if name.startswith("monai:"):
        return None
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=2, in_chans=in_chans)
    except Exception:  # noqa: BLE001 - only a size check: the run itself reports a model that cannot be built
        return None
    return sum(p.numel() for p in model.parameters())


def check_unlabeled_pool(recipe: Recipe) -> None:
    """A :class:`ConfigError` naming the keys when the recipe leaves no unlabelled images."""
    data = recipe.data
    partial = (data.label_fraction is not None and data.label_fraction < 1.0) or data.label_count is not None
    if not partial and data.unlabeled is None:
        raise ConfigError(
            "self-training needs an unlabelled pool for the students' pseudo-labels, and this recipe has none: "
            f"data.label_fraction is {data.label_fraction!r}, data.label_count is {data.label_count!r} and "
            "data.unlabeled is null. Set data.label_fraction below 1 (e.g. --set data.label_fraction=0.1), "
            "data.label_count, or data.unlabeled: {root: FOLDER_OF_UNLABELLED_IMAGES}"
        )


@dataclass
class RoundPlan:
    """What one round trains: its index, the round whose model labels its pool (None for round 0) and
    the recipe overrides (the teacher's run folder is added when that round has finished)."""

    index: int
    teacher_round: Optional[int]
    overrides: list[str]
    notes: list[str] = field(default_factory=list)


def round_overrides(round_index: int, noise: NoiseConfig, *, drop_path: bool = True) -> list[str]:
    """The ``--set`` overrides of a round (without the teacher): round 0 has pseudo-labels off; every
    student has them on, plus the noise and its model. ``drop_path``: whether the student's model takes
    stochastic depth (see :func:`supports_drop_path`)."""
    if round_index < 0:
        raise ConfigError(f"round index must be >= 0, got {round_index}")
    if round_index == 0:
        return ["tricks.pseudo_label.enabled=false", "tricks.pseudo_label.teacher=null"]
    out = ["tricks.pseudo_label.enabled=true"]
    if noise.student:
        out.append(f"model.name={noise.student}")
    if noise.drop_rate:
        out.append(f"model.drop_rate={noise.drop_rate:g}")
    if noise.drop_path_rate and drop_path:
        out.append(f"model.kwargs.drop_path_rate={noise.drop_path_rate:g}")
    if noise.augment is not None:
        out.append(f"data.augment={noise.augment}")
    return out


def plan_rounds(
    recipe: Recipe, rounds: int, noise: Optional[NoiseConfig] = None, *, drop_path: Optional[bool] = None
) -> list[RoundPlan]:
    """Rounds ``0..rounds``: the teacher, then ``rounds`` noised students, each labelled by the round before.

    ``drop_path``: whether the student model takes stochastic depth; ``None`` asks timm
    (:func:`supports_drop_path`).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an int >= 1 (student rounds after the teacher), got {rounds!r}")
    noise = noise or NoiseConfig()
    check_unlabeled_pool(recipe)
    student = noise.student or recipe.model.name
    notes = []
    if drop_path is None:
        drop_path = bool(noise.drop_path_rate) and supports_drop_path(student)
        if noise.drop_path_rate and not drop_path:
            notes.append(f"{student} takes no drop_path_rate: the students get no stochastic depth")
    if noise.drop_rate and student.startswith("monai:"):
        raise ConfigError(
            f"self-train noise drop_rate={noise.drop_rate:g}: MONAI model {student} takes no "
            "model.drop_rate; pass drop_rate 0 (--drop-rate 0) and set its own dropout via model.kwargs"
        )
    plans = [RoundPlan(0, None, round_overrides(0, noise))]
    for k in range(1, rounds + 1):
        plans.append(RoundPlan(k, k - 1, round_overrides(k, noise, drop_path=drop_path), list(notes)))
    return plans


# What the students' teacher labels (tricks.pseudo_label): part of the id, so that a self-training folder
# whose rounds were labelled from the augmented view (before the teacher saw clean images) is never continued.
TEACHER_INPUT = "clean"


def self_train_id(recipe: Recipe, noise: NoiseConfig) -> str:
    """A short stable id of (recipe, noise, the teacher's input): the same self-training gets the same
    folder and parent run."""
    return recipe_digest(recipe, ignore=_NOT_IDENTITY, noise=asdict(noise), teacher_input=TEACHER_INPUT)


def round_recipe(
    base: Recipe, plan: RoundPlan, *, teacher: Optional[str], out_dir: str | Path, tracking_uri: Optional[str] = None
) -> Recipe:
    """The recipe of one round: its overrides, its teacher's run folder, its own output folder
    (``<out_dir>/round<k>``, so ``resume="auto"`` can only continue that round's own run)."""
    if plan.teacher_round is not None and not teacher:
        raise ConfigError(f"round {plan.index} needs the run folder of round {plan.teacher_round} as its teacher")
    data = apply_overrides(base.model_dump(mode="json"), plan.overrides)
    if teacher:  # set as a string, not parsed as YAML: a folder name may hold ':' or '#'
        data["tricks"]["pseudo_label"]["teacher"] = str(teacher)
    data["experiment"]["output_dir"] = str(Path(out_dir) / f"round{plan.index}")
    data["tracking"]["run_name"] = f"{base.experiment.name} round {plan.index}" + (
        " (teacher)" if plan.index == 0 else " (student)"
    )
    if tracking_uri is not None:
        data["tracking"]["uri"] = tracking_uri
    return recipe_from_dict(data, source=f"self-train round {plan.index}")
