"""Exceptions of the data layer. Each names the file / key / value at fault and what was expected."""

from __future__ import annotations

from pathlib import Path

from medtricks.errors import MedtricksError


class DataError(MedtricksError, ValueError):
    """Base class of every data-layer error (a ``ValueError``, so generic handlers still catch it)."""


class CardError(DataError):
    """A data card that cannot be found or does not follow the schema."""


class BadImageError(DataError):
    """One image file that cannot be used: missing, empty, truncated, undecodable, constant, NaN...

    ``path`` and ``problem`` are kept as attributes so callers can build a quarantine list.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ManifestError(DataError):
    """Labels, patients, paths or splits that do not fit the card (names the files and values)."""


class LeakageError(DataError):
    """The same patient, or the same image bytes, in more than one split.

    ``files`` lists every offending file path (the message shows the first few).
    """

    def __init__(self, message: str, files: list[str]):
        self.files = list(files)
        super().__init__(message)


class UnseenLabelWarning(UserWarning):
    """Raw labels a card does not name were mapped or left out by its ``unknown_labels`` policy (counted in the
    manifest's notes); the message lists them with their counts."""
