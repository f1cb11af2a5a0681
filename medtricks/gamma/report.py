"""The report returned by every BN-gamma function: one row per norm layer that was set."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

from medtricks.errors import ConfigError

__all__ = ["GammaReport", "GammaNoEffectWarning", "REPORT_COLUMNS"]

REPORT_COLUMNS: tuple[str, ...] = ("name", "stage", "block", "old_gamma_mean", "new_gamma", "old_beta_mean", "new_beta")

# Longest summary(); MLflow caps param values (500 chars in older servers), so stay well below.
_SUMMARY_MAX_CHARS = 250


class GammaNoEffectWarning(UserWarning):
    """A BN-gamma selection matched no layer, so the model was left unchanged."""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class GammaReport:
    """What a BN-gamma strategy changed: a list of row dicts, printable as a table.

    Each row has ``name`` (qualified norm layer name), ``stage`` and ``block`` (``None`` for a
    norm outside any residual block, e.g. picked by a name pattern), ``old_gamma_mean``,
    ``new_gamma``, ``old_beta_mean`` and ``new_beta`` (``None`` when β was kept).

    Example:
        >>> r = GammaReport([{"name": "layer4.1.bn2", "stage": 3, "block": 1, "old_gamma_mean": 0.8,
        ...                   "new_gamma": 0.0, "old_beta_mean": 0.1, "new_beta": 0.0}], strategy="zero_late")
        >>> len(r), r.summary()
        (1, 'zero_late: 1 layers; gamma=0 beta=0 x1 (layer4.1.bn2)')
    """

    #: the columns ``str()`` prints (a subclass may leave some out, e.g. LayerScale has no beta)
    shown_columns: tuple[str, ...] = REPORT_COLUMNS

    def __init__(self, rows: list[dict[str, Any]] | None = None, *, strategy: str = "custom") -> None:
        self.rows: list[dict[str, Any]] = []
        self.strategy = strategy
        for row in rows or []:
            missing = [c for c in REPORT_COLUMNS if c not in row]
            if missing:
                raise ConfigError(f"GammaReport row {row!r} lacks the columns {missing}")
            self.rows.append({c: row[c] for c in REPORT_COLUMNS})

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"GammaReport(strategy={self.strategy!r}, layers={len(self)})"

    @property
    def names(self) -> list[str]:
        """Qualified names of the norm layers that were set, in report order."""
        return [row["name"] for row in self.rows]

    def merged(self, other: "GammaReport", *, strategy: str | None = None) -> "GammaReport":
        """Net effect of ``self`` then ``other``: one row per layer, old values from its first
        appearance, new values from its last (so later rules override earlier ones)."""
        by_name: dict[str, dict[str, Any]] = {}
        for row in self.rows + other.rows:
            if row["name"] in by_name:
                first = by_name[row["name"]]
                new_beta = row["new_beta"] if row["new_beta"] is not None else first["new_beta"]
                first.update(new_gamma=row["new_gamma"], new_beta=new_beta)
            else:
                by_name[row["name"]] = dict(row)
        return GammaReport(list(by_name.values()), strategy=strategy or self.strategy)

    def __str__(self) -> str:
        if not self.rows:
            return f"{self.strategy}: no layers changed"
        columns = self.shown_columns
        table = [list(columns)] + [
            [("keep" if c == "new_beta" and row[c] is None else _fmt(row[c])) for c in columns] for row in self.rows
        ]
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        lines = []
        for k, line in enumerate(table):
            # Left-align names, right-align numbers.
            cells = [line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def summary(self) -> str:
        """One short line (<= 250 characters) for an MLflow param, e.g.
        ``"zero_late: 2 layers; gamma=0 beta=0 x2 (layer4.0.bn2, layer4.1.bn2)"``."""
        if not self.rows:
            return f"{self.strategy}: no layers changed"
        groups: dict[str, list[str]] = {}
        for row in self.rows:
            beta = "" if row["new_beta"] is None else f" beta={row['new_beta']:g}"
            groups.setdefault(f"gamma={row['new_gamma']:g}{beta}", []).append(row["name"])
        parts = []
        for key, names in groups.items():
            shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
            parts.append(f"{key} x{len(names)} ({shown})")
        text = f"{self.strategy}: {len(self.rows)} layers; " + "; ".join(parts)
        if len(text) > _SUMMARY_MAX_CHARS:
            text = text[: _SUMMARY_MAX_CHARS - 3] + "..."
        return text

    def to_csv(self, path: str | Path) -> Path:
        """Write the rows to ``path`` (parents created); empty cells for ``None``. Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(REPORT_COLUMNS))
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        return path

    def to_dataframe(self):
        """The rows as a ``pandas.DataFrame`` (columns in :data:`REPORT_COLUMNS` order)."""
        import pandas as pd  # lazy: pandas is only needed here

        return pd.DataFrame(self.rows, columns=list(REPORT_COLUMNS))
