"""Toy data for the data-layer tests: random grey PNGs, folder and CSV collections, and their cards.

Each helper reaches the tests as a session-scoped fixture that returns it (``folder_card(layout=...)``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtricks.data import card_from_dict

CARD_BASE = {"description": "toy", "source": "https://example.org", "license": "CC0", "citation": "none"}


def _png(path: Path, seed: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return path


def _folder_card_dict(**changes) -> dict:
    card = {
        **CARD_BASE,
        "name": "toy-folder",
        "task": "binary",
        "classes": ["normal", "pneumonia"],
        "label_map": {"NORMAL": "normal", "PNEUMONIA": "pneumonia"},
        "layout": {"kind": "folder"},
        "patient": {"regex": r"^(?P<patient>person\d+)_"},
    }
    card.update(changes)
    return card


def _person_folders(root: Path, n_patients: int = 8, per_patient: int = 2, start: int = 0, seed: int = 0) -> Path:
    for p in range(start, start + n_patients):
        cls = ("NORMAL", "PNEUMONIA")[p % 2]
        for i in range(per_patient):
            _png(root / cls / f"person{p}_img{i}.png", seed + 100 * p + i, size=32)
    return root


def _csv_set(root: Path, rows: list[tuple[str, str, str]], extra_cols=None) -> Path:
    for path, _, _ in rows:
        _png(root / "imgs" / path, zlib.crc32(path.encode()))  # stable, distinct images (no identical bytes)
    df = pd.DataFrame(rows, columns=["file", "finding", "pid"])
    for name, values in (extra_cols or {}).items():
        df[name] = values
    df.to_csv(root / "meta.csv", index=False)
    return root


def _csv_card(**changes):
    card = {
        **CARD_BASE,
        "name": "toy-csv",
        "task": "multiclass",
        "classes": ["covid", "normal", "other"],
        "label_map": {"No Finding": "normal", "COVID-19": "covid", "Bacterial": "other"},
        "drop": ["todo"],
        "layout": {
            "kind": "csv",
            "tables": [{"file": "meta.csv", "image_dir": "imgs"}],
            "path_template": "{file}",
            "label_column": "finding",
        },
        "patient": {"column": "pid"},
    }
    card.update(changes)
    return card_from_dict(card)


def _csv_rows(n=30):
    findings = ["No Finding", "COVID-19", "Bacterial"]
    return [(f"img{i}.png", findings[i % 3], f"SECRETPID{i // 2}") for i in range(n)]


@pytest.fixture(scope="session")
def write_png():
    """``write_png(path, seed, size=8)``: a random grey ``size`` x ``size`` PNG at ``path`` (folders made)."""
    return _png


@pytest.fixture(scope="session")
def folder_card_dict():
    """``folder_card_dict(**changes)``: a binary NORMAL/PNEUMONIA folder card (patients ``personN_``), as a dict."""
    return _folder_card_dict


@pytest.fixture(scope="session")
def folder_card():
    """``folder_card(**changes)``: the card of ``folder_card_dict``, validated."""
    return lambda **changes: card_from_dict(_folder_card_dict(**changes))


@pytest.fixture(scope="session")
def person_folders():
    """``person_folders(root, n_patients=8, per_patient=2, start=0, seed=0)``: 32 px PNGs in NORMAL/ and
    PNEUMONIA/ (patients alternate), named ``personN_imgI.png``; returns ``root``."""
    return _person_folders


@pytest.fixture(scope="session")
def csv_set():
    """``csv_set(root, rows, extra_cols=None)``: ``rows`` of (file, finding, pid) as imgs/ and meta.csv."""
    return _csv_set


@pytest.fixture(scope="session")
def csv_card():
    """``csv_card(**changes)``: the multiclass card (covid / normal / other) that reads ``csv_set``."""
    return _csv_card


@pytest.fixture(scope="session")
def csv_rows():
    """``csv_rows(n=30)``: ``n`` rows cycling No Finding / COVID-19 / Bacterial, two images per patient."""
    return _csv_rows
