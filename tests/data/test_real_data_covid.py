"""Real ieee8023 COVID-19 collection (skipped without MEDTRICKS_REAL_DATA): both cards build a
patient-level manifest from the real, messy metadata.csv with no patient in two splits, and agree."""

from __future__ import annotations

import pytest

from medtricks.data import load_card
from medtricks.data.manifest import build_manifest
from medtricks.data.splits import check_leakage


@pytest.fixture(scope="module")
def ieee8023(real_data_dir):
    root = real_data_dir / "ieee8023"
    if not (root / "metadata.csv").is_file():
        pytest.skip(f"{root}/metadata.csv absent: the ieee8023 part of the real data is not there")
    return root


@pytest.mark.parametrize("card", ["ieee8023-covid", "ieee8023-covid-binary"])
def test_card_builds_a_patient_level_manifest(ieee8023, card):
    manifest = build_manifest(card, ieee8023, val_fraction=0.15, test_fraction=0.2, split_seed=0)
    check_leakage(manifest)  # raises on a patient (or an identical image) in two splits
    per_patient = manifest.groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert set(manifest["label"]) == set(load_card(card).classes)  # every class is present
    assert len(manifest) > 300 and manifest["patient"].nunique() > 150
    assert not manifest["patient"].astype(str).str.fullmatch(r"\d+").any()  # patient ids are hashed
    notes = " ".join(map(str, manifest.attrs.get("notes", [])))
    assert "todo" in notes  # unlabelled rows are left out on purpose, and counted


def test_binary_card_is_the_three_class_card_merged(ieee8023):
    three = build_manifest("ieee8023-covid", ieee8023, test_fraction=0.2)
    binary = build_manifest("ieee8023-covid-binary", ieee8023, test_fraction=0.2)
    assert sorted(three["path"]) == sorted(binary["path"])
    merged = three.set_index("path")["label"].map(lambda c: "covid" if c == "covid" else "other")
    assert merged.sort_index().equals(binary.set_index("path")["label"].sort_index())
