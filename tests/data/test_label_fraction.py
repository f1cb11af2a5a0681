"""Issue 17, item 2: label scarcity as a recipe knob (data.label_fraction / label_count) and an
unlabelled folder (data.unlabeled) -- patients whole, stratified, reproducible, val/test untouched."""

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtricks.data import build_datasets
from medtricks.data.datasets import list_unlabeled
from medtricks.data.errors import LeakageError
from medtricks.data.splits import labeled_subset
from medtricks.errors import ConfigError
from medtricks.recipe import RecipeError, recipe_from_dict

KW = dict(image_size=32, mean=(0.5,), std=(0.25,), in_chans=1, progress=False)


def _pool(seed=0, n_patients=300):
    """Patients with 1-4 images each, three classes of different sizes."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(n_patients):
        label = ["normal", "bacterial", "covid"][0 if p % 10 < 5 else (1 if p % 10 < 8 else 2)]
        for _ in range(int(rng.integers(1, 5))):
            labels.append(label)
            groups.append(f"P{p:04d}")
    return np.array(labels), np.array(groups)


def test_the_subset_keeps_patients_whole_and_is_stratified():
    labels, groups = _pool()
    mask = labeled_subset(labels, groups, fraction=0.1, seed=3)
    for g in np.unique(groups):  # a patient is all labelled or all unlabelled
        assert len(set(mask[groups == g])) == 1
    assert 0.1 * len(labels) <= mask.sum() <= 0.1 * len(labels) + 3 * 4
    total, kept = Counter(labels), Counter(labels[mask])
    for c in total:  # every class holds about 10 % of its images
        assert kept[c] >= 0.1 * total[c]
        assert kept[c] <= 0.1 * total[c] + 4, (c, kept[c], total[c])


def test_the_subset_is_reproducible_with_the_seed_and_changes_with_another():
    labels, groups = _pool()
    a = labeled_subset(labels, groups, fraction=0.05, seed=0)
    assert np.array_equal(a, labeled_subset(labels, groups, fraction=0.05, seed=0))
    assert not np.array_equal(a, labeled_subset(labels, groups, fraction=0.05, seed=1))


def test_label_count_and_the_knob_errors():
    labels = np.array(["a"] * 60 + ["b"] * 40)
    groups = np.array([f"p{i}" for i in range(100)])  # one image per patient: exact counts
    mask = labeled_subset(labels, groups, count=10, seed=0)
    assert mask.sum() == 10 and Counter(labels[mask]) == {"a": 6, "b": 4}
    with pytest.raises(ConfigError, match="label_count=200 is more than the 100"):
        labeled_subset(labels, groups, count=200)
    with pytest.raises(ConfigError, match="exactly one of"):
        labeled_subset(labels, groups, fraction=0.1, count=3)
    with pytest.raises(RecipeError, match="set one of them"):
        recipe_from_dict({"data": {"label_fraction": 0.1, "label_count": 5}})
    with pytest.raises(RecipeError, match="label_fraction"):
        recipe_from_dict({"data": {"label_fraction": 0.0}})


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    full = build_datasets("synthetic-phantoms", root, synth={"n": 60, "size": 32}, **KW)
    return root, full


def test_build_datasets_leaves_val_test_untouched_and_pools_the_rest(phantoms):
    root, full = phantoms
    few = build_datasets("synthetic-phantoms", root, label_fraction=0.25, **KW)
    m = few.manifest
    assert list(m["split"]) == list(full.manifest["split"]) and len(few.val) == len(full.val)
    train = m[m["split"] == "train"]
    assert len(few.train) == int(train["labeled"].sum()) and len(few.unlabeled) == int((~train["labeled"]).sum())
    assert len(few.train) + len(few.unlabeled) == len(full.train)
    assert m.loc[m["split"] != "train", "labeled"].all()
    assert train.groupby("patient")["labeled"].nunique().max() == 1  # patients whole
    assert set(few.unlabeled.targets) == {-1}
    x, y = few.unlabeled[0]
    assert tuple(x.shape) == (1, 32, 32) and y == -1
    again = build_datasets("synthetic-phantoms", root, label_fraction=0.25, **KW)
    assert list(again.manifest["labeled"]) == list(m["labeled"])
    other = build_datasets("synthetic-phantoms", root, label_fraction=0.25, split_seed=1, **KW)
    assert list(other.manifest.sort_values("path")["labeled"]) != list(m.sort_values("path")["labeled"])
    assert full.unlabeled is None


def test_the_labelled_subset_does_not_depend_on_the_machine_s_patient_salt(phantoms, monkeypatch):
    # The salt is secret and per machine: a subset keyed on salted hashes would differ between machines
    # (and between test sessions), while split_seed alone must decide it, as it decides the splits.
    root, _ = phantoms
    picked = []
    for salt in ("one-machine", "another-machine"):
        monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", salt)
        few = build_datasets("synthetic-phantoms", root, label_fraction=0.4, **KW)
        m = few.manifest.sort_values("path")
        picked.append(list(m["labeled"]))
    assert picked[0] == picked[1]


def test_a_last_batch_of_one_image_is_left_out_so_batchnorm_can_train():
    import torch
    from torch.utils.data import TensorDataset

    from medtricks.run import make_train_loader

    data = TensorDataset(torch.zeros(33, 1), torch.zeros(33))
    sizes = [len(y) for _, y in make_train_loader(data, batch_size=16, seed=0, num_workers=0)]
    assert sizes == [16, 16]
    sizes = [
        len(y)
        for _, y in make_train_loader(
            TensorDataset(torch.zeros(34, 1), torch.zeros(34)), batch_size=16, seed=0, num_workers=0
        )
    ]
    assert sizes == [16, 16, 2]  # only a lone image is left out


def test_an_unlabelled_folder_without_labels_loads(phantoms, tmp_path):
    root, full = phantoms
    folder = tmp_path / "unlabelled" / "site_b"  # nested, no class folders, a stray text file
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray((rng.random((40, 36)) * 255).astype(np.uint8)).save(folder / f"u{i}.png")
    (folder / "notes.txt").write_text("not an image")
    listed = list_unlabeled(tmp_path / "unlabelled")
    assert len(listed) == 5 and set(listed["target"]) == {-1}
    bundle = build_datasets("synthetic-phantoms", root, unlabeled={"root": str(tmp_path / "unlabelled")}, **KW)
    assert len(bundle.unlabeled) == 5 and len(bundle.train) == len(full.train)
    x, y = bundle.unlabeled[4]
    assert tuple(x.shape) == (1, 32, 32) and y == -1
    with_pool = build_datasets(
        "synthetic-phantoms", root, label_fraction=0.5, unlabeled={"root": str(tmp_path / "unlabelled")}, **KW
    )
    assert len(with_pool.unlabeled) == 5 + int((~with_pool.manifest["labeled"]).sum())


def test_an_unlabelled_copy_of_a_validation_image_is_leakage(phantoms, tmp_path):
    root, full = phantoms
    val_path = Path(full.manifest.loc[full.manifest["split"] == "val", "path"].iloc[0])
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "copy.png").write_bytes(val_path.read_bytes())
    with pytest.raises(LeakageError, match="byte-identical to validation/test"):
        build_datasets("synthetic-phantoms", root, unlabeled={"root": str(tmp_path / "u")}, **KW)
    with pytest.raises(Exception, match="not a folder"):
        build_datasets("synthetic-phantoms", root, unlabeled={"root": str(tmp_path / "nowhere")}, **KW)


def test_the_logged_manifest_says_which_rows_kept_their_label(phantoms):
    from medtricks.data import export_manifest

    root, _ = phantoms
    few = build_datasets("synthetic-phantoms", root, label_count=6, **KW)
    out = export_manifest(few.manifest, root)
    assert "labeled" in out.columns and int(out["labeled"].sum()) >= 6 + len(few.val)
    assert isinstance(out, pd.DataFrame)
