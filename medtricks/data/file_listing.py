"""Listing a data set's files as a card's layout describes them: class folders, or label tables (CSV).

Only file names and label tables are read, never an image. Symlinked folders and files are followed
(paths keep the link names); each record holds the file's path, its raw label, the split its folder or
table declares (if any) and, for tables, the row it came from.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Optional

import pandas as pd

from medtricks.data.cards import CsvLayout, DataCard, FolderLayout
from medtricks.data.errors import ManifestError

__all__ = ["walk_files", "list_records"]


def list_records(card: DataCard, root: Path, notes: Counter) -> list[dict]:
    """One record per file the card's layout names under ``root`` (rows left out are counted in ``notes``)."""
    lister = _list_folder if card.layout.kind == "folder" else _list_csv
    return lister(card, card.layout, root, notes)


def _first_group(match: re.Match, name: str) -> Optional[str]:
    if name in match.re.groupindex and match.group(name) is not None:
        return match.group(name)
    return match.group(1) if match.re.groups else match.group(0)


def walk_files(root: Path, notes: Optional[Counter] = None, skip_dirs=()) -> list[Path]:
    """Every file under ``root``, following symlinked folders and files; paths keep the link names.

    ``pathlib.Path.glob('**')`` (Python < 3.13) does not descend into symlinked folders, so class or
    split folders linked in from elsewhere would be skipped silently. A link back to a folder it sits
    in (a loop) is not followed and is counted in ``notes``; two links to one folder are both listed
    (their files are then identical bytes, which the duplicate checks see). Folders whose name starts
    with '.' or is in ``skip_dirs`` are not entered. Broken links are counted in ``notes``.
    """
    files = []
    chains = {str(root): (os.path.realpath(root),)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = chains.pop(dirpath, (os.path.realpath(dirpath),))
        keep = []
        for name in sorted(dirnames):
            if name.startswith(".") or name in skip_dirs:
                continue
            sub = os.path.join(dirpath, name)
            real = os.path.realpath(sub)
            if real in chain:  # a link to one of its own ancestors: following it never ends
                if notes is not None:
                    notes["symlinked folders not followed (they loop back to a parent)"] += 1
                continue
            chains[sub] = (*chain, real)
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() and not path.exists():
                if notes is not None and not name.startswith("."):
                    notes["broken symlinks ignored"] += 1
                continue
            files.append(path)
    return sorted(files)


def _glob_regex(pattern: str) -> re.Pattern:
    """A pathlib-style glob (``**`` = any number of folders, ``*``/``?``/``[..]`` within one name)
    as a regex over POSIX paths relative to the root."""
    out = []
    parts = [p for p in pattern.strip("/").split("/") if p not in ("", ".")]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append("(?:[^/]+/)*[^/]+" if last else "(?:[^/]+/)*")
            continue
        seg, j = "", 0
        while j < len(part):
            c = part[j]
            if c == "*":
                seg += "[^/]*"
            elif c == "?":
                seg += "[^/]"
            elif c == "[" and "]" in part[j + 2 :]:
                end = part.index("]", j + 2)
                body = part[j + 1 : end].replace("\\", "\\\\")
                seg += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                j = end
            else:
                seg += re.escape(c)
            j += 1
        out.append(seg + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z")


def _list_folder(card: DataCard, layout: FolderLayout, root: Path, notes: Counter) -> list[dict]:
    records = []
    label_re = re.compile(layout.label_regex) if layout.label_regex else None
    wanted = _glob_regex(layout.glob)
    for path in walk_files(root, notes, skip_dirs=layout.exclude_dirs):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part in layout.exclude_dirs for part in rel.parts) or not path.is_file():
            continue
        if not wanted.match(rel.as_posix()):
            continue
        if path.suffix.lower() not in layout.extensions:
            notes["non-image files ignored"] += 1
            continue
        if len(rel.parts) < 2:
            raise ManifestError(
                f"{path}: a folder-layout card expects images inside class folders under {root}, "
                f"found a file directly in root"
            )
        raw = rel.parts[-2] if layout.label_from == "parent_dir" else rel.parts[0]
        if label_re is not None and (m := label_re.search(path.name)):
            raw = _first_group(m, "label") or raw
        split = next((layout.split_dirs[p] for p in rel.parts[:-1] if p in layout.split_dirs), None)
        records.append({"path": path, "raw_label": raw, "declared_split": split, "row": None})
    return records


def _read_table(path: Path, layout: CsvLayout) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"label table {path} (named in the card's layout.tables) does not exist")
    kwargs = dict(dtype=str, keep_default_na=False)
    if layout.sep == "whitespace":
        kwargs["sep"] = r"\s+"
    else:
        kwargs["sep"] = layout.sep
    if layout.columns:
        kwargs.update(header=None, names=layout.columns)
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise ManifestError(f"cannot read label table {path}: {err}") from None


def _index_by_name(root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    dupes = []
    for path in walk_files(root):  # follows symlinked folders, like the folder layout
        if path.name in index:
            dupes.append(path.name)
        index[path.name] = path
    if dupes:
        raise ManifestError(
            f"layout.locate='by_name' needs unique file names under {root}; "
            f"{len(dupes)} names occur twice, e.g. {dupes[:5]}"
        )
    return index


def _list_csv(card: DataCard, layout: CsvLayout, root: Path, notes: Counter) -> list[dict]:
    records = []
    field_names = set(re.findall(r"\{([^{}:!]+)", layout.path_template))
    split_sets = {}
    for split, list_file in layout.split_lists.items():
        lp = root / list_file
        if not lp.is_file():
            raise ManifestError(f"split list {lp} (layout.split_lists.{split}) does not exist")
        split_sets[split] = {line.strip() for line in lp.read_text().splitlines() if line.strip()}
    by_name = _index_by_name(root) if layout.locate == "by_name" else None
    patient_fields = set(re.findall(r"\{([^{}:!]+)", card.patient.template or ""))
    for table in layout.tables:
        table_path = root / table.file
        if not table.required and not table_path.is_file():
            notes[f"optional table {table.file} absent"] += 1
            continue
        df = _read_table(table_path, layout)
        needed = field_names | patient_fields | {layout.label_column} | {f.column for f in card.filters}
        needed |= {c for c in (layout.split_column, card.patient.column) if c}
        absent = sorted(needed - set(df.columns))
        if absent:
            raise ManifestError(f"label table {table_path} lacks column(s) {absent}; it has {list(df.columns)}")
        for line_no, row in enumerate(df.to_dict("records"), start=2 if not layout.columns else 1):
            if not all(f.keeps(row[f.column]) for f in card.filters):
                failed = next(f for f in card.filters if not f.keeps(row[f.column]))
                notes[f"rows left out by filter {failed.describe()}"] += 1
                continue
            rel = layout.path_template.format(**row)
            if by_name is not None:
                name = Path(rel).name
                path = by_name.get(name, root / table.image_dir / rel)
            else:
                path = root / table.image_dir / rel
            split = table.split
            if layout.split_column:
                value = row[layout.split_column]
                split = layout.split_values.get(value, value) or split
            for list_split, names in split_sets.items():
                if Path(rel).name in names or rel in names:
                    split = list_split
            records.append(
                {
                    "path": path,
                    "raw_label": row[layout.label_column],
                    "declared_split": split,
                    "row": row,
                    "where": f"{table_path}:{line_no}",
                }
            )
    return records
