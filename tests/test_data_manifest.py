"""Manifests and splits: layouts, label mapping, bad rows, hashed patients, patient-level stratified
splits (property test over seeds), honoured explicit splits, the leakage check, the real Kermany set."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtricks.data import (
    LeakageError,
    ManifestError,
    assign_splits,
    build_manifest,
    card_from_dict,
    check_leakage,
    export_manifest,
)

CARD_BASE = {"description": "toy", "source": "https://example.org", "license": "CC0", "citation": "none"}


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(path)


def folder_set(root: Path, n_patients=12, per_patient=2, classes=("NORMAL", "PNEUMONIA")) -> Path:
    k = 0
    for p in range(n_patients):
        cls = classes[p % len(classes)]
        for i in range(per_patient):
            _png(root / cls / f"person{p}_img{i}.png", k)
            k += 1
    return root


def folder_card(**changes):
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
    return card_from_dict(card)


def csv_set(root: Path, rows: list[tuple[str, str, str]], extra_cols=None) -> Path:
    for path, _, _ in rows:
        _png(root / "imgs" / path, zlib.crc32(path.encode()))  # stable, distinct images (no identical bytes)
    df = pd.DataFrame(rows, columns=["file", "finding", "pid"])
    for name, values in (extra_cols or {}).items():
        df[name] = values
    df.to_csv(root / "meta.csv", index=False)
    return root


def csv_card(**changes):
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


def _rows(n=30):
    findings = ["No Finding", "COVID-19", "Bacterial"]
    return [(f"img{i}.png", findings[i % 3], f"SECRETPID{i // 2}") for i in range(n)]


# ------------------------------------------------------------------------------------ building
def test_folder_manifest_columns_and_patients(tmp_path):
    root = folder_set(tmp_path / "data")
    m = build_manifest(folder_card(), root, split_seed=0, val_fraction=0.25)
    assert list(m.columns) == ["path", "label", "target", "patient", "split"]
    assert len(m) == 24 and set(m["label"]) == {"normal", "pneumonia"}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in m["path"])
    assert (m["target"] == m["label"].map({"normal": 0, "pneumonia": 1})).all()
    assert m["patient"].nunique() == 12  # two images per personN
    assert m["patient"].str.fullmatch(r"p_[0-9a-f]{16}").all()
    assert not m["patient"].str.contains("person").any()
    assert set(m["split"]) == {"train", "val"}
    check_leakage(m)


def test_csv_manifest_maps_drops_and_filters(tmp_path):
    rows = _rows(30) + [("img_todo.png", "todo", "SECRETPID99")]
    views = ["PA"] * 28 + ["L", "L", "PA"]
    root = csv_set(tmp_path, rows, {"view": views})
    card = csv_card(filters=[{"column": "view", "in": ["PA", "AP"]}])
    m = build_manifest(card, root)
    assert len(m) == 28
    notes = m.attrs["notes"]
    assert notes["rows left out by filter view in ['PA', 'AP']"] == 2
    assert notes["images with label 'todo' dropped (card drop list)"] == 1
    assert not m.to_csv().count("SECRETPID")  # raw IDs never in the manifest


def test_unknown_label_names_label_and_file(tmp_path):
    root = csv_set(tmp_path, _rows(6) + [("odd.png", "Tuberculosis", "P9")])
    with pytest.raises(ManifestError) as err:
        build_manifest(csv_card(), root)
    assert "'Tuberculosis'" in str(err.value) and "odd.png" in str(err.value) and "label_map" in str(err.value)


def test_missing_file_in_csv_is_named(tmp_path):
    root = csv_set(tmp_path, _rows(6))
    (root / "imgs" / "img3.png").unlink()
    with pytest.raises(ManifestError, match=r"do not exist.*img3\.png"):
        build_manifest(csv_card(), root)
    kept = build_manifest(csv_card(), root, on_missing="keep")
    assert len(kept) == 6 and any(p.endswith("img3.png") for p in kept.attrs["missing"])


def test_missing_column_and_table_are_named(tmp_path):
    root = csv_set(tmp_path, _rows(6))
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['finding_x'\]"):
        build_manifest(
            csv_card(
                layout={
                    "kind": "csv",
                    "tables": [{"file": "meta.csv", "image_dir": "imgs"}],
                    "path_template": "{file}",
                    "label_column": "finding_x",
                }
            ),
            root,
        )
    with pytest.raises(ManifestError, match=r"label table .*other\.csv"):
        build_manifest(
            csv_card(
                layout={
                    "kind": "csv",
                    "tables": [{"file": "other.csv"}],
                    "path_template": "{file}",
                    "label_column": "finding",
                }
            ),
            root,
        )


def test_duplicate_rows_collapse_and_conflicts_fail(tmp_path):
    rows = _rows(9)
    root = csv_set(tmp_path, rows + [rows[0]])  # RSNA-style: same image twice, same label
    m = build_manifest(csv_card(), root)
    assert len(m) == 9 and m.attrs["notes"]["duplicate rows of one file collapsed"] == 1
    csv_set(tmp_path, rows + [(rows[0][0], "COVID-19" if rows[0][1] != "COVID-19" else "Bacterial", rows[0][2])])
    with pytest.raises(ManifestError, match=r"conflicting labels.*img0\.png"):
        build_manifest(csv_card(), root)


def test_patient_regex_mismatch_names_file(tmp_path):
    root = folder_set(tmp_path / "data", n_patients=4)
    _png(root / "NORMAL" / "scan_001.png", 99)
    with pytest.raises(ManifestError, match=r"scan_001\.png.*patient regex"):
        build_manifest(folder_card(), root)


def test_empty_root_and_loose_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no images found"):
        build_manifest(folder_card(), tmp_path / "empty")
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest(folder_card(), tmp_path / "nope")


def test_non_images_hidden_files_and_split_dirs(tmp_path):
    root = tmp_path / "data"
    folder_set(root / "train", n_patients=10)
    folder_set(root / "test", n_patients=4)
    (root / "train" / "NORMAL" / "notes.txt").write_text("x")
    _png(root / "train" / "NORMAL" / ".hidden.png", 1)
    _png(root / "__MACOSX" / "NORMAL" / "person0_img0.png", 1)
    card = folder_card(layout={"kind": "folder", "split_dirs": {"train": "train", "test": "test"}})
    m = build_manifest(card, root, val_fraction=0.3, test_fraction=0.5)  # test declared: fraction unused
    assert m.attrs["notes"] == {"non-image files ignored": 1}
    assert len(m) == 28
    test_rows = m[m["split"] == "test"]
    assert len(test_rows) == 8 and all("/test/" in p for p in test_rows["path"])
    assert set(m.loc[m["path"].str.contains("/train/"), "split"]) == {"train", "val"}


def test_kermany_style_label_regex(tmp_path):
    root = tmp_path / "k"
    for i, name in enumerate(
        ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person2_virus_3.jpeg", "person447_virus_921_1.jpeg"]
    ):
        _png(root / "PNEUMONIA" / name, i)
    for i, name in enumerate(["IM-0115-0001.jpeg", "NORMAL2-IM-0115-0001.jpeg", "IM-0429-0001-0002.jpeg"]):
        _png(root / "NORMAL" / name, 10 + i)
    from medtricks.data import load_card

    m = build_manifest(load_card("kermany-pneumonia-3class"), root, val_fraction=0.3)
    labels = dict(zip(m["path"].map(lambda p: Path(p).name), m["label"]))
    assert labels["person1_bacteria_1.jpeg"] == "bacterial" and labels["person2_virus_3.jpeg"] == "viral"
    assert labels["IM-0115-0001.jpeg"] == "normal"
    # IM-0115 and NORMAL2-IM-0115 are different patients; person1's two images are one patient
    assert m["patient"].nunique() == 6
    _png(root / "PNEUMONIA" / "person3_fungal_1.jpeg", 99)
    with pytest.raises(ManifestError, match=r"'PNEUMONIA'.*person3_fungal_1\.jpeg"):
        build_manifest(load_card("kermany-pneumonia-3class"), root)


def test_multilabel_is_refused_clearly(tmp_path):
    from medtricks.data import load_card

    with pytest.raises(NotImplementedError, match="multilabel"):
        build_manifest(load_card("nih-chestxray14"), tmp_path)


# ------------------------------------------------------------------------------------ hashing
def test_patient_hash_stable_and_salt_does_not_change_split(tmp_path, monkeypatch):
    root = folder_set(tmp_path / "data", n_patients=20)
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", "salt-one")
    a1, a2 = build_manifest(folder_card(), root), build_manifest(folder_card(), root)
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", "salt-two")
    b = build_manifest(folder_card(), root)
    assert (a1["patient"] == a2["patient"]).all()
    assert not set(a1["patient"]) & set(b["patient"])
    assert (a1["split"] == b["split"]).all()  # split_seed alone decides the split


def test_machine_salt_file_is_created_once(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDTRICKS_PATIENT_SALT", raising=False)
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "cache"))
    from medtricks.data.manifest import patient_salt

    first = patient_salt()
    assert (tmp_path / "cache" / "patient_salt").is_file() and len(first) == 32
    assert patient_salt() == first


def test_export_manifest_is_relative_and_minimal(tmp_path):
    root = csv_set(tmp_path, _rows(12))
    m = build_manifest(csv_card(), root)
    out = export_manifest(m, root, keep_paths=True)
    assert list(out.columns) == ["path", "label", "target", "patient", "split"]
    assert out["path"].str.startswith("imgs/").all()
    assert str(tmp_path) not in out.to_csv() and "SECRETPID" not in out.to_csv()
    # default: file names (which may carry a dataset's patient IDs) are hashed too
    hashed = export_manifest(m, root)
    assert list(hashed.columns) == ["image_id", "label", "target", "patient", "split"]
    assert hashed["image_id"].str.fullmatch(r"i_[0-9a-f]{16}").all() and hashed["image_id"].is_unique
    assert "imgs/" not in hashed.to_csv()
    assert hashed["image_id"].tolist() == export_manifest(m, root)["image_id"].tolist()  # stable
    with pytest.raises(ManifestError, match="not under the data root"):
        export_manifest(m, tmp_path / "imgs" / "elsewhere")
    raw = m.assign(patient="SECRETPID1")
    with pytest.raises(ManifestError, match="not salted hashes"):
        export_manifest(raw, root)


# ------------------------------------------------------------------------------------ splits
def _random_groups(rng, n_patients):
    sizes = rng.integers(1, 6, n_patients)
    groups = np.repeat([f"pat{i}" for i in range(n_patients)], sizes)
    patient_label = rng.choice(["a", "b", "c"], n_patients, p=[0.6, 0.3, 0.1])
    labels = np.repeat(patient_label, sizes)
    return labels, groups


@pytest.mark.parametrize("seed", range(20))
def test_splits_never_share_a_patient(seed):
    rng = np.random.default_rng(seed)
    labels, groups = _random_groups(rng, int(rng.integers(20, 200)))
    val_f, test_f = float(rng.uniform(0.05, 0.3)), float(rng.choice([0.0, 0.1, 0.2]))
    splits = assign_splits(labels, groups, seed=seed, val_fraction=val_f, test_fraction=test_f)
    per_patient = pd.DataFrame({"g": groups, "s": splits}).groupby("g")["s"].nunique()
    assert (per_patient == 1).all()
    assert {"train", "val"} <= set(splits)
    assert ("test" in set(splits)) == (test_f > 0)
    assert abs((splits == "val").mean() - val_f) < 0.12


def test_split_fractions_and_stratification_on_a_larger_set():
    rng = np.random.default_rng(0)
    labels, groups = _random_groups(rng, 1500)
    splits = assign_splits(labels, groups, seed=3, val_fraction=0.15, test_fraction=0.2)
    assert abs((splits == "test").mean() - 0.2) < 0.02 and abs((splits == "val").mean() - 0.15) < 0.02
    overall = pd.Series(labels).value_counts(normalize=True)
    for split in ("train", "val", "test"):
        dist = pd.Series(labels[splits == split]).value_counts(normalize=True)
        assert (dist - overall).abs().max() < 0.03


def test_split_seed_is_deterministic_and_matters():
    labels, groups = _random_groups(np.random.default_rng(1), 100)
    a = assign_splits(labels, groups, seed=5)
    assert (a == assign_splits(labels, groups, seed=5)).all()
    assert (a != assign_splits(labels, groups, seed=6)).any()


def test_declared_splits_are_honoured():
    labels, groups = _random_groups(np.random.default_rng(2), 60)
    declared = np.where(np.arange(len(labels)) < 20, "test", None)
    groups[:20] = [f"t{i}" for i in range(20)]  # the declared test patients are their own
    s = assign_splits(labels, groups, declared, seed=0, val_fraction=0.2, test_fraction=0.3)
    assert (s[:20] == "test").all() and "test" not in set(s[20:])
    assert set(s[20:]) == {"train", "val"}
    declared_all = np.array(["train", "val"] * (len(labels) // 2) + ["train"] * (len(labels) % 2), dtype=object)
    assert (assign_splits(labels, groups, declared_all, seed=0) == declared_all).all()
    with pytest.raises(ManifestError, match="unknown split value"):
        assign_splits(labels, groups, ["training"] * len(labels))


@pytest.mark.parametrize("val, test", [(-0.1, 0.0), (1.0, 0.0), (0.5, 0.5), (0.2, 1.2)])
def test_bad_fractions_are_rejected(val, test):
    with pytest.raises(ValueError, match="fraction"):
        assign_splits(["a", "b"] * 5, list(range(10)), val_fraction=val, test_fraction=test)


def test_too_few_patients_to_split():
    with pytest.raises(ManifestError, match="only 1 patient"):
        assign_splits(["a", "b", "a"], ["p", "p", "p"], val_fraction=0.2)


# ------------------------------------------------------------------------------------ leakage
def test_leakage_catches_planted_duplicate_bytes(tmp_path):
    root = folder_set(tmp_path / "data", n_patients=20)
    m = build_manifest(folder_card(), root, split_seed=0, val_fraction=0.3)
    check_leakage(m)
    src = m[m["split"] == "train"]["path"].iloc[0]
    dst = m[m["split"] == "val"]["path"].iloc[0]
    shutil.copyfile(src, dst)  # same bytes, another patient, another split
    with pytest.raises(LeakageError) as err:
        check_leakage(m)
    assert "same bytes" in str(err.value) and src in str(err.value) and dst in str(err.value)
    assert set(err.value.files) == {src, dst}


def test_leakage_catches_patient_in_two_splits(tmp_path):
    root = folder_set(tmp_path / "data", n_patients=20)
    m = build_manifest(folder_card(), root, val_fraction=0.3)
    patient = m[m["split"] == "val"]["patient"].iloc[0]
    m.loc[m.index[(m["patient"] == patient)][0], "split"] = "train"
    with pytest.raises(LeakageError, match=r"1 patient\(s\) appear in more than one split") as err:
        check_leakage(m)
    assert patient in str(err.value)
    assert len(err.value.files) == 2 and all(f in str(err.value) for f in err.value.files)


def test_duplicates_inside_one_split_are_not_leakage(tmp_path):
    root = folder_set(tmp_path / "data", n_patients=10)
    m = build_manifest(folder_card(), root, val_fraction=0.3)
    same_patient = m[m["patient"] == m["patient"].iloc[0]]["path"].tolist()
    shutil.copyfile(same_patient[0], same_patient[1])
    check_leakage(m)


# ------------------------------------------------------------------------------------ real data
@pytest.mark.realdata
def test_real_kermany_manifest_only_lists_files_and_groups_patients(real_data_dir, monkeypatch):
    root = real_data_dir / "kermany224" / "train"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    import PIL.Image

    from medtricks.data import load_card

    def no_decoding(*args, **kwargs):
        raise AssertionError("build_manifest must only list files, never open an image")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)  # speed is benchmarks/data_pipeline.py's job
    m = build_manifest(load_card("kermany-pneumonia"), root, split_seed=0, val_fraction=0.15)
    assert len(m) == 5216
    assert m["label"].value_counts().to_dict() == {"pneumonia": 3875, "normal": 1341}
    assert m["patient"].nunique() == 3654  # personN + sub-type (2846 with personN alone)
    assert abs((m["split"] == "val").mean() - 0.15) < 0.02
    check_leakage(m)  # hashes only same-size files: fast
    three = build_manifest(load_card("kermany-pneumonia-3class"), root)
    assert three["label"].value_counts().to_dict() == {"bacterial": 2530, "viral": 1345, "normal": 1341}
