"""Where the files shipped beside the package live: the checkout, or a regular install's copy."""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def shipped_dir(name: str, checkout: Path = _CHECKOUT) -> Path:
    """``<checkout>/<name>`` (editable installs), else ``<prefix>/share/medtricks/<name>``.

    ``name`` is ``data_cards`` or ``recipes``; pyproject's ``data-files`` puts the copies there.
    When neither exists the checkout path is returned, so error messages point at the usual place.
    """
    in_checkout = checkout / name
    if in_checkout.is_dir():
        return in_checkout
    installed = Path(sys.prefix) / "share" / "medtricks" / name
    return installed if installed.is_dir() else in_checkout
