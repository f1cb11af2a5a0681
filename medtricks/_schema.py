"""The base of every recipe section, shared by medtricks.recipe and the trick plug-ins' own sections."""

from __future__ import annotations

import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, field_validator

from medtricks.errors import ConfigError

__all__ = ["Section"]


def _number_types(annotation: Any) -> bool:
    """True when ``annotation`` admits an int or float (``int``, ``Optional[float]``, ``Literal[1, 3]``...)
    but not a bool: YAML ``true`` there is a mistake that pydantic's lax mode would turn into 1."""
    if annotation is bool:
        return False
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) and not any(
            isinstance(a, bool) for a in args
        )
    if typing.get_origin(annotation) is Union:
        return bool(args) and bool not in args and any(_number_types(a) for a in args)
    return False


def _item_annotation(annotation: Any) -> Any:
    """The item type of ``list[X]`` / ``tuple[X, ...]`` / ``tuple[X, Y]`` inside an annotation, else None."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return Union[tuple(args)] if args else None
    if origin is Union:
        items = [i for i in (_item_annotation(a) for a in typing.get_args(annotation)) if i is not None]
        return Union[tuple(items)] if items else None
    return None


class Section(BaseModel):
    """Base of every recipe section (also the trick-owned ones): unknown keys and booleans for numbers are errors."""

    # Unknown keys are errors (a typo must never be silently ignored).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info) -> Any:
        # pydantic's lax mode reads `batch_size: true` as 1: a number field takes numbers only
        # (ints stay fine for floats, YAML lists for tuples).
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _number_types(annotation):
            raise ConfigError(f"expected a number, got the boolean {value!r} (YAML true/false/yes/no/on/off)")
        item = _item_annotation(annotation)
        if isinstance(value, (list, tuple)) and item is not None and _number_types(item):
            flags = [i for i, v in enumerate(value) if isinstance(v, bool)]
            if flags:
                raise ConfigError(f"item {flags[0]} is the boolean {value[flags[0]]!r}; expected a number")
        return value
