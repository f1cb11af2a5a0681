"""`medtricks data check`: a plain-text report on a data set as a card reads it.

Counts per class, split and patient; image size statistics; unreadable files; duplicate images
(and identical bytes under different labels); patient / duplicate leakage across splits; rows left
out on purpose; the card's known pitfalls. Patients appear only as counts (never raw IDs); file
paths are shown relative to the root. :func:`data_check` also returns the problems found, which
make ``medtricks data check`` exit 1.
"""

from __future__ import annotations

import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtricks.data.cards import DROP, UNKNOWN_ERROR, load_card
from medtricks.data.datasets import scan_images
from medtricks.data.errors import LeakageError, UnseenLabelWarning
from medtricks.data.manifest import build_manifest, split_summary
from medtricks.data.splits import check_leakage, duplicate_groups

_LIST = 10


def _rel(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


@dataclass
class DataCheck:
    """What :func:`data_check` found: the report ``text`` and the ``problems`` that fail the check
    (unreadable files, split leakage, identical bytes under different labels unless the card allows
    them), one short phrase each; ``ok`` when there are none."""

    text: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: ``"ok"`` or the problems joined by ``"; "``."""
        return "; ".join(self.problems) if self.problems else "ok"


def data_check_report(
    card_or_path,
    root,
    *,
    split_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    progress: bool = True,
    voi: str = "auto",
    test_by: str = "random",
) -> str:
    """The text ``medtricks data check CARD_OR_PATH --root DIR`` prints (decodes every image once).

    Example::

        print(data_check_report("kermany-pneumonia", "../shared/data/kermany224/train"))
    """
    return data_check(
        card_or_path,
        root,
        split_seed=split_seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        progress=progress,
        voi=voi,
        test_by=test_by,
    ).text


def data_check(
    card_or_path,
    root,
    *,
    split_seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    progress: bool = True,
    voi: str = "auto",
    test_by: str = "random",
) -> DataCheck:
    """:func:`data_check_report` plus the list of problems (``DataCheck``); CI gates on ``.ok``."""
    card = load_card(card_or_path)
    root = Path(root).expanduser().resolve()
    with warnings.catch_warnings():  # the report lists unseen labels itself
        warnings.simplefilter("ignore", UnseenLabelWarning)
        manifest = build_manifest(
            card,
            root,
            split_seed=split_seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            on_missing="keep",
            test_by=test_by,
            on_conflicting_duplicates="keep",
            unknown_labels=DROP if card.unknown_labels == UNKNOWN_ERROR else None,
        )
    problems: list[str] = []
    good, bad = scan_images(manifest, side=None, voi=voi, progress=progress, desc="decoding images")
    notes = manifest.attrs.get("notes", {})
    out = [
        f"Data check: card '{card.name}' ({card.task}: {', '.join(card.classes)})",
        textwrap.fill(" ".join(card.description.split()), width=100, initial_indent="  ", subsequent_indent="  "),
        f"  source: {card.source}   license: {card.license}",
        f"  root: {root}",
        f"  split_seed={split_seed} val_fraction={val_fraction} test_fraction={test_fraction}"
        + (
            f" (declared by the data: {', '.join(manifest.attrs['declared_splits'])})"
            if manifest.attrs.get("declared_splits")
            else ""
        ),
        "",
        f"Images: {len(manifest)} listed, {len(good)} readable, {len(bad)} unreadable; "
        f"patients: {manifest['patient'].nunique()}",
        "",
        "Images per split and class (patients per split in the last column):",
    ]
    table = split_summary(manifest, card.classes)
    out += ["  " + line for line in table.to_string().splitlines()]
    per_patient = manifest.groupby("patient").size()
    out.append(f"  images per patient: mean {per_patient.mean():.2f}, max {int(per_patient.max())}")
    empty = [c for c in card.classes if c not in set(manifest["label"])]
    if empty:
        out.append(f"  WARNING: class(es) without any image: {', '.join(empty)}")

    out += ["", "Image sizes (decoded, H x W):"]
    if len(good):
        h, w = good["height"].astype(int).to_numpy(), good["width"].astype(int).to_numpy()
        out.append(
            f"  height min/median/max {h.min()}/{int(np.median(h))}/{h.max()}; "
            f"width min/median/max {w.min()}/{int(np.median(w))}/{w.max()}"
        )
        sizes = good.groupby(["height", "width"]).size().sort_values(ascending=False)
        common = ", ".join(f"{int(a)}x{int(b)} ({n})" for (a, b), n in sizes.head(3).items())
        out.append(f"  {len(sizes)} distinct size(s); most common: {common}; non-square: {int((h != w).sum())}")
    else:
        out.append("  (no readable image)")
    reduced = [n for n in good.get("bit_depth_note", []) if n] if len(good) else []
    if reduced:
        out.append(
            f"  {len(reduced)} 16-bit file(s) hold fewer bits and are read with the bits they use, "
            f"e.g. {_rel(reduced[0].split(': ', 1)[0], root)}: {reduced[0].split(': ', 1)[-1]}"
        )

    out += ["", f"Unreadable files: {len(bad)}"]
    if len(bad):
        problems.append(f"{len(bad)} unreadable file(s)")
    for path, reason in list(zip(bad["path"], bad["reason"]))[:_LIST]:
        out.append(f"  {_rel(path, root)}: {reason}")
    if len(bad) > _LIST:
        out.append(f"  ... and {len(bad) - _LIST} more")

    dupes = duplicate_groups(good) if len(good) else []
    out += ["", f"Identical files (same bytes): {len(dupes)} group(s)"]
    for group in dupes[:_LIST]:
        out.append("  " + ", ".join(_rel(p, root) for p in group[:4]))
    if len(dupes) > _LIST:
        out.append(f"  ... and {len(dupes) - _LIST} more group(s) (duplicates inside one split do not leak)")

    conflicting = manifest.attrs.get("conflicting_duplicates") or []
    allowed = " (allowed by the card: allow_conflicting_duplicates)" if card.allow_conflicting_duplicates else ""
    out += ["", f"Identical files with different labels: {len(conflicting)} group(s){allowed if conflicting else ''}"]
    for group in conflicting[:_LIST]:
        out.append("  " + ", ".join(f"{_rel(p, root)} ({label}, {split})" for p, label, split in group[:4]))
    if len(conflicting) > _LIST:
        out.append(f"  ... and {len(conflicting) - _LIST} more group(s)")
    if conflicting and not card.allow_conflicting_duplicates:
        problems.append(f"{len(conflicting)} group(s) of identical files with different labels")

    out += ["", "Leakage across splits:"]
    try:
        check_leakage(good)
        out.append("  none: no patient and no identical image in two splits")
    except LeakageError as err:
        out += ["  " + line.replace(str(root) + "/", "") for line in str(err).splitlines()]
        problems.append(f"split leakage ({len(err.files)} file(s))")

    unseen = manifest.attrs.get("unseen_labels") or {}
    policy = card.unknown_labels
    verb = {
        UNKNOWN_ERROR: "would stop a run (card unknown_labels: error; left out of this check)",
        DROP: "left out by the card's unknown_labels",
    }.get(policy, f"mapped to {policy!r} by the card's unknown_labels")
    out += [
        "",
        f"Raw labels the card does not name: {len(unseen)}"
        + (f" ({sum(unseen.values())} image(s) {verb})" if unseen else ""),
    ]
    if unseen and policy == UNKNOWN_ERROR:
        problems.append(
            f"{len(unseen)} raw label(s) the card does not name: add them to its label_map, label_patterns "
            "or drop, or set its unknown_labels"
        )
    out += [f"  {raw!r}: {count}" for raw, count in sorted(unseen.items(), key=lambda kv: (-kv[1], kv[0]))]

    out += ["", "Left out on purpose:"]
    out += [f"  {what}: {count}" for what, count in sorted(notes.items())] or ["  nothing"]

    out += ["", "Known pitfalls (from the card):"]
    for item in card.pitfalls or ["(none recorded)"]:
        out.append(textwrap.fill(item.strip(), width=100, initial_indent="  - ", subsequent_indent="    "))
    return DataCheck(text="\n".join(out), problems=problems)
