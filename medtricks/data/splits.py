"""Patient-level, stratified splits and the leakage check that runs before any training.

Splits group by patient (no patient in two splits) and keep class proportions close, with
scikit-learn's ``StratifiedGroupKFold``. A split the data already declares (a split column, split
folders or split lists) is honoured; only the splits it lacks are carved out of the rest.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from medtricks.errors import ConfigError
from medtricks.data.errors import LeakageError, ManifestError

# Finer folds give fractions close to the one asked for (k of 20 folds = steps of 5 %).
_MAX_FOLDS = 20


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ConfigError(f"{name}={value!r}: expected a number in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:.3g} leaves no training data; "
            "expected a sum below 1"
        )


def _folds_for(fraction: float, max_folds: int) -> tuple[int, int]:
    """(n_splits, k): hold out k of n_splits folds, k/n_splits within 1 % of ``fraction`` when possible.

    The fewest folds that reach that precision: StratifiedGroupKFold's cost grows with n_splits.
    """
    best = None
    for n in range(2, max(max_folds, 2) + 1):
        k = min(max(int(round(fraction * n)), 1), n - 1)
        err = abs(k / n - fraction)
        if best is None or err < best[0] - 1e-12:
            best = (err, n, k)
        if err <= 0.01:
            break
    return best[1], best[2]


def _carve(
    indices: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int, what: str
) -> np.ndarray:
    """Indices (a subset of ``indices``) holding about ``fraction`` of them, whole patients only."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups[indices]))
    if n_groups < 2:
        raise ManifestError(
            f"cannot carve a {what} split: only {n_groups} patient(s) in the pool; "
            "a patient-level split needs at least 2"
        )
    # sklearn refuses more folds than the largest class has members (tiny sets).
    largest_class = int(np.unique(labels[indices], return_counts=True)[1].max())
    if largest_class < 2:  # one image per class: nothing to stratify, plain group shuffle
        from sklearn.model_selection import GroupShuffleSplit

        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        _, held_idx = next(splitter.split(indices, groups=groups[indices]))
        return np.sort(indices[held_idx])
    n_splits, k = _folds_for(fraction, min(_MAX_FOLDS, n_groups, max(largest_class, 2)))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    held = []
    with warnings.catch_warnings():
        # "The least populated class has only N members": expected on small sets; stratification is best-effort.
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held_idx) in enumerate(splitter.split(indices, labels[indices], groups[indices])):
            if fold >= k:
                break
            held.append(indices[held_idx])
    return np.sort(np.concatenate(held))


TEST_BY = ("random", "id_order")
_DIGITS = re.compile(r"\d+")


