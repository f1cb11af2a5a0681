"""Markdown tables and the number formats every printed comparison shares.

Plain strings in, plain strings out (no numpy types needed): a value that is missing, not a number
or not finite prints as ``-``, so a table never shows ``nan``.

Example::

    >>> print(markdown_table(["metric", "Δ [95% CI]"], [["auroc", fmt_delta_ci(0.012, -0.003, 0.027)]]))
    | metric | Δ [95% CI]                 |
    |--------|----------------------------|
    | auroc  | +0.0120 [-0.0030, +0.0270] |
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["markdown_table", "as_finite", "is_finite", "fmt_num", "fmt_signed", "fmt_p", "fmt_mean_ci", "fmt_delta_ci"]


def as_finite(value: Any) -> Optional[float]:
    """``value`` as a finite float, or None (missing, not a number, nan/inf) so a cell shows "-"."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def is_finite(value: Any) -> bool:
    return as_finite(value) is not None


def fmt_num(value: Any, digits: int = 4) -> str:
    value = as_finite(value)
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_signed(value: Any) -> str:
    value = as_finite(value)
    return "-" if value is None else f"{value:+.4f}"


def fmt_p(value: Any) -> str:
    """A p-value: ``<0.001`` below that, else three decimals."""
    value = as_finite(value)
    if value is None:
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def fmt_mean_ci(mean: Any, low: Any, high: Any, n: Any = None) -> str:
    """``mean [low, high]``; says "no CI" (and "1 seed" when ``n`` is 1) when the interval is missing."""
    if not is_finite(mean):
        return "-"
    if not (is_finite(low) and is_finite(high)):
        return f"{fmt_num(mean)} (no CI{', 1 seed' if n == 1 else ''})"
    return f"{fmt_num(mean)} [{fmt_num(low)}, {fmt_num(high)}]"


def fmt_delta_ci(delta: Any, low: Any, high: Any) -> str:
    """A signed difference with its interval: ``+0.0120 [-0.0030, +0.0270]``."""
    if not is_finite(delta):
        return "-"
    if not (is_finite(low) and is_finite(high)):
        return f"{fmt_signed(delta)} (no CI)"
    return f"{fmt_signed(delta)} [{fmt_signed(low)}, {fmt_signed(high)}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown pipe table, columns padded so it also reads well in a terminal."""
    cells = [[str(c).replace("|", "\\|") for c in header]] + [[str(c).replace("|", "\\|") for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)
