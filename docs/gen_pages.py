"""Pages generated at build time (mkdocs-gen-files), so they cannot drift from the code:

- ``index.md`` and ``changelog.md``: the README and CHANGELOG, links rewritten for the site;
- ``reference.md``: every recipe key (type, default, meaning) from the pydantic schema, and every trick
  from the trick registry with its ``ablate --tricks`` names;
- ``api.md``: one mkdocstrings entry per name of the public API (``medtricks._EXPORTS``).
"""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path

import mkdocs_gen_files
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]


def _site_links(text: str) -> str:
    text = (
        text.replace("](docs/)", "](index.md)").replace("](docs/", "](").replace("](CHANGELOG.md)", "](changelog.md)")
    )
    return text


def _type_name(annotation) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"typing\.|medtricks\.[\w.]+\.|<class '([^']+)'>", lambda m: m.group(1) or "", text)
    return text.replace("NoneType", "None").replace("|", "\\|")


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`"
    if field.is_required():
        return "**required**"
    return f"`{field.default!r}`"


def _section_model(annotation):
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """A field's meaning where the schema has no description: its trailing ``#`` comment, else the comment
    lines right above it (the schema's comments are written for readers of the code)."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# "))
                continue
            match = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
            if match and not stripped.startswith(("def ", "@", "return")):
                text = match.group(2) or " ".join(above)
                text = re.sub(r"\bnoqa.*|\btype:\s*ignore(\[[^\]]*\])?\s*#?", "", text).strip()  # linter marks
                if text:
                    found[match.group(1)] = text
            above = []
    return found


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: one line, ``|`` escaped, and ``<...>`` outside code spans shown
    as text (``<output_dir>`` would be read as an HTML tag and vanish)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _rows(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    nested = []
    comments = _comments(model)
    for name, field in model.model_fields.items():
        sub = _section_model(field.annotation)
        if sub is not None and name != "tricks":
            nested.append((f"{prefix}{name}", sub))
            continue
        doc = _cell(field.description or comments.get(name, ""))
        out.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default(field)} | {doc} |")
    for path, sub in nested:
        doc = " ".join((sub.__doc__ or "").split())
        out += ["", f"### `{path}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        _rows(sub, path + ".", out)


def recipe_reference() -> str:
    from medtricks.recipe import Recipe
    from medtricks.tricks.base import registered_tricks
    from medtricks.tricks.registry import tricks_config_model

    out = [
        "# Recipe reference",
        "",
        "Generated from `medtricks.recipe.Recipe` and the trick registry when the site is built. A recipe may "
        "set any key below; `--set section.key=value` overrides one from the command line.",
        "",
    ]
    for name, field in Recipe.model_fields.items():
        if name == "tricks":
            continue
        sub = _section_model(field.annotation)
        out += [
            f"## `{name}`",
            "",
            " ".join((sub.__doc__ or "").split()) if sub else "",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        _rows(sub, f"{name}.", out)
        out.append("")
    out += [
        "## `tricks`",
        "",
        "Assembled from the registered tricks (built-ins and plug-ins); each trick owns its keys.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    _rows(tricks_config_model(), "tricks.", out)
    out += [
        "",
        "### Tricks and their `ablate --tricks` names",
        "",
        "| trick | ablate name | sets | default value | what it does |",
        "|---|---|---|---|---|",
    ]
    for cls in registered_tricks():
        doc = " ".join((cls.__doc__ or "").split()).split(". ")[0].replace("|", "\\|")
        names = cls.ablation or {"": None}
        for ablate_name, spec in names.items():
            if spec is None:
                out.append(f"| `{cls.name}` | – | – | – | {doc} |")
            else:
                out.append(
                    f"| `{cls.name}` | `{ablate_name}` | `{spec.key}` | "
                    f"{'`' + spec.default + '`' if spec.default is not None else 'give NAME=VALUE'} | "
                    f"{spec.help.replace('|', chr(92) + '|')} |"
                )
    return "\n".join(out) + "\n"


def api_reference() -> str:
    import medtricks

    out = ["# Python API", "", "Everything below is importable from `medtricks` (`from medtricks import NAME`).", ""]
    for name in medtricks._EXPORTS:
        obj = getattr(medtricks, name)  # where it is defined (packages re-export lazily)
        where = f"{getattr(obj, '__module__', None) or medtricks._EXPORTS[name]}.{getattr(obj, '__qualname__', name)}"
        out += [
            f"## `{name}`",
            "",
            f"::: {where}",
            "    options:",
            "      show_root_heading: false",
            "      show_source: false",
            "",
        ]
    return "\n".join(out)


with mkdocs_gen_files.open("index.md", "w") as f:
    f.write(_site_links((ROOT / "README.md").read_text()))
with mkdocs_gen_files.open("changelog.md", "w") as f:
    f.write((ROOT / "CHANGELOG.md").read_text())
with mkdocs_gen_files.open("reference.md", "w") as f:
    f.write(recipe_reference())
with mkdocs_gen_files.open("api.md", "w") as f:
    f.write(api_reference())
