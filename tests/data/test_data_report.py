"""`medtricks data check` text: counts, sizes, unreadable files, duplicates, leakage, pitfalls; its exit code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medtricks.data import build_manifest, data_check_report, load_card, synthesize_phantoms


@pytest.fixture
def phantoms(tmp_path):
    root = tmp_path / "ph"
    synthesize_phantoms(root, n=45, size=32, seed=0)
    return root


def test_report_sections_and_counts(phantoms):
    text = data_check_report("synthetic-phantoms", phantoms, progress=False)
    m = build_manifest("synthetic-phantoms", phantoms)
    assert "Data check: card 'synthetic-phantoms'" in text
    assert f"Images: 45 listed, 45 readable, 0 unreadable; patients: {m['patient'].nunique()}" in text
    train = m[m["split"] == "train"]
    row = next(line for line in text.splitlines() if line.strip().startswith("train"))
    numbers = [int(v) for v in row.split()[1:]]
    expected = [int((train["label"] == c).sum()) for c in ["normal", "bacterial", "covid"]]
    assert numbers == expected + [len(train), train["patient"].nunique()]
    assert "height min/median/max 32/32/32" in text
    assert "Unreadable files: 0" in text and "none: no patient and no identical image" in text
    for pitfall in load_card("synthetic-phantoms").pitfalls:
        assert pitfall.split()[0] in text


def test_report_shows_unreadable_duplicates_and_leakage(phantoms):
    m = build_manifest("synthetic-phantoms", phantoms)
    bad = m["path"].iloc[0]
    with open(bad, "wb") as fh:
        fh.write(b"")
    train_file = m[(m["split"] == "train") & (m["path"] != bad)]["path"].iloc[0]
    val_file = m[m["split"] == "val"]["path"].iloc[0]
    shutil.copyfile(train_file, val_file)
    text = data_check_report("synthetic-phantoms", phantoms, progress=False)
    rel = lambda p: p.split(str(phantoms.resolve()) + "/")[1]  # noqa: E731
    assert "Unreadable files: 1" in text and f"{rel(bad)}: empty file" in text
    assert "Identical files (same bytes): 1 group(s)" in text
    assert "identical image(s) (same bytes) appear in more than one split" in text
    assert rel(train_file) in text and rel(val_file) in text
    assert str(phantoms.resolve()) + "/images" not in text.split("Leakage across splits:")[1]


def test_report_counts_rows_left_out(tmp_path):
    root = tmp_path / "ph"
    synthesize_phantoms(root, n=30, size=32, seed=0)
    table = pd.read_csv(root / "phantoms.csv")
    table.loc[:4, "label"] = "unsure"
    table.to_csv(root / "phantoms.csv", index=False)
    card = load_card("synthetic-phantoms").model_dump(by_alias=True)
    card["drop"] = ["unsure"]
    path = tmp_path / "card.yaml"
    import yaml

    path.write_text(yaml.safe_dump(card))
    text = data_check_report(str(path), root, progress=False)
    assert "images with label 'unsure' dropped (card drop list): 5" in text
    assert "Images: 25 listed" in text


@pytest.mark.slow  # decodes all 5,216 images (~8 s)
@pytest.mark.realdata
def test_report_on_real_kermany(real_data_dir):
    root = real_data_dir / "kermany224" / "train"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    text = data_check_report("kermany-pneumonia", root, progress=False)
    # 3,654 since the card keys pneumonia patients by personN and sub-type (2,846 before; docs/deployment.md)
    assert "Images: 5216 listed, 5216 readable, 0 unreadable; patients: 3654" in text
    assert "224x224 (5216)" in text
    assert "none: no patient and no identical image in two splits" in text
    assert "Children only" in text


# ------------------------------------------------------------------------------- 12. data check exit code
@pytest.fixture(scope="module")
def card_file(folder_card_dict):
    """``card_file(tmp_path, **changes)``: the toy folder card written to tmp_path/toy-card.yaml."""

    def write(tmp_path, **changes) -> Path:
        path = tmp_path / "toy-card.yaml"
        path.write_text(yaml.safe_dump(folder_card_dict(**changes)))
        return path

    return write


def test_data_check_exits_1_on_problems_and_0_when_clean(person_folders, card_file, tmp_path, capsys):
    from medtricks.cli import main

    root = person_folders(tmp_path / "data", n_patients=8)
    card = card_file(tmp_path)
    assert main(["data", "check", str(card), "--root", str(root)]) == 0
    assert "FAILED" not in capsys.readouterr().out

    (root / "NORMAL" / "person0_img1.png").write_bytes(b"")  # unreadable
    assert main(["data", "check", str(card), "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "Unreadable files: 1" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("medtricks data check: FAILED:") and "1 unreadable file" in last
    assert out.index("Known pitfalls") < out.index("FAILED")  # the report first, then the summary


def test_data_check_reports_conflicting_duplicates_and_leakage(
    person_folders, folder_card, card_file, tmp_path, capsys
):
    from medtricks.cli import main
    from medtricks.data.report import data_check

    root = person_folders(tmp_path / "data", n_patients=8)
    shutil.copyfile(root / "NORMAL" / "person0_img0.png", root / "PNEUMONIA" / "person31_img0.png")
    check = data_check(folder_card(), root, progress=False)
    assert "Identical files with different labels: 1 group(s)" in check.text
    assert "NORMAL/person0_img0.png (normal," in check.text
    assert any("different labels" in p for p in check.problems)
    assert main(["data", "check", str(card_file(tmp_path)), "--root", str(root)]) == 1
    assert "different labels" in capsys.readouterr().out.strip().splitlines()[-1]
    allowed = data_check(folder_card(allow_conflicting_duplicates=True), root, progress=False)
    assert "allowed by the card" in allowed.text
    assert not any("different labels" in p for p in allowed.problems)
