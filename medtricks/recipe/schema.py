"""The whole recipe: :class:`Recipe` assembles the sections (and the trick registry's ``tricks:`` section),
checks the rules between sections, and :func:`recipe_from_dict` validates a merged dict into it with errors
that name the key, its section and the closest valid key."""

from __future__ import annotations

import difflib
import typing
from typing import Any, Optional

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from medtricks._schema import Section
from medtricks._yaml import cap_text, short_repr
from medtricks.errors import MedtricksError
from medtricks.recipe.sections import (
    AblationConfig,
    AuditConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrackingConfig,
    TrainConfig,
)
from medtricks.tricks.registry import load_recipe_plugins, trick_tags, tricks_config_model

__all__ = ["Recipe", "RecipeError", "recipe_from_dict"]


class RecipeError(MedtricksError, ValueError):
    """A recipe that cannot be loaded: names the file, the key and what was expected."""


class Recipe(Section):
    """A fully resolved experiment: every knob a run uses."""

    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig, description="name, seed, output folder")
    data: DataConfig = Field(default_factory=DataConfig, description="the data set, its split and augmentation")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the network and its starting weights")
    # Assembled from the trick registry: every registered trick's keys (medtricks/tricks/).
    tricks: Any = Field(
        default_factory=lambda: tricks_config_model()(), description="the bag of tricks: each registered trick's keys"
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="the optimizer")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="the learning-rate schedule")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training loop")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="the final evaluation")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="where the run is logged")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="robustness and shortcut audits")
    ablation: AblationConfig = Field(default_factory=AblationConfig, description="medtricks ablate's settings")

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
            raise ValueError(
                f"schedule.warmup_epochs={self.schedule.warmup_epochs:g} must be less than "
                f"train.epochs={self.train.epochs}: the lr would never leave warmup"
            )
        progressive = self.schedule.progressive_resize
        if progressive is not None:
            end = progressive.end or self.data.image_size
            if progressive.start > end:
                raise ValueError(
                    f"schedule.progressive_resize.start={progressive.start} is larger than its end "
                    f"({end}): it ramps up to the test resolution"
                )
            if progressive.final_epochs > self.train.epochs:
                raise ValueError(
                    f"schedule.progressive_resize.final_epochs={progressive.final_epochs} is more than "
                    f"train.epochs={self.train.epochs}"
                )
            if self.model.resizer.enabled:
                raise ValueError("schedule.progressive_resize and model.resizer both set the input size; use one")
        if self.train.cache_frozen is not None and not self.model.freeze:
            raise ValueError(
                "train.cache_frozen caches the frozen early stages, but model.freeze is not set: "
                "freeze the stem and early stages, e.g. model.freeze: [0, 1, 2, 3]"
            )
        if self.train.cache_frozen is not None and progressive is not None:
            raise ValueError(
                "train.cache_frozen and schedule.progressive_resize cannot be combined: "
                "schedule.progressive_resize changes the image size every epoch, the cache holds one size"
            )
        if self.train.cache_frozen is not None and self.model.resizer.enabled:
            raise ValueError(
                "train.cache_frozen cannot be used with model.resizer: the resizer trains in front of "
                "the backbone, so nothing at the front is frozen"
            )
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
                f"{source}: unknown key {key!r} in section {section!r}{hint} Valid keys: {', '.join(fields)}"
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


# ------------------------------------------------------------------------------------- validation
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
