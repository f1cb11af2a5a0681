"""Data cards: one YAML file per public dataset, validated by a pydantic schema.

A card tells the data layer where the images and labels are, how raw labels map to classes, how
to find the patient of each image, which rows to keep, and what to watch out for. A recipe then
only says ``data: {card: kermany-pneumonia, root: /path}``.

Example::

    from medtricks.data import load_card
    card = load_card("kermany-pneumonia")
    card.classes          # ['normal', 'pneumonia']
    card.layout.kind      # 'folder'
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtricks._yaml import cap_text, read_yaml_text, strict_load
from medtricks._shipped import shipped_dir
from medtricks.errors import ConfigError
from medtricks.data.errors import CardError

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
DROP = "drop"
#: ``unknown_labels`` policy that stops on a raw label the card does not know (the default).
UNKNOWN_ERROR = "error"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORMALIZATION_PRESETS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,), (0.5,))}


class _Strict(BaseModel):
    # extra="forbid": a misspelled key is an error that names it, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _check_regex(value: Optional[str], group: str) -> Optional[str]:
    if value is None:
        return value
    try:
        compiled = re.compile(value)
    except re.error as err:
        raise ConfigError(f"invalid regular expression {value!r}: {err}") from None
    if group not in compiled.groupindex and compiled.groups < 1:
        raise ConfigError(f"regular expression {value!r} needs a capture group (named '{group}' or the first group)")
    return value


class FolderLayout(_Strict):
    """Images in folders; the class is a folder name (``NORMAL/x.jpeg``)."""

    kind: Literal["folder"]
    glob: str = Field("**/*", description="which files under root to consider (pathlib glob)")
    extensions: list[str] = Field(
        default_factory=lambda: [".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff"],
        description="image file extensions (case-insensitive); other files are counted as ignored",
    )
    label_from: Literal["parent_dir", "first_dir"] = Field(
        "parent_dir", description="the raw label is the file's parent folder, or the first folder under root"
    )
    label_regex: Optional[str] = Field(
        None,
        description="searched in the file name; when it matches, its 'label' group (or first group) "
        "replaces the folder label (Kermany's bacteria/virus sub-type)",
    )
    split_dirs: dict[str, SplitName] = Field(
        default_factory=dict, description="folder name -> split, for datasets shipped as train/ test/ folders"
    )
    exclude_dirs: list[str] = Field(
        default_factory=lambda: ["__MACOSX"], description="folders whose files are not images of the dataset"
    )

    @field_validator("label_regex")
    @classmethod
    def _regex(cls, value):
        return _check_regex(value, "label")

    @field_validator("extensions")
    @classmethod
    def _ext(cls, value):
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in value]


class CsvTable(_Strict):
    """One label table (CSV or whitespace-separated text) of a ``csv`` layout."""

    file: str = Field(description="table path, relative to root")
    split: Optional[SplitName] = Field(None, description="every row of this table belongs to this split")
    image_dir: str = Field("", description="folder (relative to root) that the table's image paths start from")
    required: bool = Field(True, description="False: a missing table is noted, not an error (optional val.txt)")


class CsvLayout(_Strict):
    """Images listed in one or more tables with a path and a label per row."""

    kind: Literal["csv"]
    tables: list[CsvTable] = Field(min_length=1)
    sep: str = Field(",", description="column separator; 'whitespace' for space-separated .txt files")
    columns: Optional[list[str]] = Field(None, description="column names for tables without a header row")
    path_template: str = Field("{path}", description="image path from row values, e.g. '{folder}/{filename}'")
    locate: Literal["template", "by_name"] = Field(
        "template", description="'by_name': find each file by its name anywhere under root (NIH images_*/)"
    )
    label_column: str
    label_sep: Optional[str] = Field(None, description="separator of several labels in one cell (multilabel)")
    split_column: Optional[str] = None
    split_values: dict[str, SplitName] = Field(
        default_factory=dict, description="raw split value -> split (default: train/val/test as they are)"
    )
    split_lists: dict[SplitName, str] = Field(
        default_factory=dict, description="split -> text file (relative to root) listing its file names"
    )

    @field_validator("path_template")
    @classmethod
    def _template(cls, value):
        if not re.search(r"\{[^{}]+\}", value):
            raise ConfigError(f"path_template {value!r} must use at least one {{column}} field")
        return value


class PatientSpec(_Strict):
    """Where the patient of an image comes from: a column, a template of columns, a regex on the file
    name, or nothing (``per_image``)."""

    column: Optional[str] = None
    template: Optional[str] = Field(
        None, description="csv only: e.g. '{source}/{patient_id}' when IDs repeat across sources"
    )
    regex: Optional[str] = Field(None, description="searched in the file name; group 'patient' or the first group")
    per_image: bool = Field(False, description="no patient information: every image is its own patient")

    @field_validator("regex")
    @classmethod
    def _regex(cls, value):
        return _check_regex(value, "patient")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("column", "template", "regex") if getattr(self, k)]
        given += ["per_image"] if self.per_image else []
        if len(given) != 1:
            raise ConfigError(f"set exactly one of column, template, regex, per_image (got {given or 'none'})")
        return self


class RowFilter(_Strict):
    """Keep only rows whose ``column`` value is ``equals`` / ``in`` a list / not in ``not_in``."""

    column: str
    equals: Optional[str] = None
    in_: Optional[list[str]] = Field(None, alias="in")
    not_in: Optional[list[str]] = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("equals", "in_", "not_in") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"filter on {self.column!r}: set exactly one of equals, in, not_in")
        return self

    def keeps(self, value: str) -> bool:
        if self.equals is not None:
            return value == self.equals
        if self.in_ is not None:
            return value in self.in_
        return value not in (self.not_in or [])

    def describe(self) -> str:
        if self.equals is not None:
            return f"{self.column} == {self.equals!r}"
        if self.in_ is not None:
            return f"{self.column} in {self.in_}"
        return f"{self.column} not in {self.not_in}"


class LabelPattern(_Strict):
    """Raw labels that fully match ``pattern`` map to class ``to`` (or ``drop``)."""

    pattern: str
    to: str

    @field_validator("pattern")
    @classmethod
    def _regex(cls, value):
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"invalid regular expression {value!r}: {err}") from None
        return value


class Normalization(_Strict):
    """Recommended input normalization (the backbone's own weights take precedence in a run)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, value):
        if isinstance(value, str):
            if value not in _NORMALIZATION_PRESETS:
                raise ConfigError(
                    f"unknown normalization {value!r}; use one of {sorted(_NORMALIZATION_PRESETS)} "
                    "or {mean: [...], std: [...]}"
                )
            mean, std = _NORMALIZATION_PRESETS[value]
            return {"mean": mean, "std": std}
        return value

    @model_validator(mode="after")
    def _lengths(self):
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ConfigError("mean and std need the same length, 1 or 3")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std values must be > 0, got {self.std}")
        return self


class DataCard(_Strict):
    """Schema of ``data_cards/*.yaml``. See ``docs`` of each field; unknown keys are errors."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str
    source: str = Field(
        pattern=r"^(https?://\S+|generated)$",
        description="where the dataset can be downloaded (an http(s) URL), or 'generated'",
    )
    license: str
    citation: str
    task: Literal["binary", "multiclass", "multilabel"]
    classes: list[str] = Field(min_length=2)
    label_map: dict[str, str] = Field(default_factory=dict, description="raw label -> class (or 'drop')")
    label_patterns: list[LabelPattern] = Field(default_factory=list)
    drop: list[str] = Field(default_factory=list, description="raw labels left out on purpose (counted)")
    unknown_labels: str = Field(
        "error",
        description="raw labels that neither label_map, classes, drop nor label_patterns know: 'error' "
        "(stop, naming them and their files), 'drop' (leave them out) or a class name (map them "
        "to it); 'drop' and a class are counted in the manifest's notes and reported by "
        "`medtricks data check` and `medtricks run`, never silent",
    )
    layout: Annotated[Union[FolderLayout, CsvLayout], Field(discriminator="kind")]
    patient: PatientSpec
    filters: list[RowFilter] = Field(default_factory=list)
    image_size: int = Field(224, ge=8, description="recommended input size")
    normalization: Normalization = Field(default_factory=lambda: Normalization.model_validate("imagenet"))
    pitfalls: list[str] = Field(default_factory=list, description="shown by `medtricks data check`")
    allow_conflicting_duplicates: bool = Field(
        False,
        description="identical image bytes under two different labels stop build_manifest (a labelling "
        "error or a copy filed twice); true: accept them (they stay listed by `data check`)",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes has duplicates: {self.classes}")
        if DROP in self.classes:
            raise ConfigError(f"'{DROP}' is reserved (it marks raw labels left out); rename that class")
        if self.task == "binary" and len(self.classes) != 2:
            raise ConfigError(f"task 'binary' needs exactly 2 classes, got {len(self.classes)}: {self.classes}")
        allowed = set(self.classes) | {DROP}
        for raw, target in self.label_map.items():
            if target not in allowed:
                raise ConfigError(f"label_map[{raw!r}] = {target!r} is not one of the classes {self.classes} or 'drop'")
        if self.unknown_labels not in allowed | {UNKNOWN_ERROR}:
            raise ConfigError(
                f"unknown_labels: {self.unknown_labels!r} is not '{UNKNOWN_ERROR}', '{DROP}' or one of "
                f"the classes {self.classes}"
            )
        for pattern in self.label_patterns:
            if pattern.to not in allowed:
                raise ConfigError(
                    f"label_patterns: {pattern.pattern!r} -> {pattern.to!r} is not one of the classes "
                    f"{self.classes} or 'drop'"
                )
        if self.layout.kind == "folder":
            if self.patient.column or self.patient.template:
                raise ConfigError(
                    "patient.column/template need a csv layout; a folder layout uses patient.regex or per_image"
                )
            if self.filters:
                raise ConfigError("filters need a csv layout (they test table columns)")
        if self.layout.kind == "csv" and self.task == "multilabel" and not self.layout.label_sep:
            raise ConfigError("a multilabel csv card needs layout.label_sep (e.g. '|')")
        return self

    def map_label(self, raw: str) -> Optional[str]:
        """The class of a raw label, ``'drop'``, or None when the card does not know it."""
        if raw in self.label_map:
            return self.label_map[raw]
        if raw in self.classes:
            return raw
        if raw in self.drop:
            return DROP
        for pattern in self.label_patterns:
            if re.fullmatch(pattern.pattern, raw):
                return pattern.to
        return None

    def map_unseen_label(self, raw: str) -> Optional[str]:
        """The class (or ``'drop'``) the ``unknown_labels`` policy gives a raw label :meth:`map_label` does not
        know; None under ``unknown_labels: error``."""
        return None if self.unknown_labels == UNKNOWN_ERROR else self.unknown_labels


def cards_dir() -> Path:
    """Folder of the shipped cards.

    ``$MEDTRICKS_CARDS_DIR`` if set; else ``data_cards/`` of the checkout this package runs from
    (editable installs); else the copy a regular install puts in ``<prefix>/share/medtricks/data_cards``.
    """
    env = os.environ.get("MEDTRICKS_CARDS_DIR")
    if env:
        return Path(env).expanduser()
    # medtricks/data/cards.py -> repository root (same as Path(medtricks.__file__).parents[1]).
    return shipped_dir("data_cards", Path(__file__).resolve().parents[2])


def list_cards() -> list[str]:
    """Names (file stems) of the cards in :func:`cards_dir`, sorted."""
    folder = cards_dir()
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml")})


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"data card {source} does not follow the schema:"]
    for item in err.errors():
        # Drop the discriminator tag pydantic inserts ("layout.folder.glob" -> "layout.glob").
        loc = [str(p) for p in item["loc"] if p not in ("folder", "csv")]
        key = ".".join(loc) or "(top level)"
        msg = cap_text(item["msg"].removeprefix("Value error, "))  # never echo a huge value
        if item["type"] == "extra_forbidden":
            msg = "unknown key (misspelled?)"
        lines.append(f"  key '{key}': {msg}")
    return "\n".join(lines)


def card_from_dict(data: dict, source: str = "<card>") -> DataCard:
    """Validate a card given as a mapping; errors name the key (``CardError``)."""
    if not isinstance(data, dict):
        raise CardError(f"data card {source}: expected a mapping of keys, got {type(data).__name__}")
    try:
        return DataCard.model_validate(data)
    except ValidationError as err:
        raise CardError(_format_validation_error(err, source)) from None


def load_card(name_or_path: "str | Path | DataCard") -> DataCard:
    """Load a data card by name (file stem in :func:`cards_dir`) or by YAML path.

    Example::

        card = load_card("kermany-pneumonia")          # data_cards/kermany-pneumonia.yaml
        card = load_card("my_cards/hospital.yaml")     # any path
    """
    if isinstance(name_or_path, DataCard):
        return name_or_path
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = path.suffix in (".yaml", ".yml") or os.sep in text or "/" in text
    if not (looks_like_path or path.is_file()):
        folder = cards_dir()
        for suffix in (".yaml", ".yml"):
            if (folder / f"{text}{suffix}").is_file():
                path = folder / f"{text}{suffix}"
                break
        else:
            available = list_cards()
            close = difflib.get_close_matches(text, available, n=len(available), cutoff=0.0)
            raise CardError(
                f"unknown data card {text!r}; available cards in {folder} (closest first): "
                f"{', '.join(close) or '(none)'}; or pass a path to a card YAML file"
            )
    if not path.is_file():
        raise CardError(f"data card file {path} does not exist")
    try:  # duplicate keys and anchors/aliases are refused (medtricks/_yaml.py)
        data = strict_load(read_yaml_text(path), "data card", name=str(path))
    except yaml.YAMLError as err:
        raise CardError(f"data card {path} is not valid YAML: {err}") from None
    return card_from_dict(data, str(path))