def _carve_by_id_order(indices: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the *lowest-numbered* patients of every (class, ID series), about ``fraction`` of each.

    A series is the patient ID with its digits masked (``IM-0115`` and ``NORMAL2-IM-0383`` are two
    series); within a series patients are ordered by the numbers in their ID. Where IDs are issued in
    acquisition order this holds out the earliest patients of every acquisition batch: a temporal,
    acquisition-shifted test split instead of a random one. A patient's class is its most frequent label.
    """
    pool_groups = groups[indices]
    series: dict[tuple[str, str], list[str]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    label_of: dict[str, str] = {}
    for g in np.unique(pool_groups):
        g_labels, g_counts = np.unique(labels[indices][pool_groups == g], return_counts=True)
        label_of[g] = str(g_labels[np.argmax(g_counts)])
        counts[g] = int(g_counts.sum())
        series[(label_of[g], _DIGITS.sub("#", g))].append(g)
    held_groups: set[str] = set()
    for members in series.values():
        members.sort(key=lambda g: ([int(d) for d in _DIGITS.findall(g)], g))
        target, taken = fraction * sum(counts[g] for g in members), 0
        for g in members:
            if taken >= target or len(held_groups & set(members)) >= len(members) - 1:
                break  # keep at least one patient of every series for training
            held_groups.add(g)
            taken += counts[g]
    if not held_groups:
        raise ManifestError(
            f"test_by=id_order: a test fraction of {fraction:.3g} holds out no patient; "
            "raise the fraction or use test_by=random"
        )
    return np.sort(indices[np.isin(pool_groups, sorted(held_groups))])


def assign_splits(
    labels: Sequence,
    groups: Sequence,
    explicit: Optional[Sequence] = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    test_by: str = "random",
) -> np.ndarray:
    """Split names ('train' | 'val' | 'test') per row, grouped by ``groups`` (patients).

    ``explicit`` holds a split the data declares per row (or None / '' where it declares none).
    For 'test' then 'val': if any row declares it, the declaration is honoured; otherwise that split
    is carved (by patient, stratified by label) from the rows declared 'train' or undeclared, taking
    ``test_fraction`` / ``val_fraction`` of that pool. ``seed`` drives only this choice.
    ``test_by="id_order"`` carves test from the lowest-numbered patients of each class and ID series
    instead (see :func:`_carve_by_id_order`); validation stays a random patient-level split.

    Example::

        assign_splits(["a", "a", "b", "b"], ["p1", "p1", "p2", "p3"], val_fraction=0.34)
    """
    _check_fractions(val_fraction, test_fraction)
    if test_by not in TEST_BY:
        raise ConfigError(f"test_by={test_by!r}: expected one of {TEST_BY}")
    labels = np.asarray(labels).astype(str)
    groups = np.asarray(groups).astype(str)
    n = len(labels)
    if len(groups) != n:
        raise ConfigError(f"labels ({n}) and groups ({len(groups)}) differ in length")
    declared = np.array(
        [
            "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
            for v in (explicit if explicit is not None else [None] * n)
        ],
        dtype=object,
    )
    bad = sorted(set(declared) - {"", "train", "val", "test"})
    if bad:
        raise ManifestError(f"unknown split value(s) {bad}; expected train, val or test")
    out = np.where(declared == "", "train", declared).astype(object)
    pool = np.flatnonzero((declared == "") | (declared == "train"))
    pool_size = len(pool)
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if (declared == split).any() or fraction <= 0 or pool_size == 0:
            continue
        # Relative to what is left, so val is val_fraction of the whole pool, not of pool minus test.
        remaining = len(pool) / pool_size
        share = min(fraction / remaining, 0.95)
        if split == "test" and test_by == "id_order":
            held = _carve_by_id_order(pool, labels, groups, share)
        else:
            held = _carve(pool, labels, groups, share, seed, split)
        out[held] = split
        pool = np.setdiff1d(pool, held)
    return out.astype(str)


def labeled_subset(
    labels: Sequence, groups: Sequence, *, fraction: Optional[float] = None, count: Optional[int] = None, seed: int = 0
) -> np.ndarray:
    """Which rows keep their label when only ``fraction`` (or ``count`` images) of a pool is labelled:
    a boolean mask, whole patients only, stratified by class (issue 17, ``data.label_fraction``).

    Every patient gets its most frequent label; within each class the patients are shuffled with
    ``seed`` and taken in that order until the class holds ``fraction`` of its images (``count``:
    the class's share of ``count``, largest-remainder rounding), at least one patient per class. The
    same labels, groups and seed give the same subset; another seed another one. A patient with
    several images is kept or left whole, so the kept count can exceed the target by one patient.

    Example::

        mask = labeled_subset(["a", "a", "b", "b"], ["p1", "p2", "p3", "p4"], fraction=0.5, seed=0)
    """
    labels = np.asarray(labels).astype(str)
    groups = np.asarray(groups).astype(str)
    n = len(labels)
    if len(groups) != n:
        raise ConfigError(f"labels ({n}) and groups ({len(groups)}) differ in length")
    if (fraction is None) == (count is None):
        raise ConfigError("labeled_subset needs exactly one of fraction (0 < f <= 1) or count (>= 1)")
    if fraction is not None and not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"label_fraction={fraction!r}: expected a number in (0, 1]")
    if count is not None and not 1 <= int(count):
        raise ConfigError(f"label_count={count!r}: expected an integer >= 1")
    if count is not None and count > n:
        raise ConfigError(f"label_count={count} is more than the {n} training images")
    if n == 0:
        return np.zeros(0, dtype=bool)
    patient_label: dict[str, str] = {}
    patient_size: dict[str, int] = defaultdict(int)
    for g in np.unique(groups):
        g_labels, g_counts = np.unique(labels[groups == g], return_counts=True)
        patient_label[g] = str(g_labels[np.argmax(g_counts)])
    for g in groups:
        patient_size[g] += 1
    classes = sorted(set(patient_label.values()))
    images = {c: sum(patient_size[g] for g in patient_label if patient_label[g] == c) for c in classes}
    if fraction is not None:
        target = {c: fraction * images[c] for c in classes}
    else:  # largest remainder: the per-class targets sum to count
        exact = {c: count * images[c] / n for c in classes}
        target = {c: int(np.floor(v)) for c, v in exact.items()}
        for c in sorted(classes, key=lambda c: (-(exact[c] - target[c]), c))[: count - sum(target.values())]:
            target[c] += 1
    rng = np.random.default_rng([int(seed) % (2**32), 17])  # not the split's stream
    kept: set[str] = set()
    for c in classes:
        members = sorted(g for g in patient_label if patient_label[g] == c)
        taken = 0
        for i in rng.permutation(len(members)):
            if taken >= target[c] and taken > 0:
                break
            kept.add(members[i])
            taken += patient_size[members[i]]
    return np.isin(groups, sorted(kept))


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """Content hash of one file (BLAKE2b, 128 bit, hex) — the key of duplicate checks and the decode cache."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _content_hashes(manifest) -> dict[str, str]:
    """path -> content hash; from the manifest's ``content_hash`` column, else computed for same-size files."""
    if "content_hash" in manifest.columns and manifest["content_hash"].notna().all():
        return dict(zip(manifest["path"], manifest["content_hash"]))
    by_size = defaultdict(list)
    for path in manifest["path"]:
        try:
            by_size[os.stat(path).st_size].append(path)
        except OSError as err:
            raise LeakageError(f"leakage check cannot read {path}: {err.strerror}", [path]) from None
    # Only files sharing a byte size can be identical: hash just those.
    return {p: file_digest(p) for paths in by_size.values() if len(paths) > 1 for p in paths}


def check_leakage(manifest, *, max_listed: int = 10) -> None:
    """Raise :class:`LeakageError` if a patient, or identical image bytes, appear in two splits.

    ``manifest`` needs ``path``, ``patient`` and ``split`` columns (a ``content_hash`` column is
    used when present, else same-size files are hashed). The message names the offending files;
    ``err.files`` lists all of them.
    """
    missing = {"path", "patient", "split"} - set(manifest.columns)
    if missing:
        raise ConfigError(f"check_leakage needs manifest columns {sorted(missing)}; got {list(manifest.columns)}")
    problems: list[str] = []
    files: list[str] = []

    splits_per_patient = manifest.groupby("patient", sort=True)["split"].nunique()
    leaky = splits_per_patient[splits_per_patient > 1].index
    if len(leaky):
        problems.append(f"{len(leaky)} patient(s) appear in more than one split:")
        for patient in leaky:
            rows = manifest[manifest["patient"] == patient]
            files.extend(rows["path"])
            if len(problems) <= max_listed:
                where = "; ".join(
                    f"{s}: {', '.join(rows.loc[rows['split'] == s, 'path'].head(3))}"
                    for s in sorted(rows["split"].unique())
                )
                problems.append(f"  patient {patient} -> {where}")

    digests = _content_hashes(manifest)
    by_digest = defaultdict(list)
    for path, split in zip(manifest["path"], manifest["split"]):
        if path in digests:
            by_digest[digests[path]].append((path, split))
    dupes = [entries for entries in by_digest.values() if len({s for _, s in entries}) > 1]
    if dupes:
        problems.append(f"{len(dupes)} identical image(s) (same bytes) appear in more than one split:")
        for i, entries in enumerate(dupes):
            files.extend(p for p, _ in entries)
            if i < max_listed:
                problems.append("  same bytes: " + ", ".join(f"{p} ({s})" for p, s in entries[:4]))
    if problems:
        raise LeakageError(
            "split leakage found (fix the data or the card's patient rule):\n" + "\n".join(problems), sorted(set(files))
        )


def _same_size_digests(paths) -> dict[str, str]:
    """path -> content hash for the files that share their byte size with another (only those can be
    identical); files that cannot be read are left out (the image scan reports them)."""
    by_size = defaultdict(list)
    for path in paths:
        try:
            by_size[os.stat(path).st_size].append(path)
        except OSError:
            continue
    digests = {}
    for group in by_size.values():
        if len(group) < 2:
            continue
        for path in group:
            try:
                digests[path] = file_digest(path)
            except OSError:
                continue
    return digests


def conflicting_duplicates(manifest) -> list[list[tuple[str, str, str]]]:
    """Groups of files with identical bytes but different labels, as ``(path, label, split)`` sorted by path.

    One image filed under two classes is a labelling error (or a copy that a model sees with both
    answers). Uses the manifest's ``content_hash`` column when complete, else hashes only files that
    share a byte size (stat first: no other file is read). ``split`` is '' when the manifest has none.
    """
    if "content_hash" in manifest.columns and manifest["content_hash"].notna().all():
        digests = dict(zip(manifest["path"], manifest["content_hash"]))
    else:
        digests = _same_size_digests(list(manifest["path"]))
    splits = manifest["split"] if "split" in manifest.columns else [""] * len(manifest)
    groups: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for path, label, split in zip(manifest["path"], manifest["label"], splits):
        if path in digests:
            groups[digests[path]].append((str(path), str(label), str(split)))
    found = [sorted(g) for g in groups.values() if len({label for _, label, _ in g}) > 1]
    return sorted(found)


def duplicate_groups(manifest) -> list[list[str]]:
    """Groups of files with identical bytes (any split), for reports."""
    digests = _content_hashes(manifest)
    groups = defaultdict(list)
    for path, digest in digests.items():
        groups[digest].append(path)
    return [sorted(g) for g in groups.values() if len(g) > 1]


# ------------------------------------------------------------------------------------ data fingerprint
FINGERPRINT_VERSION = 1
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def _relative_posix(path, root) -> str:
    """``path`` relative to ``root`` (POSIX), the link path first; the absolute path if it is not under it."""
    for candidate in (os.path.abspath(os.path.expanduser(str(path))), os.path.realpath(str(path))):
        rel = os.path.relpath(candidate, root)
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return str(path)


def split_fingerprint(manifest, root, unlabeled=None) -> dict:
    """What a resumed run checks its data against: per split, the number of rows and a SHA-256 over its
    rows sorted by path.

    A row is (path relative to ``root``, label, content hash of the image bytes, patient group, labelled
    flag). The content hash is the image scan's ``content_hash`` (every file is read by that scan anyway),
    so an image replaced under the same name counts as a change; modification times are left out on
    purpose (a copy or ``touch`` changes them, not the data). The patient group is the patient's rank of
    first appearance in the sorted split, not its salted hash: the fingerprint is the same on every
    machine (the hash salt is per machine) and holds nothing derived from a patient ID. ``unlabeled``
    (rows with ``content_hash``: the unlabelled pool of ``data.unlabeled``) adds an ``unlabeled`` entry
    hashed over its sorted content hashes. Nothing in the fingerprint can be read back as a path or an ID.
    """
    root = os.path.realpath(os.path.expanduser(str(root)))
    digests = manifest["content_hash"] if "content_hash" in manifest.columns else [None] * len(manifest)
    labeled = manifest["labeled"] if "labeled" in manifest.columns else [None] * len(manifest)
    rows: dict[str, list[tuple[str, str, str, str, str]]] = defaultdict(list)
    for path, label, patient, split, digest, kept in zip(
        manifest["path"], manifest["label"], manifest["patient"], manifest["split"], digests, labeled
    ):
        flag = "" if kept is None else str(int(bool(kept)))
        rows[str(split)].append((_relative_posix(path, root), str(label), str(digest or ""), str(patient), flag))
    splits: dict[str, dict] = {}
    for split in sorted(rows, key=lambda s: (_SPLIT_ORDER.get(s, 9), s)):
        h = hashlib.sha256()
        groups: dict[str, int] = {}
        for rel, label, digest, patient, flag in sorted(rows[split]):
            group = groups.setdefault(patient, len(groups))
            h.update(f"{rel}\t{label}\t{digest}\t{group}\t{flag}\n".encode())
        splits[split] = {"n": len(rows[split]), "sha256": h.hexdigest()}
    if unlabeled is not None and len(unlabeled):
        h = hashlib.sha256()
        for digest in sorted(str(d or "") for d in unlabeled["content_hash"]):
            h.update(f"{digest}\n".encode())
        splits["unlabeled"] = {"n": len(unlabeled), "sha256": h.hexdigest()}
    return {"version": FINGERPRINT_VERSION, "splits": splits}


def changed_splits(stored: dict, current: dict) -> list[str]:
    """The splits (``train``, ``val``, ``test``, ``unlabeled``) whose fingerprints differ."""
    a, b = stored.get("splits", {}), current.get("splits", {})
    return [s for s in sorted(set(a) | set(b), key=lambda s: (_SPLIT_ORDER.get(s, 9), s)) if a.get(s) != b.get(s)]


def describe_data_changes(
    stored: dict,
    current: dict,
    *,
    stored_rows=None,
    current_rows=None,
    names: Optional[dict] = None,
    max_listed: int = 3,
) -> str:
    """What changed between two fingerprints, one clause per split: ``val: 9 -> 7 images (2 removed, 0
    added; removed e.g. i_3f.. (no longer in the data), ...)``.

    ``stored_rows`` / ``current_rows``: exported split manifests (``image_id``, ``label``, ``split``, and
    ``content_id`` when both have it) that name the rows; ``names`` maps an ``image_id`` of the current
    data to its relative path. Without them (or when the stored IDs were salted on another machine)
    only the counts are given."""
    names = names or {}
    a, b = stored.get("splits", {}), current.get("splits", {})
    rows_known = (
        stored_rows is not None
        and current_rows is not None
        and bool(set(stored_rows["image_id"]) & set(current_rows["image_id"]))
    )
    clauses = []
    for split in changed_splits(stored, current):
        n_old, n_new = a.get(split, {}).get("n", 0), b.get(split, {}).get("n", 0)
        head = f"{split}: {n_old} -> {n_new} images"
        if not rows_known or split == "unlabeled":
            clauses.append(f"{head}, other contents")
            continue
        old = stored_rows[stored_rows["split"] == split].set_index("image_id")
        new = current_rows[current_rows["split"] == split].set_index("image_id")
        moved_to = dict(zip(current_rows["image_id"], current_rows["split"]))
        # images gone from the data first (what a user deleted), then those moved to another split; by name
        removed = sorted(set(old.index) - set(new.index), key=lambda i: (i in moved_to, names.get(i, i)))
        added = sorted(set(new.index) - set(old.index), key=lambda i: names.get(i, i))
        both = sorted(set(old.index) & set(new.index), key=lambda i: names.get(i, i))
        relabelled = [i for i in both if str(old.at[i, "label"]) != str(new.at[i, "label"])]
        rewritten = [
            i
            for i in both
            if "content_id" in old.columns
            and "content_id" in new.columns
            and str(old.at[i, "content_id"]) != str(new.at[i, "content_id"])
        ]

        def shown(ids, what):
            listed = [
                names.get(i, f"{i} (no longer in the data)")
                + (f" (now in {moved_to[i]})" if what == "removed" and i in moved_to else "")
                for i in ids[:max_listed]
            ]
            return f"{what} e.g. " + ", ".join(listed) + (", ..." if len(ids) > max_listed else "")

        gone = sum(i not in moved_to for i in removed)
        counts = [
            f"{len(removed)} removed" + (f" ({gone} no longer in the data)" if gone else ""),
            f"{len(added)} added",
        ]
        examples = [shown(removed, "removed")] if removed else []
        examples += [shown(added, "added")] if added else []
        if relabelled:
            counts.append(f"{len(relabelled)} relabelled")
            examples.append(shown(relabelled, "relabelled"))
        if rewritten:
            counts.append(f"{len(rewritten)} with other image bytes")
            examples.append(shown(rewritten, "rewritten"))
        if not (removed or added or relabelled or rewritten):
            counts = ["the same files and labels; image bytes or patient grouping differ"]
        clauses.append(f"{head} ({', '.join(counts)}" + (f"; {'; '.join(examples)}" if examples else "") + ")")
    return "; ".join(clauses)


def rows_fingerprint(rows) -> dict:
    """A fingerprint of an exported split manifest (``image_id``, ``label``, ``split``): per split, the count
    and a SHA-256 over its sorted (image ID, label) pairs. The IDs are salted per machine, so two of these
    compare only on one machine (a checkpoint older than :func:`split_fingerprint` is checked this way)."""
    by_split: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for image, label, split in zip(rows["image_id"], rows["label"], rows["split"]):
        by_split[str(split)].append((str(image), str(label)))
    splits = {}
    for split in sorted(by_split, key=lambda s: (_SPLIT_ORDER.get(s, 9), s)):
        h = hashlib.sha256()
        for image, label in sorted(by_split[split]):
            h.update(f"{image}\t{label}\n".encode())
        splits[split] = {"n": len(by_split[split]), "sha256": h.hexdigest()}
    return {"version": 0, "splits": splits}
