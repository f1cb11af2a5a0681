"""The YAML loader of recipes and data cards: ``yaml.safe_load`` minus its two silent traps.

- **Duplicate keys** in one mapping are an error naming the key and both lines (plain YAML keeps
  the last one silently, so ``lr: 0.1`` further down a section would win unseen).
- **Anchors and aliases** (``&name`` / ``*name``) are refused altogether: a recipe inherits with
  ``base:`` instead, and a 500-byte chain of aliases ("billion laughs") would otherwise expand to
  hundreds of megabytes before anything could check it.

Both raise ``yaml.YAMLError`` subclasses carrying the line, so callers keep their one
``except yaml.YAMLError`` and their own error type (``RecipeError``, ``CardError``). So do two traps of
the file rather than the YAML: nesting deeper than :data:`MAX_DEPTH` levels (PyYAML recurses once per
level and would die with a ``RecursionError`` traceback), and bytes that are not UTF-8 text
(:func:`read_yaml_text` says where).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

#: Longest text of a value echoed into an error message (the rest is elided).
MAX_ECHO = 200
#: Deepest nesting of lists/mappings a recipe or card may have (real ones use fewer than 10 levels).
MAX_DEPTH = 100


class YAMLFileError(yaml.YAMLError):
    """A YAML file that cannot be read as text, or is nested too deeply: the message says where."""


def read_yaml_text(path) -> str:
    """The text of a YAML file, which must be UTF-8 (YAML's own default); otherwise a
    :class:`YAMLFileError` naming the first byte that is not, and the line it is on."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise YAMLFileError(
            f"not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} (line {line}); save the file as UTF-8"
        ) from None


def short_repr(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was (error messages only).

    Containers are summarised before ``repr`` runs, so a huge value is never rendered in full.
    """
    if isinstance(value, (dict, list, tuple, set)) and len(value) > limit:
        kind = type(value).__name__
        head = list(value.items())[:5] if isinstance(value, dict) else list(value)[:5]
        return f"<{kind} of {len(value)} items, first: {short_repr(head, limit)}>"
    return cap_text(repr(value), limit)


def cap_text(text: str, limit: int = 500) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys and anchors/aliases (see module doc)."""

    #: What the document is, for messages ("recipe", "data card").
    what = "this file"

    def compose_node(self, parent, index):
        depth = getattr(self, "_depth", 0) + 1
        if depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise YAMLFileError(
                f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1}, column "
                f"{mark.column + 1}); a {self.what} needs a few"
            )
        self._depth = depth
        try:
            return self._compose_checked(parent, index)
        finally:
            self._depth = depth - 1

    def _compose_checked(self, parent, index):
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise ComposerError(
                None,
                None,
                f"found YAML {kind}{short_repr(anchor, 60)[1:-1]}: anchors and aliases are not allowed in a "
                f"{self.what}; write the value out"
                + (" (a recipe can inherit with `base:`)" if self.what == "recipe" else ""),
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: the base constructor reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"duplicate key {short_repr(key, 80)} (first on line {first}, again on line {line}); "
                        "YAML would silently keep the last one: remove one of them",
                        key_node.start_mark,
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _loader(what: str) -> type[StrictSafeLoader]:
    return type(f"StrictSafeLoader_{what.replace(' ', '_')}", (StrictSafeLoader,), {"what": what})


_LOADERS: dict[str, type[StrictSafeLoader]] = {}


def strict_load(text: str, what: str = "this file", name: Optional[str] = None) -> Any:
    """Parse one YAML document like ``yaml.safe_load``, refusing duplicate keys and anchors/aliases.

    ``what`` names the document in messages (``"recipe"``, ``"data card"``); ``name`` (a file path)
    is where the line numbers of a ``yaml.YAMLError`` point.
    """
    loader = _LOADERS.get(what)
    if loader is None:
        loader = _LOADERS[what] = _loader(what)
    stream: Any = text
    if name is not None:
        stream = io.StringIO(text)
        stream.name = str(name)
    try:
        return yaml.load(stream, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # a deep structure MAX_DEPTH did not catch (the constructor recurses too)
        raise YAMLFileError(f"nested too deeply to read (more than {MAX_DEPTH} levels)") from None


__all__ = [
    "MAX_DEPTH",
    "MAX_ECHO",
    "StrictSafeLoader",
    "YAMLFileError",
    "cap_text",
    "read_yaml_text",
    "short_repr",
    "strict_load",
]
