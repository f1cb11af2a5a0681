"""Atomic file writes: write a temporary file next to the target, then rename it over the target.

A crash mid-write keeps the previous good file; a failed write (a full disk) removes the temporary
file and raises. Temporary names are unique (``.<name>.<random>.tmp``, created exclusively beside the
target), so a file or folder that happens to be called ``<name>.tmp`` is never touched, and two writers
of one target never share a temporary file.

:func:`atomic_paths` writes several files as a set (a CSV and its bad-file list): either all of them
are replaced or none is. :func:`write_csvs` writes data frames that way, with every text cell made safe
for spreadsheets (:func:`csv_safe`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Mapping

__all__ = ["atomic_path", "atomic_paths", "temp_path", "write_bytes", "csv_safe", "write_csvs", "FORMULA_PREFIXES"]


def temp_path(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new, empty file ``.<name>.<random><suffix>`` beside ``path``, created exclusively (never an
    existing file), with the permissions a plain ``open(path, "w")`` would give."""
    path = Path(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")  # pragma: no cover - 100 random collisions


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write (a new empty file beside ``path``, see :func:`temp_path`); on
    success it replaces ``path``, on any error it is removed (and ``path`` is left as it was)."""
    with atomic_paths(path, suffix=suffix) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*paths: str | Path, suffix: str = ".tmp") -> Iterator[list[Path]]:
    """Yield one temporary path per target (see :func:`temp_path`); when the block succeeds they replace
    the targets together: if any rename fails, the targets already replaced get their previous content
    back (or are removed when they did not exist), so either all targets are new or none is. On any
    error every temporary file is removed and the error is raised."""
    targets = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for target in targets:
            tmps.append(temp_path(target, suffix))
        yield tmps
        _replace_all(tmps, targets)
    except BaseException:
        for tmp in tmps:
            _unlink(tmp)
        raise


def _replace_all(tmps: list[Path], targets: list[Path]) -> None:
    if len(targets) == 1:
        os.replace(tmps[0], targets[0])
        return
    backups: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        for target in targets:  # keep the previous content under a second name (a hard link: no copy)
            if target.is_file():
                backup = temp_path(target, ".old")  # reserves a unique name of ours
                backups[target] = backup
                try:
                    os.unlink(backup)
                    os.link(target, backup)
                except OSError:  # a file system without hard links
                    shutil.copy2(target, backup)
        for tmp, target in zip(tmps, targets):
            os.replace(tmp, target)
            done.append(target)
    except BaseException:
        for target in done:  # roll back: the previous content, or nothing where there was none
            with contextlib.suppress(OSError):
                if target in backups:
                    os.replace(backups.pop(target), target)
                else:
                    target.unlink(missing_ok=True)
        raise
    finally:
        for backup in backups.values():
            _unlink(backup)


def write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` and flush it to the disk: a full disk is an ``OSError`` here, not later."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------- safe CSV files
#: A cell starting with one of these is read as a formula by spreadsheets (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(frame):
    """A copy of a data frame whose text cells cannot run as spreadsheet formulas: a string starting with
    ``= + - @``, a tab or a carriage return gets a leading single quote (OWASP CSV injection). Numbers are
    left alone (a negative number is data, not a formula)."""
    import pandas as pd

    out = frame.copy()
    for column in out.columns:
        if pd.api.types.is_numeric_dtype(out[column]) or pd.api.types.is_bool_dtype(out[column]):
            continue
        out[column] = out[column].map(lambda v: f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_PREFIXES) else v)
    safe_columns = [f"'{c}" if isinstance(c, str) and c.startswith(FORMULA_PREFIXES) else c for c in out.columns]
    out.columns = safe_columns
    return out


def write_csvs(frames: Mapping[str | Path, "object"], **to_csv) -> list[Path]:
    """Write data frames as CSV files (``{path: frame}``), spreadsheet-safe (:func:`csv_safe`, ``index=False``
    unless given) and as a set (:func:`atomic_paths`): every file is replaced, or none. Returns the paths."""
    to_csv.setdefault("index", False)
    paths = [Path(p) for p in frames]
    with atomic_paths(*paths) as tmps:
        for tmp, frame in zip(tmps, frames.values()):
            with open(tmp, "w", newline="") as fh:
                csv_safe(frame).to_csv(fh, **to_csv)
                fh.flush()
                os.fsync(fh.fileno())
    return paths
