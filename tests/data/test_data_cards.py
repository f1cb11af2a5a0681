"""Data cards: every shipped card follows the schema; schema errors name the key; lookup by name; strict YAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medtricks.data import CardError, DataCard, card_from_dict, cards_dir, list_cards, load_card

SHIPPED = {
    "kermany-pneumonia",
    "kermany-pneumonia-3class",
    "ieee8023-covid",
    "ieee8023-covid-binary",
    "covid19-radiography",
    "rsna-pneumonia",
    "covidx",
    "nih-chestxray14",
    "synthetic-phantoms",
}


def _minimal(**changes) -> dict:
    card = {
        "name": "toy",
        "description": "toy set",
        "source": "https://example.org/toy",
        "license": "CC0",
        "citation": "none",
        "task": "binary",
        "classes": ["a", "b"],
        "layout": {"kind": "folder"},
        "patient": {"per_image": True},
    }
    card.update(changes)
    return card


def test_all_required_cards_are_shipped():
    assert SHIPPED <= set(list_cards())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_card_is_valid_and_documented(name):
    card = load_card(name)
    assert isinstance(card, DataCard)
    assert card.name == name  # the file stem is the name a recipe uses
    assert card.pitfalls, "every card documents its known pitfalls"
    assert len(card.citation) > 20 and card.license
    mean, std = card.normalization.mean, card.normalization.std
    assert len(mean) == len(std) and all(s > 0 for s in std)
    # every mapping target is a class or 'drop'
    assert set(card.label_map.values()) <= set(card.classes) | {"drop"}


def test_kermany_cards_map_file_names():
    binary, three = load_card("kermany-pneumonia"), load_card("kermany-pneumonia-3class")
    assert binary.classes == ["normal", "pneumonia"] and binary.task == "binary"
    assert three.classes == ["normal", "bacterial", "viral"]
    assert three.map_label("bacteria") == "bacterial" and three.map_label("virus") == "viral"
    assert three.map_label("PNEUMONIA") is None  # a pneumonia file without sub-type is an error later


def test_ieee8023_label_rules():
    card = load_card("ieee8023-covid")
    assert card.map_label("COVID-19, ARDS") == "covid"
    assert card.map_label("Pneumonia/Viral/COVID-19") == "covid"
    assert card.map_label("Pneumonia/Bacterial/Streptococcus") == "pneumonia"
    assert card.map_label("No Finding") == "normal"
    assert card.map_label("todo") == "drop"
    assert card.map_label("Something new") is None
    binary = load_card("ieee8023-covid-binary")
    assert binary.classes == ["other", "covid"] and binary.task == "binary"  # positive class last
    assert binary.map_label("COVID-19, ARDS") == "covid" and binary.map_label("No Finding") == "other"
    assert binary.map_label("Pneumonia/Bacterial/Streptococcus") == "other" and binary.map_label("todo") == "drop"


def test_unknown_name_lists_available_cards_closest_first():
    with pytest.raises(CardError) as err:
        load_card("kermany")
    message = str(err.value)
    assert "unknown data card 'kermany'" in message
    listed = message.split("(closest first): ")[1]
    assert listed.startswith("kermany-pneumonia")
    assert "rsna-pneumonia" in listed


def test_load_by_path_and_cards_dir_env(tmp_path, monkeypatch):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    assert load_card(str(path)).name == "toy"
    monkeypatch.setenv("MEDTRICKS_CARDS_DIR", str(tmp_path))
    assert cards_dir() == tmp_path
    assert load_card("toy").classes == ["a", "b"]
    assert list_cards() == ["toy"]


@pytest.mark.parametrize(
    "change, key, words",
    [
        ({"clases": ["a", "b"]}, "clases", "unknown key"),
        ({"task": "regression"}, "task", "binary"),
        ({"classes": ["a", "b", "c"]}, "(top level)", "exactly 2 classes"),
        ({"label_map": {"X": "c"}}, "(top level)", "label_map['X']"),
        ({"patient": {"regex": "person(\\d+"}}, "patient.regex", "invalid regular expression"),
        ({"patient": {"regex": "(person)", "per_image": True}}, "patient", "exactly one"),
        ({"patient": {"regex": "person"}}, "patient.regex", "capture group"),
        ({"layout": {"kind": "folder", "globb": "*"}}, "layout.globb", "unknown key"),
        ({"layout": {"kind": "csv", "tables": [{"file": "a.csv"}]}}, "layout.label_column", "Field required"),
        ({"layout": {"kind": "zip"}}, "layout", "kind"),
        ({"source": "somewhere"}, "source", "pattern"),
        ({"normalization": "imagenett"}, "normalization", "unknown normalization"),
    ],
)
def test_schema_errors_name_the_key(change, key, words):
    with pytest.raises(CardError) as err:
        card_from_dict(_minimal(**change), "toy.yaml")
    message = str(err.value)
    assert "toy.yaml" in message and f"key '{key}'" in message and words in message


def test_missing_required_key_is_named(tmp_path):
    data = _minimal()
    del data["patient"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CardError, match=r"key 'patient': Field required"):
        load_card(path)


def test_yaml_colon_in_list_item_reports_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_minimal()) + "pitfalls:\n  - Children: only\n")
    with pytest.raises(CardError, match=r"key 'pitfalls.0'"):
        load_card(path)


def test_importing_medtricks_data_stays_light():
    code = (
        "import sys, medtricks.data as d; d.load_card; "
        "heavy = [m for m in ('albumentations', 'pydicom', 'monai', 'torch', 'sklearn') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_allow_conflicting_duplicates_is_a_card_yaml_key(folder_card_dict, tmp_path):
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(folder_card_dict(allow_conflicting_duplicates=True)))
    assert load_card(path).allow_conflicting_duplicates is True
    assert load_card("kermany-pneumonia").allow_conflicting_duplicates is False


def test_card_duplicate_keys_and_aliases_are_refused(folder_card_dict, tmp_path):
    text = yaml.safe_dump(folder_card_dict())
    path = tmp_path / "dup.yaml"
    path.write_text(text + "task: multiclass\n")
    with pytest.raises(CardError, match=r"duplicate key 'task'"):
        load_card(path)
    path.write_text(text.replace("classes:", "extra: &c [normal, pneumonia]\nclasses:", 1))
    with pytest.raises(CardError, match="anchors and aliases are not allowed in a data card"):
        load_card(path)


def test_a_data_card_that_is_not_utf8_is_a_card_error(tmp_path):
    from medtricks.data.cards import load_card
    from medtricks.errors import MedtricksError

    card = tmp_path / "card.yaml"
    card.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(MedtricksError, match="not UTF-8"):
        load_card(str(card))
