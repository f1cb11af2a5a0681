"""Manifests and splits: layouts, label mapping, bad rows, hashed patients, patient-level stratified
splits (property test over seeds), honoured explicit splits, the leakage check, the real Kermany set; symlinked
folders and files, identical bytes under two labels, and a split fingerprint that is the same on every machine."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtricks.data import (
    LeakageError,
    ManifestError,
    assign_splits,
    build_datasets,
    build_manifest,
    check_leakage,
    export_manifest,
    load_card,
    read_image,
)


@pytest.fixture(scope="module")
def folder_set(write_png):
    """``folder_set(root, n_patients=12, per_patient=2, classes=...)``: 8 px PNGs per class folder, patients
    alternating over ``classes``; returns ``root``."""

    def make(root: Path, n_patients=12, per_patient=2, classes=("NORMAL", "PNEUMONIA")) -> Path:
        k = 0
        for p in range(n_patients):
            cls = classes[p % len(classes)]
            for i in range(per_patient):
                write_png(root / cls / f"person{p}_img{i}.png", k)
                k += 1
        return root

    return make


# ------------------------------------------------------------------------------------ building
def test_folder_manifest_columns_and_patients(folder_set, folder_card, tmp_path):
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


def test_csv_manifest_maps_drops_and_filters(csv_set, csv_card, csv_rows, tmp_path):
    rows = csv_rows(30) + [("img_todo.png", "todo", "SECRETPID99")]
    views = ["PA"] * 28 + ["L", "L", "PA"]
    root = csv_set(tmp_path, rows, {"view": views})
    card = csv_card(filters=[{"column": "view", "in": ["PA", "AP"]}])
    m = build_manifest(card, root)
    assert len(m) == 28
    notes = m.attrs["notes"]
    assert notes["rows left out by filter view in ['PA', 'AP']"] == 2
    assert notes["images with label 'todo' dropped (card drop list)"] == 1
    assert not m.to_csv().count("SECRETPID")  # raw IDs never in the manifest


def test_unknown_label_names_label_and_file(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(6) + [("odd.png", "Tuberculosis", "P9")])
    with pytest.raises(ManifestError) as err:
        build_manifest(csv_card(), root)
    assert "'Tuberculosis'" in str(err.value) and "odd.png" in str(err.value) and "label_map" in str(err.value)


def test_missing_file_in_csv_is_named(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(6))
    (root / "imgs" / "img3.png").unlink()
    with pytest.raises(ManifestError, match=r"do not exist.*img3\.png"):
        build_manifest(csv_card(), root)
    kept = build_manifest(csv_card(), root, on_missing="keep")
    assert len(kept) == 6 and any(p.endswith("img3.png") for p in kept.attrs["missing"])


def test_missing_column_and_table_are_named(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(6))
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


def test_duplicate_rows_collapse_and_conflicts_fail(csv_set, csv_card, csv_rows, tmp_path):
    rows = csv_rows(9)
    root = csv_set(tmp_path, rows + [rows[0]])  # RSNA-style: same image twice, same label
    m = build_manifest(csv_card(), root)
    assert len(m) == 9 and m.attrs["notes"]["duplicate rows of one file collapsed"] == 1
    csv_set(tmp_path, rows + [(rows[0][0], "COVID-19" if rows[0][1] != "COVID-19" else "Bacterial", rows[0][2])])
    with pytest.raises(ManifestError, match=r"conflicting labels.*img0\.png"):
        build_manifest(csv_card(), root)


def test_patient_regex_mismatch_names_file(write_png, folder_set, folder_card, tmp_path):
    root = folder_set(tmp_path / "data", n_patients=4)
    write_png(root / "NORMAL" / "scan_001.png", 99)
    with pytest.raises(ManifestError, match=r"scan_001\.png.*patient regex"):
        build_manifest(folder_card(), root)


def test_empty_root_and_loose_files(folder_card, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no images found"):
        build_manifest(folder_card(), tmp_path / "empty")
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest(folder_card(), tmp_path / "nope")


def test_non_images_hidden_files_and_split_dirs(write_png, folder_set, folder_card, tmp_path):
    root = tmp_path / "data"
    folder_set(root / "train", n_patients=10)
    folder_set(root / "test", n_patients=4)
    (root / "train" / "NORMAL" / "notes.txt").write_text("x")
    write_png(root / "train" / "NORMAL" / ".hidden.png", 1)
    write_png(root / "__MACOSX" / "NORMAL" / "person0_img0.png", 1)
    card = folder_card(layout={"kind": "folder", "split_dirs": {"train": "train", "test": "test"}})
    m = build_manifest(card, root, val_fraction=0.3, test_fraction=0.5)  # test declared: fraction unused
    assert m.attrs["notes"] == {"non-image files ignored": 1}
    assert len(m) == 28
    test_rows = m[m["split"] == "test"]
    assert len(test_rows) == 8 and all("/test/" in p for p in test_rows["path"])
    assert set(m.loc[m["path"].str.contains("/train/"), "split"]) == {"train", "val"}


def test_kermany_style_label_regex(write_png, tmp_path):
    root = tmp_path / "k"
    for i, name in enumerate(
        ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person2_virus_3.jpeg", "person447_virus_921_1.jpeg"]
    ):
        write_png(root / "PNEUMONIA" / name, i)
    for i, name in enumerate(["IM-0115-0001.jpeg", "NORMAL2-IM-0115-0001.jpeg", "IM-0429-0001-0002.jpeg"]):
        write_png(root / "NORMAL" / name, 10 + i)

    m = build_manifest(load_card("kermany-pneumonia-3class"), root, val_fraction=0.3)
    labels = dict(zip(m["path"].map(lambda p: Path(p).name), m["label"]))
    assert labels["person1_bacteria_1.jpeg"] == "bacterial" and labels["person2_virus_3.jpeg"] == "viral"
    assert labels["IM-0115-0001.jpeg"] == "normal"
    # IM-0115 and NORMAL2-IM-0115 are different patients; person1's two images are one patient
    assert m["patient"].nunique() == 6
    write_png(root / "PNEUMONIA" / "person3_fungal_1.jpeg", 99)
    with pytest.raises(ManifestError, match=r"'PNEUMONIA'.*person3_fungal_1\.jpeg"):
        build_manifest(load_card("kermany-pneumonia-3class"), root)


def test_multilabel_is_refused_clearly(tmp_path):

    with pytest.raises(NotImplementedError, match="multilabel"):
        build_manifest(load_card("nih-chestxray14"), tmp_path)


# ------------------------------------------------------------------------------------ hashing
def test_patient_hash_stable_and_salt_does_not_change_split(folder_set, folder_card, tmp_path, monkeypatch):
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


def test_export_manifest_is_relative_and_minimal(csv_set, csv_card, csv_rows, tmp_path):
    root = csv_set(tmp_path, csv_rows(12))
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
def test_leakage_catches_planted_duplicate_bytes(folder_set, folder_card, tmp_path):
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


def test_leakage_catches_patient_in_two_splits(folder_set, folder_card, tmp_path):
    root = folder_set(tmp_path / "data", n_patients=20)
    m = build_manifest(folder_card(), root, val_fraction=0.3)
    patient = m[m["split"] == "val"]["patient"].iloc[0]
    m.loc[m.index[(m["patient"] == patient)][0], "split"] = "train"
    with pytest.raises(LeakageError, match=r"1 patient\(s\) appear in more than one split") as err:
        check_leakage(m)
    assert patient in str(err.value)
    assert len(err.value.files) == 2 and all(f in str(err.value) for f in err.value.files)


def test_duplicates_inside_one_split_are_not_leakage(folder_set, folder_card, tmp_path):
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


def test_the_fingerprint_is_the_same_on_every_machine_and_names_only_changed_splits(tmp_path, monkeypatch):
    from medtricks.data.splits import changed_splits, split_fingerprint
    from medtricks.data.synthetic import synthesize_phantoms

    root = tmp_path / "phantoms"
    synthesize_phantoms(root, n=40, size=16, seed=0)
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", "machine-a")
    a = build_manifest("synthetic-phantoms", root, val_fraction=0.3)
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", "machine-b")
    b = build_manifest("synthetic-phantoms", root, val_fraction=0.3)
    assert set(a["patient"]).isdisjoint(b["patient"])  # other salt, other hashes ...
    assert split_fingerprint(a, root) == split_fingerprint(b, root)  # ... the same fingerprint
    fingerprint = json.dumps(split_fingerprint(a, root))
    assert not any(p in fingerprint for p in a["patient"]) and "png" not in fingerprint  # no IDs, no paths
    relabelled = a.copy()
    row = relabelled.index[relabelled["split"] == "val"][0]
    relabelled.loc[row, "label"] = "normal" if relabelled.loc[row, "label"] != "normal" else "covid"
    assert changed_splits(split_fingerprint(a, root), split_fingerprint(relabelled, root)) == ["val"]


# ------------------------------------------------------------------------------- 9. symlinks
def test_symlinked_class_and_split_folders_are_followed_and_loops_are_not(person_folders, folder_card, tmp_path):
    elsewhere = person_folders(tmp_path / "elsewhere", n_patients=6)
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "train" / cls).symlink_to(elsewhere / cls, target_is_directory=True)
    person_folders(tmp_path / "test_real", n_patients=4, start=10, seed=7)
    (root / "test").symlink_to(tmp_path / "test_real", target_is_directory=True)  # a linked split folder
    (root / "train" / "NORMAL" / "loop").symlink_to(root, target_is_directory=True)  # a loop back to the root
    card = folder_card(layout={"kind": "folder", "split_dirs": {"train": "train", "test": "test"}})
    start = time.monotonic()
    m = build_manifest(card, root, val_fraction=0.3)
    assert time.monotonic() - start < 30
    assert len(m) == 12 + 8
    assert all(p.startswith(str(root.resolve())) for p in m["path"])  # link paths, not their targets
    assert set(m.loc[m["path"].str.contains("/test/"), "split"]) == {"test"}
    assert m.attrs["notes"] == {"symlinked folders not followed (they loop back to a parent)": 1}


def test_symlinked_file_outside_the_root_is_kept_under_its_link_path(write_png, person_folders, folder_card, tmp_path):
    root = person_folders(tmp_path / "data", n_patients=6)
    outside = write_png(tmp_path / "outside" / "scan.png", 999, size=32)
    link = root / "NORMAL" / "person20_img0.png"
    link.symlink_to(outside)
    (root / "PNEUMONIA" / "person21_img0.png").symlink_to(tmp_path / "missing.png")  # broken: counted
    m = build_manifest(folder_card(), root, val_fraction=0.3)
    assert str(root.resolve() / "NORMAL" / "person20_img0.png") in set(m["path"])  # the link, not its target
    assert m.attrs["notes"]["broken symlinks ignored"] == 1
    exported = export_manifest(m, root, keep_paths=True)
    assert "NORMAL/person20_img0.png" in set(exported["path"])
    assert read_image(m.loc[m["path"].str.endswith("person20_img0.png"), "path"].iloc[0]).shape == (32, 32)


# ------------------------------------------------------------------------------- 11. duplicates
def test_identical_bytes_with_two_labels_stop_the_manifest_unless_the_card_allows_them(
    person_folders, folder_card, tmp_path
):
    root = person_folders(tmp_path / "data", n_patients=8)
    src = root / "NORMAL" / "person0_img0.png"
    copy = root / "PNEUMONIA" / "person31_img0.png"
    shutil.copyfile(src, copy)
    with pytest.raises(ManifestError, match="identical bytes under different labels") as err:
        build_manifest(folder_card(), root, val_fraction=0.3)
    assert str(src) in str(err.value) and str(copy) in str(err.value)
    with pytest.raises(ManifestError, match="identical bytes"):  # the run stops too
        build_datasets(folder_card(), root, image_size=32, mean=(0.5,), std=(0.5,), in_chans=1, progress=False)
    allowed = folder_card(allow_conflicting_duplicates=True)
    m = build_manifest(allowed, root, val_fraction=0.3)
    (group,) = m.attrs["conflicting_duplicates"]
    assert {(p, label) for p, label, _ in group} == {(str(src), "normal"), (str(copy), "pneumonia")}


def test_identical_bytes_with_two_labels_across_declared_splits(person_folders, folder_card, tmp_path):
    root = tmp_path / "data"
    person_folders(root / "train", n_patients=6)
    person_folders(root / "test", n_patients=4, start=10, seed=5)
    src = root / "train" / "NORMAL" / "person0_img0.png"
    copy = root / "test" / "PNEUMONIA" / "person11_img9.png"
    shutil.copyfile(src, copy)
    card = folder_card(layout={"kind": "folder", "split_dirs": {"train": "train", "test": "test"}})
    with pytest.raises(LeakageError, match="identical bytes under different labels") as err:
        build_manifest(card, root, val_fraction=0.3)
    assert f"{copy} (pneumonia, test)" in str(err.value) and set(err.value.files) == {str(src), str(copy)}
