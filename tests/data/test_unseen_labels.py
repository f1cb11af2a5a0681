"""Cards that survive new vocabulary (issue 35): the ``unknown_labels`` policy (error | drop | a class) on raw
labels the card does not name, counted in the manifest's notes, warned about, listed by ``data check``; and the
shipped ieee8023 binary card reading findings the shared data does not contain."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medtricks.data import CardError, ManifestError, UnseenLabelWarning, build_manifest, card_from_dict, load_card
from medtricks.data.report import data_check

ROOT = Path(__file__).resolve().parents[2]

# Findings of the whole ieee8023 collection that the shared two thirds do not hold.
NEW_VOCABULARY = [
    ("new0.png", "Varicella-zoster", "NEW1"),
    ("new1.png", "Influenza B", "NEW2"),
    ("new2.png", "Influenza B", "NEW3"),
    ("new3.png", "Nocardia", "NEW4"),
]


def test_error_policy_names_every_unseen_label_and_a_file(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(9) + NEW_VOCABULARY)
    with pytest.raises(ManifestError) as err:
        build_manifest(csv_card(), root)
    text = str(err.value)
    assert "'Influenza B' (2 files" in text and "'Varicella-zoster' (1 files" in text and "'Nocardia'" in text
    assert "new1.png" in text and "unknown_labels" in text


def test_class_policy_maps_counts_and_warns(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(9) + NEW_VOCABULARY)
    with pytest.warns(UnseenLabelWarning, match=r"4 image\(s\).*'Influenza B' \(2\).*mapped"):
        m = build_manifest(csv_card(unknown_labels="other"), root)
    assert len(m) == 13
    assert m.attrs["unseen_labels"] == {"Influenza B": 2, "Nocardia": 1, "Varicella-zoster": 1}
    new = m[m["path"].str.contains("new")]
    assert set(new["label"]) == {"other"} and len(new) == 4
    notes = m.attrs["notes"]
    assert notes["images with unseen label 'Influenza B' mapped to 'other' (card unknown_labels)"] == 2


def test_drop_policy_leaves_out_and_counts(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(9) + NEW_VOCABULARY)
    with pytest.warns(UnseenLabelWarning, match="left them out"):
        m = build_manifest(csv_card(unknown_labels="drop"), root)
    assert len(m) == 9 and not m["path"].str.contains("new").any()
    assert m.attrs["notes"]["images with label 'Influenza B' dropped (card unknown_labels)"] == 2
    # the card's own drop list keeps its own reason
    assert sum(v for k, v in m.attrs["notes"].items() if "unknown_labels" in k) == 4


def test_known_labels_are_not_touched_by_the_policy(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(9) + [("t.png", "todo", "T1")])
    m = build_manifest(csv_card(unknown_labels="other"), root)
    assert m.attrs["unseen_labels"] == {}
    assert m.attrs["notes"] == {"images with label 'todo' dropped (card drop list)": 1}
    assert sorted(m["label"].value_counts().to_dict().items()) == [("covid", 3), ("normal", 3), ("other", 3)]


def test_argument_overrides_the_card_and_bad_policy_is_named(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(9) + NEW_VOCABULARY)
    with pytest.warns(UnseenLabelWarning):
        assert len(build_manifest(csv_card(), root, unknown_labels="drop")) == 9
    with pytest.raises(CardError, match=r"unknown_labels: .pneumonia. is not 'error', 'drop' or one of the classes"):
        csv_card(unknown_labels="pneumonia")


def test_data_check_lists_unseen_labels_with_counts(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(12) + NEW_VOCABULARY)
    mapped = data_check(csv_card(unknown_labels="other"), root, progress=False)
    assert "Raw labels the card does not name: 3 (4 image(s) mapped to 'other'" in mapped.text
    assert "  'Influenza B': 2" in mapped.text and mapped.ok
    stopped = data_check(csv_card(), root, progress=False)  # error policy: reported as a problem, not a crash
    assert "would stop a run" in stopped.text and "  'Nocardia': 1" in stopped.text
    assert not stopped.ok and any("raw label(s) the card does not name" in p for p in stopped.problems)


@pytest.mark.parametrize(
    "finding, expected",
    [
        ("COVID-19", "covid"),
        ("COVID-19, ARDS", "covid"),
        ("Pneumonia/Viral/COVID-19", "covid"),
        ("covid-19", "covid"),
        ("Pneumonia/Bacterial/Streptococcus", "other"),
        ("Bacterial", "other"),
        ("Pneumonia/Fungal/Aspergillosis", "other"),
        ("Varicella", "other"),
        ("Influenza", "other"),
        ("No Finding", "other"),
        ("todo", "drop"),
        ("Unknown", "drop"),
        ("Chickenpox", None),  # not named: left to unknown_labels
    ],
)
def test_shipped_binary_card_maps_the_collections_vocabulary(finding, expected):
    card = load_card("ieee8023-covid-binary")
    assert card.map_label(finding) == expected
    assert card.unknown_labels == "other"  # COVID-19 vs everything else: any new finding is 'other'


def test_shipped_binary_card_reads_a_collection_with_new_findings(csv_set, csv_rows, tmp_path):
    rows = (
        csv_rows(12) + NEW_VOCABULARY + [("b.png", "Pneumonia/Bacterial/Nocardia", "B1"), ("c.png", "Bacterial", "B2")]
    )
    root = csv_set(tmp_path, rows, {"modality": "X-ray", "view": "PA", "folder": "imgs"})
    meta = pd.read_csv(root / "meta.csv").rename(columns={"file": "filename", "pid": "patientid"})
    meta.to_csv(root / "metadata.csv", index=False)
    with pytest.warns(UnseenLabelWarning):
        m = build_manifest("ieee8023-covid-binary", root)
    assert len(m) == len(rows) and set(m["label"]) == {"covid", "other"}
    assert m.attrs["unseen_labels"] == {"Influenza B": 2, "Nocardia": 1, "Varicella-zoster": 1}


def test_card_from_dict_default_is_error():
    card = card_from_dict(
        {
            "name": "x",
            "description": "d",
            "source": "generated",
            "license": "l",
            "citation": "c",
            "task": "binary",
            "classes": ["a", "b"],
            "layout": {"kind": "folder"},
            "patient": {"per_image": True},
        }
    )
    assert card.unknown_labels == "error" and card.map_unseen_label("zzz") is None


def test_a_run_reports_and_logs_the_images_its_card_policy_mapped(one_epoch_overrides, tmp_path, capsys):
    """The phantoms' 'covid' label is unseen by a normal/pneumonia card that maps 'bacterial' only: the run says
    so on the console and logs how many images the policy labelled."""
    import json

    import yaml

    from medtricks.data import synthesize_phantoms
    from medtricks.recipe import load_recipe
    from medtricks.run import run_recipe

    card = yaml.safe_load((ROOT / "data_cards" / "synthetic-phantoms.yaml").read_text())
    card.update(
        name="pneumonia-phantoms",
        task="binary",
        classes=["normal", "pneumonia"],
        label_map={"bacterial": "pneumonia"},
        unknown_labels="pneumonia",
    )
    path = tmp_path / "pneumonia-phantoms.yaml"
    path.write_text(yaml.safe_dump(card))
    synthesize_phantoms(tmp_path / "phantoms", n=48, size=32, seed=0)
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            *one_epoch_overrides,
            "model.weights=none",
            f"data.card={path}",
            f"data.root={tmp_path / 'phantoms'}",
            "data.synth=null",
            f"experiment.output_dir={tmp_path / 'runs'}",
        ],
    )
    with pytest.warns(UnseenLabelWarning, match="'covid'"):
        result = run_recipe(recipe, quiet=False)
    assert "carry raw labels card 'pneumonia-phantoms'" in capsys.readouterr().out
    params = json.loads((result.run_dir / "store" / "params.json").read_text())
    covid = pd.read_csv(tmp_path / "phantoms" / "phantoms.csv")["label"].eq("covid").sum()
    assert int(params["n_unseen_label_images"]) == covid > 0


def test_covid_folder_card_reads_a_one_class_external_set_and_names_an_unmapped_folder(write_png, tmp_path):
    """The card for a Hannover-style external check: another site's COVID-19 images in covid/, no patient IDs."""
    for i in range(4):
        write_png(tmp_path / "site" / "COVID-19" / f"{i}.png", i)
    m = build_manifest("covid-folder", tmp_path / "site", val_fraction=0.25)
    assert set(m["label"]) == {"covid"} and len(m) == 4 and m["patient"].nunique() == 4  # one patient per image
    write_png(tmp_path / "site" / "Pneumothorax" / "x.png", 9)
    with pytest.raises(ManifestError, match="'Pneumothorax'"):
        build_manifest("covid-folder", tmp_path / "site")
