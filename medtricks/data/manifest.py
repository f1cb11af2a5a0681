"""Manifests: one row per image (path, label, target, patient, split), built from a card and a root.

Building a manifest only lists files (following symlinked folders and files) and reads label
tables; it decodes no image, and hashes only the bytes of files that share their byte size with
another (to find one image filed under two labels), so it is fast even for tens of thousands of
files. Patients are replaced by a salted hash before the manifest leaves this module; splits are computed on the raw IDs, so ``split_seed`` alone decides them.

Example::

    from medtricks.data import build_manifest
    m = build_manifest("kermany-pneumonia", "../shared/data/kermany224/train", split_seed=0)
    m.groupby(["split", "label"]).size()
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import pandas as pd

from medtricks.errors import ConfigError, ResourceError
from medtricks.data.cards import DROP, SPLITS, CsvLayout, DataCard, FolderLayout, load_card
from medtricks.data.errors import LeakageError, ManifestError, UnseenLabelWarning
from medtricks.data.splits import assign_splits, conflicting_duplicates

MANIFEST_COLUMNS = ["path", "label", "target", "patient", "split"]
_MAX_LISTED = 10


# ---------------------------------------------------------------------------------------- patients
def _cache_root() -> Path:
    return Path(os.environ.get("MEDTRICKS_CACHE") or Path.home() / ".cache" / "medtricks").expanduser()


def patient_salt() -> bytes:
    """Secret salt of patient hashes: ``$MEDTRICKS_PATIENT_SALT``, else one random salt per machine.

    The per-machine salt lives in ``$MEDTRICKS_CACHE/patient_salt`` (default ``~/.cache/medtricks``),
    so hashes are stable across runs on one machine but cannot be reversed by guessing IDs elsewhere.
    Set ``MEDTRICKS_PATIENT_SALT`` to share hashes between machines.
    """
    env = os.environ.get("MEDTRICKS_PATIENT_SALT")
    if env:
        return env.encode()
    path = _cache_root() / "patient_salt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two processes starting at once agree on the first salt written
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(16))
        except FileExistsError:
            pass
    salt = path.read_text().strip()
    if not salt:
        raise ResourceError(f"patient salt file {path} is empty; delete it (a new one is made) "
                           "or set MEDTRICKS_PATIENT_SALT")
    return salt.encode()


def hash_patient(raw_id: str, card_name: str, salt: Optional[bytes] = None) -> str:
    """Salted, keyed BLAKE2b hash of a raw patient ID (``p_`` + 16 hex characters)."""
    key = (salt if salt is not None else patient_salt())[:64]
    digest = hashlib.blake2b(f"{card_name}\x00{raw_id}".encode(), key=key, digest_size=8).hexdigest()
    return f"p_{digest}"


def _first_group(match: re.Match, name: str) -> Optional[str]:
    if name in match.re.groupindex and match.group(name) is not None:
        return match.group(name)
    return match.group(1) if match.re.groups else match.group(0)


# ---------------------------------------------------------------------------------------- listing
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
            elif c == "[" and "]" in part[j + 2:]:
                end = part.index("]", j + 2)
                body = part[j + 1:end].replace("\\", "\\\\")
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
            raise ManifestError(f"{path}: a folder-layout card expects images inside class folders under {root}, "
                                f"found a file directly in root")
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
        raise ManifestError(f"layout.locate='by_name' needs unique file names under {root}; "
                            f"{len(dupes)} names occur twice, e.g. {dupes[:5]}")
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
            records.append({"path": path, "raw_label": row[layout.label_column], "declared_split": split,
                            "row": row, "where": f"{table_path}:{line_no}"})
    return records


# ---------------------------------------------------------------------------------------- building
def _raw_patient(card: DataCard, rec: dict, patient_re: Optional[re.Pattern]) -> str:
    spec = card.patient
    if spec.per_image:
        return str(rec["path"])
    if spec.column or spec.template:
        value = str(rec["row"][spec.column]).strip() if spec.column else spec.template.format(**rec["row"]).strip()
        if not value or (spec.column is None and not any(str(rec["row"][f]).strip() for f in
                                                          re.findall(r"\{([^{}:!]+)", spec.template))):
            raise ManifestError(f"{rec['where']}: empty patient ({spec.column or spec.template!r}) for {rec['path']}")
        return value
    m = patient_re.search(rec["path"].name)
    if not m:
        raise ManifestError(f"{rec['path']}: file name does not match the card's patient regex "
                            f"{spec.regex!r}; expected e.g. a name the card describes")
    return _first_group(m, "patient")


def _summarise(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def build_manifest(card, root, split_seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.0,
                   *, on_missing: str = "error", test_by: str = "random",
                   on_conflicting_duplicates: str = "error", unknown_labels: Optional[str] = None) -> pd.DataFrame:
    """One row per image: ``path`` (absolute), ``label``, ``target``, ``patient`` (salted hash), ``split``.

    ``card``: a card name, a YAML path or a :class:`DataCard`. Unknown raw labels, files missing from a
    label table (with ``on_missing='error'``), conflicting labels for one file and file names that do
    not match the card's patient rule are errors naming the file. Rows left out on purpose (card
    filters, ``drop`` labels, non-image files, identical duplicate rows) are counted in
    ``manifest.attrs['notes']``. ``on_missing='keep'`` keeps rows of missing files (the image scan
    of :func:`build_datasets` then reports or quarantines them).

    Identical image bytes under two different labels raise a :class:`ManifestError` (in one split)
    or :class:`LeakageError` (across splits) listing the files, unless the card sets
    ``allow_conflicting_duplicates`` or ``on_conflicting_duplicates='keep'`` (``medtricks data
    check`` reports them instead); either
    way they are in ``manifest.attrs['conflicting_duplicates']`` (groups of ``(path, label, split)``).
    Only files that share a byte size are hashed.

    Raw labels the card does not name follow its ``unknown_labels`` policy (``unknown_labels`` here overrides
    it): ``error`` stops naming them; ``drop`` or a class leaves them out or maps them, counted in ``notes``,
    listed with their counts in ``manifest.attrs['unseen_labels']`` and warned about (:class:`UnseenLabelWarning`).
    """
    if on_missing not in ("error", "keep"):
        raise ConfigError(f"on_missing={on_missing!r}: expected 'error' or 'keep'")
    if on_conflicting_duplicates not in ("error", "keep"):
        raise ConfigError(f"on_conflicting_duplicates={on_conflicting_duplicates!r}: expected 'error' or 'keep'")
    card = load_card(card)
    if unknown_labels is not None and unknown_labels != card.unknown_labels:
        card = type(card).model_validate({**card.model_dump(by_alias=True), "unknown_labels": unknown_labels})
    if card.task == "multilabel":
        raise NotImplementedError(f"card {card.name!r} is multilabel; multilabel manifests and training are not "
                                  "supported yet (the card is validated and documented only)")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise ManifestError(f"data root {root} does not exist or is not a folder (card {card.name!r})")

    notes: Counter = Counter()
    lister = _list_folder if card.layout.kind == "folder" else _list_csv
    records = lister(card, card.layout, root, notes)
    if not records:
        raise ManifestError(f"no images found under {root} for card {card.name!r} "
                            f"(layout {card.layout.kind}; check the root and the card's layout)")

    unknown: dict[str, list[str]] = {}
    unseen: Counter = Counter()
    kept = []
    for rec in records:
        target = card.map_label(rec["raw_label"])
        if target is None:
            target = card.map_unseen_label(rec["raw_label"])
            if target is None:
                unknown.setdefault(rec["raw_label"], []).append(str(rec["path"]))
                continue
            unseen[rec["raw_label"]] += 1
        if target == DROP:
            why = "card unknown_labels" if rec["raw_label"] in unseen else "card drop list"
            notes[f"images with label {rec['raw_label']!r} dropped ({why})"] += 1
        else:
            rec["label"] = target
            kept.append(rec)
    if unknown:
        details = "; ".join(f"{raw!r} ({len(p)} files, e.g. {p[0]})" for raw, p in sorted(unknown.items()))
        raise ManifestError(f"card {card.name!r}: unknown raw label(s): {details}. Expected one of "
                            f"{sorted(set(card.label_map) | set(card.classes))} or a match of its label_patterns; "
                            "add them to the card's label_map (or to 'drop' to leave them out on purpose), or set "
                            "the card's unknown_labels to a class or 'drop' for every label it does not know")
    if unseen:
        for raw, count in unseen.items():
            if card.unknown_labels != DROP:
                notes[f"images with unseen label {raw!r} mapped to {card.unknown_labels!r} (card unknown_labels)"] += count
        listed = ", ".join(f"{raw!r} ({n})" for raw, n in sorted(unseen.items()))
        warnings.warn(f"card {card.name!r}: {sum(unseen.values())} image(s) carry raw label(s) the card does not "
                      f"name: {listed}; unknown_labels: {card.unknown_labels!r} "
                      f"{'left them out' if card.unknown_labels == DROP else 'mapped them to that class'}",
                      UnseenLabelWarning, stacklevel=2)

    missing = [str(r["path"]) for r in kept if not r["path"].is_file()]
    if missing and on_missing == "error":
        raise ManifestError(f"{len(missing)} file(s) named in the label table(s) do not exist under {root}: "
                            f"{_summarise(missing)}")

    patient_re = re.compile(card.patient.regex) if card.patient.regex else None
    df = pd.DataFrame({
        "path": [str(r["path"]) for r in kept],
        "label": [r["label"] for r in kept],
        "raw_patient": [_raw_patient(card, r, patient_re) for r in kept],
        "declared_split": [r["declared_split"] for r in kept],
    })
    # A file listed twice with the same label (RSNA: one row per box) is one image; with two labels, an error.
    conflicts = df.groupby("path")["label"].nunique()
    conflicts = conflicts[conflicts > 1]
    if len(conflicts):
        raise ManifestError(f"{len(conflicts)} file(s) have conflicting labels in the label table(s): "
                            f"{_summarise(list(conflicts.index))}")
    n_before = len(df)
    df = df.drop_duplicates(subset=["path"]).sort_values("path", kind="stable").reset_index(drop=True)
    if len(df) < n_before:
        notes["duplicate rows of one file collapsed"] += n_before - len(df)

    df["split"] = assign_splits(df["label"], df["raw_patient"], df["declared_split"], seed=split_seed,
                                val_fraction=val_fraction, test_fraction=test_fraction, test_by=test_by)
    conflicting = conflicting_duplicates(df)
    if conflicting and on_conflicting_duplicates == "error" and not card.allow_conflicting_duplicates:
        shown = "\n".join("  same bytes: " + ", ".join(f"{p} ({label}, {split})" for p, label, split in group[:4])
                          + (f", ... ({len(group) - 4} more)" if len(group) > 4 else "")
                          for group in conflicting[:_MAX_LISTED])
        more = f"\n  ... and {len(conflicting) - _MAX_LISTED} more group(s)" if len(conflicting) > _MAX_LISTED else ""
        message = (f"{len(conflicting)} image(s) appear with identical bytes under different labels "
                   f"(card {card.name!r}, root {root}); fix the labels or remove the copies, or set "
                   f"allow_conflicting_duplicates: true in the card if that is intended:\n{shown}{more}")
        if any(len({split for *_, split in group}) > 1 for group in conflicting):  # in two splits: leakage too
            raise LeakageError(message, sorted({p for group in conflicting for p, _, _ in group}))
        raise ManifestError(message)
    salt = patient_salt()
    hashes = {raw: hash_patient(raw, card.name, salt) for raw in df["raw_patient"].unique()}
    df["patient"] = df["raw_patient"].map(hashes)
    df["target"] = df["label"].map({c: i for i, c in enumerate(card.classes)}).astype("int64")
    out = df[MANIFEST_COLUMNS].copy()
    out.attrs.update(card=card.name, root=str(root), notes=dict(notes), missing=missing,
                     unseen_labels={str(raw): int(n) for raw, n in sorted(unseen.items())},
                     declared_splits=sorted(set(df["declared_split"].dropna())),
                     conflicting_duplicates=conflicting)
    return out


def image_id(rel_path: str, salt: Optional[bytes] = None) -> str:
    """The logged name of a file: ``i_`` + a salted hash of its POSIX path relative to the data root
    (same salt as the patient hashes: the same file gets the same ID on this machine)."""
    return hash_patient(rel_path, "image", salt).replace("p_", "i_", 1)


def folder_id(folder, salt: Optional[bytes] = None) -> str:
    """The logged form of a data folder (``data.root``, ``evaluate --root``): ``r_`` + a salted hash of its
    absolute path. Folder names can hold patient names; the same folder gets the same ID on this machine,
    so runs on one data set still group together in the MLflow UI."""
    path = os.path.abspath(os.path.expanduser(str(folder)))
    return hash_patient(path, "folder", salt).replace("p_", "r_", 1)


def content_id(digest: str, salt: Optional[bytes] = None) -> str:
    """The logged form of a file's content hash (``content_hash`` of :func:`~medtricks.data.scan_images`):
    ``c_`` + a salted hash of it, so identical bytes can be matched on this machine (``evaluate`` finds
    training images in its data) while the log cannot be checked against an image found elsewhere."""
    return hash_patient(str(digest), "bytes", salt).replace("p_", "c_", 1)


def _relative(path, root: Path) -> Optional[str]:
    """``path`` as a POSIX path relative to ``root`` (the link path first, then its target), or ``None``."""
    # The link path, not its target: a symlinked file or folder under the root may point anywhere.
    for candidate in (Path(os.path.abspath(os.path.expanduser(str(path)))), Path(path).expanduser().resolve()):
        try:
            return candidate.relative_to(root).as_posix()
        except ValueError:
            continue
    return None


def export_manifest(manifest: pd.DataFrame, root, *, keep_paths: bool = False) -> pd.DataFrame:
    """The copy of a manifest that is safe to log: hashed image IDs, hashed patients, label and split.

    File names often carry the dataset's own patient IDs (Kermany ``person123_...``, RSNA
    ``<patientId>.dcm``), so by default the relative path is replaced by ``image_id``, a salted
    hash of it (same salt as the patient hashes: the same file gets the same ID on this machine).
    ``keep_paths=True`` keeps the relative paths, for data whose names are known to be safe. A
    manifest with a complete ``content_hash`` column (after the image scan) also gets ``content_id``
    (:func:`content_id`): what ``medtricks evaluate`` compares to find training images in its data.
    """
    root = Path(root).expanduser().resolve()
    salt = patient_salt()
    rel = []
    for p in manifest["path"]:
        r = _relative(p, root)
        if r is None:
            raise ManifestError(f"{p} is not under the data root {root}; cannot export a relative path") from None
        rel.append(r)
    first = ("path", rel) if keep_paths else ("image_id", [image_id(r, salt) for r in rel])
    out = pd.DataFrame({first[0]: first[1], "label": manifest["label"].to_numpy(),
                        "target": manifest["target"].to_numpy(), "patient": manifest["patient"].to_numpy(),
                        "split": manifest["split"].to_numpy()})
    if "content_hash" in manifest.columns and manifest["content_hash"].notna().all():
        out["content_id"] = [content_id(d, salt) for d in manifest["content_hash"]]
    if "labeled" in manifest.columns:  # data.label_fraction / label_count: which training rows kept their label
        out["labeled"] = manifest["labeled"].to_numpy()
    bad = [p for p in out["patient"] if not re.fullmatch(r"p_[0-9a-f]{16}", str(p))]
    if bad:  # never export what could be a raw ID
        raise ManifestError(f"export_manifest: patient column holds {len(bad)} value(s) that are not salted hashes")
    return out


# ------------------------------------------------------------------------------------- redaction
REDACTED_ROOT = "<data root>"
_TOKEN = re.compile(r"[^\s'\"`<>|,;()\[\]{}]+")
_STOP = " \t:,;)]}>'\""  # where a path in a message may end (it may hold spaces)
_FILE_NAME = re.compile(r"[^/]+\.[A-Za-z][A-Za-z0-9]{1,4}")  # a bare name such as MRN123_1.png
_MAX_INDEXED = 500_000


class _Redactor:
    """Replaces paths under one data root in texts; the file-name index is built once, when needed."""

    def __init__(self, root) -> None:
        given = os.path.expanduser(str(root))
        self.root = Path(given).resolve()
        self.salt = patient_salt()
        forms = {given, os.path.abspath(given), str(self.root), os.path.realpath(given)}
        forms = sorted({f.rstrip("/") for f in forms if f.rstrip("/") not in ("", ".", "..")}, key=len, reverse=True)
        self.prefixed = (re.compile(r"(?<![\w.~/-])(?:" + "|".join(re.escape(f) for f in forms) + r")(/[^\n'\"`<>|]*)")
                         if forms else None)
        self._names: Optional[dict[str, list[str]]] = None

    def hashed(self, rel: str) -> str:
        return f"{REDACTED_ROOT}/{image_id(rel.strip('/'), self.salt)}"

    def names(self) -> dict[str, list[str]]:
        """File name -> relative paths of every file under the root with that name."""
        if self._names is None:
            self._names = {}
            n = 0
            for dirpath, _, filenames in os.walk(self.root):  # a missing root lists nothing
                for name in filenames:
                    rel = Path(dirpath, name).relative_to(self.root).as_posix()
                    self._names.setdefault(name, []).append(rel)
                n += len(filenames)
                if n >= _MAX_INDEXED:
                    break
        return self._names

    def _under_root(self, rel: str) -> bool:
        """Whether ``rel`` names an existing file or folder under the root (not the root itself)."""
        if not rel.strip("/"):
            return False
        try:
            full = os.path.normpath(self.root / rel)
            return full.startswith(str(self.root).rstrip("/") + "/") and os.path.lexists(full)
        except (OSError, ValueError):
            return False

    def _prefixed(self, match: re.Match) -> str:
        tail = match.group(1)
        # The longest stretch that names an existing path (file names may hold spaces), else up to the first stop.
        cuts = sorted({i for i, c in enumerate(tail) if c in _STOP} | {len(tail)}, reverse=True)
        end = next((cut for cut in cuts if self._under_root(tail[:cut].rstrip(".").lstrip("/"))), cuts[-1])
        path = tail[:end].rstrip(".")
        if not path.strip("/"):  # the root itself: not patient data, and logged as a param anyway
            return match.group(0)[:len(match.group(0)) - len(tail)] + self._sub_prefixed(tail)
        return self.hashed(path.lstrip("/")) + self._sub_prefixed(tail[len(path):])

    def _sub_prefixed(self, text: str) -> str:
        return self.prefixed.sub(self._prefixed, text) if self.prefixed is not None else text

    def _relative(self, match: re.Match) -> str:
        token = match.group(0)
        if token.startswith(("i_", "p_", "c_")):  # already a hash
            return token
        stripped = token.rstrip(".:")
        rest = token[len(stripped):]
        if ("/" in stripped or "." in stripped) and not stripped.startswith("/") and self._under_root(stripped):
            return self.hashed(stripped) + rest
        if "/" not in stripped and _FILE_NAME.fullmatch(stripped):
            found = self.names().get(stripped)
            if found:
                return self.hashed(found[0] if len(found) == 1 else stripped) + rest
        return token

    def __call__(self, text) -> str:
        if text is None:
            return text
        text = str(text)
        return _TOKEN.sub(self._relative, self._sub_prefixed(text))


def redact_paths(text: str, root) -> str:
    """``text`` with every path under the data ``root`` replaced by ``<data root>/i_<hash>`` (the file's
    :func:`image_id`, as in the logged split manifest and quarantine list).

    Absolute paths (the root as given, absolute or resolved), paths relative to the root and bare
    file names of files under the root are replaced; the root itself and other paths are kept. For
    messages that are logged (the ``medtricks.error`` tag, ``state.json``): file names often hold
    patient IDs. Example::

        redact_paths("BadImageError: /data/cxr/NORMAL/MRN123_1.png: truncated", "/data/cxr")
        # 'BadImageError: <data root>/i_3f0c9a6b1d2e4f70: truncated'

    Fails closed: if the text cannot be checked (no salt, an unreadable root) the whole text is withheld.
    """
    try:
        return _Redactor(root)(text)
    except Exception as err:  # noqa: BLE001 - called while reporting another error: never raise, never leak
        return f"[message withheld: its paths could not be redacted ({type(err).__name__})]"


def export_quarantine(quarantine: pd.DataFrame, root) -> pd.DataFrame:
    """The copy of a quarantine list (``path``, ``label``, ``reason``) that is safe to log: ``image_id``
    (:func:`image_id`, as in the split manifest), ``label`` and ``reason`` with paths redacted
    (:func:`redact_paths`). A path outside the root gets the hash of its absolute path."""
    redact = _Redactor(root)
    ids = []
    for p in quarantine["path"]:
        rel = _relative(p, redact.root)
        ids.append(image_id(rel if rel is not None else os.path.abspath(str(p)), redact.salt))
    out = pd.DataFrame({"image_id": ids})
    if "label" in quarantine.columns:
        out["label"] = quarantine["label"].to_numpy()
    out["reason"] = [redact(r) for r in quarantine["reason"]] if "reason" in quarantine.columns else ""
    return out


def split_summary(manifest: pd.DataFrame, classes) -> pd.DataFrame:
    """Images per split x class, plus totals and patients per split (for reports and logs)."""
    table = pd.crosstab(manifest["split"], pd.Categorical(manifest["label"], categories=list(classes)),
                        dropna=False)
    table.columns = [str(c) for c in table.columns]
    table = table.reindex([s for s in SPLITS if s in table.index])
    table["total"] = table.sum(axis=1)
    table["patients"] = manifest.groupby("split")["patient"].nunique().reindex(table.index).astype(int)
    return table


__all__ = ["build_manifest", "export_manifest", "export_quarantine", "redact_paths", "image_id", "content_id",
           "folder_id",
           "hash_patient", "patient_salt", "split_summary", "MANIFEST_COLUMNS", "REDACTED_ROOT"]
