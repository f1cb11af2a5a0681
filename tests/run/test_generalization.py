"""Issue 13: a test split model selection never sees, class balancing, the stored operating point."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtricks.data import ManifestError, assign_splits
from medtricks.recipe import RecipeError, load_recipe
from medtricks.run import make_train_loader, run_recipe
from medtricks.tracking import NullStore
from medtricks.tricks.class_balance import balanced_sample_weights, balanced_sampler, class_weights
from medtricks.train.losses import build_loss

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------- id_order test split
def _kermany_like():
    """Two normal ID series (IM-, NORMAL2-IM-) and one pneumonia series (personN), one image each."""
    groups = (
        [f"IM-{i:04d}" for i in range(100, 120)]
        + [f"NORMAL2-IM-{i:04d}" for i in range(400, 410)]
        + [f"person{i}" for i in range(1, 61)]
    )
    labels = ["normal"] * 30 + ["pneumonia"] * 60
    return np.array(labels), np.array(groups)


def test_id_order_holds_out_the_lowest_numbered_patients_of_every_series():
    labels, groups = _kermany_like()
    splits = assign_splits(labels, groups, seed=0, val_fraction=0.2, test_fraction=0.2, test_by="id_order")
    test = set(groups[splits == "test"])
    assert {f"IM-{i:04d}" for i in range(100, 104)} == {g for g in test if g.startswith("IM-")}
    assert {f"NORMAL2-IM-{i:04d}" for i in range(400, 402)} == {g for g in test if g.startswith("NORMAL2")}
    # numeric, not lexical, order: person1..person12 (lexically person10 < person2)
    assert {f"person{i}" for i in range(1, 13)} == {g for g in test if g.startswith("person")}
    # validation is still a random patient-level split of the rest
    assert 0.1 < (splits == "val").mean() < 0.3 and not (set(groups[splits == "val"]) & test)
    # the seed moves validation, never the id_order test split
    other = assign_splits(labels, groups, seed=7, val_fraction=0.2, test_fraction=0.2, test_by="id_order")
    assert set(groups[other == "test"]) == test and (other != splits).any()


def test_id_order_groups_images_of_one_patient_and_keeps_each_series_in_training():
    labels = np.array(["normal"] * 6 + ["pneumonia"] * 2)
    groups = np.array(["IM-0001", "IM-0001", "IM-0002", "IM-0003", "IM-0004", "IM-0005", "person1", "person2"])
    splits = assign_splits(labels, groups, val_fraction=0.01, test_fraction=0.9, test_by="id_order")
    assert splits[0] == splits[1] == "test"
    assert "train" in splits[groups == "person2"] or "val" in splits[groups == "person2"]


def test_test_by_is_validated():
    labels, groups = _kermany_like()
    with pytest.raises(ValueError, match="test_by='newest'"):
        assign_splits(labels, groups, test_fraction=0.2, test_by="newest")
    with pytest.raises(RecipeError, match="test_by"):
        load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=["data.test_by=newest"])


def test_id_order_that_can_hold_out_nobody_is_an_error():
    # every ID series has a single patient, and each series keeps one for training
    labels, groups = np.array(["a", "a", "b", "b"]), np.array(["x1", "y1", "z1", "w1"])
    with pytest.raises(ManifestError, match="holds out no patient"):
        assign_splits(labels, groups, val_fraction=0.3, test_fraction=0.2, test_by="id_order")


# ------------------------------------------------------------------------------------ class balance
def test_class_weights_are_inverse_frequency():
    assert class_weights([0] * 30 + [1] * 10, 2) == pytest.approx([40 / 60, 40 / 20])
    with pytest.raises(ValueError, match=r"class index\(es\) \[2\]"):
        class_weights([0, 1, 1], 3)


def test_weighted_loss_matches_hand_weighted_cross_entropy():
    logits, y = torch.randn(8, 2), torch.tensor([0, 1, 1, 1, 1, 1, 1, 0])
    loss = build_loss(label_smoothing=0.0, mixup=None, class_weights=[2.0, 0.5])(logits, y)
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    w = torch.tensor([2.0, 0.5])[y]
    assert loss.item() == pytest.approx(((per * w).sum() / w.sum()).item(), rel=1e-6)
    with pytest.raises(ValueError, match="class_balance: sampler"):
        build_loss(label_smoothing=0.0, mixup=object(), class_weights=[1.0, 1.0])


class _Targets(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.zeros(1), self.targets[i]


def test_balanced_sampler_draws_classes_equally_and_reproducibly():
    targets = [0] * 900 + [1] * 100
    assert balanced_sample_weights(targets)[0].item() == pytest.approx(1 / 900)
    loader = make_train_loader(
        _Targets(targets), batch_size=100, seed=3, num_workers=0, drop_last=False, sampler=balanced_sampler
    )
    drawn = torch.cat([y for _, y in loader])
    assert len(drawn) == 1000 and 0.44 < drawn.float().mean().item() < 0.56  # ~10 % without balancing
    loader.generator.manual_seed(11)
    first = torch.cat([y for _, y in loader])
    loader.generator.manual_seed(11)
    assert torch.equal(first, torch.cat([y for _, y in loader]))  # the engine's per-epoch re-seed replays it


# -------------------------------------------------------------------------------- end to end, binary
CARD = """name: toy-binary
description: bright vs dark squares
source: https://example.org
license: CC0
citation: none
task: binary
classes: [normal, pneumonia]
label_map: {NORMAL: normal, PNEUMONIA: pneumonia}
layout: {kind: folder}
patient: {regex: '^(?P<patient>(?:IM|person)-\\d+)'}
"""


def _binary_set(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls, prefix, level, n in (("NORMAL", "IM", 60, 16), ("PNEUMONIA", "person", 170, 32)):
        for i in range(n):
            img = np.clip(rng.normal(level, 40, (32, 32)), 0, 255).astype(np.uint8)
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / cls / f"{prefix}-{i:03d}_0.png")
    (root.parent / "toy-binary.yaml").write_text(CARD)
    return root


def test_binary_run_keeps_test_out_of_selection_and_stores_an_operating_point(tmp_path, monkeypatch, capsys):
    data = _binary_set(tmp_path / "data")
    seen_by_selection = []
    import medtricks.train as train_pkg

    original_fit = train_pkg.fit

    def spy_fit(model, train_loader, val_loader, **kw):
        seen_by_selection.extend(val_loader.dataset.manifest["path"])
        seen_by_selection.extend(train_loader.dataset.manifest["path"])
        return original_fit(model, train_loader, val_loader, **kw)

    monkeypatch.setattr(train_pkg, "fit", spy_fit)
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            f"data.card={tmp_path / 'toy-binary.yaml'}",
            f"data.root={data}",
            "data.synth=null",
            "data.image_size=32",
            "data.test_fraction=0.25",
            "data.test_by=id_order",
            "data.val_fraction=0.25",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=2",
            "train.batch_size=16",
            "eval.n_bootstrap=20",
            "train.progress=false",
            "tricks.bn_gamma.strategy=none",
            "tricks.class_balance=loss",
            f"experiment.output_dir={tmp_path / 'runs'}",
            "optim.lr=0.4",
        ],
    )
    tracker = NullStore()
    result = run_recipe(recipe, tracker=tracker)
    out = capsys.readouterr().out
    manifest = result.run_dir / "artifacts" / "split_manifest.csv"
    import pandas as pd

    splits = pd.read_csv(manifest)["split"]
    assert (splits == "test").sum() >= 8
    earliest = tuple(f"IM-{i:03d}_" for i in range(4)) + tuple(f"person-{i:03d}_" for i in range(8))
    test_paths = {str(p) for p in data.rglob("*.png") if p.name.startswith(earliest)}
    assert len(test_paths) == 12 and (splits == "test").sum() == 12
    assert test_paths and not test_paths & set(seen_by_selection)  # earliest IDs: test, never selection
    assert result.test_metrics is not None and "test - val" in out and "operating point" in out
    op_file = result.run_dir / "model" / "operating_point.json"
    from medtricks.evaluate.operating_point import OperatingPoint

    op = OperatingPoint.from_json(op_file)
    assert 0.0 <= op.threshold <= 1.0 and op.method == "youden"
    assert op.train_priors == [0.5, 0.5]  # class_balance=loss trains against equal priors
    for key in (
        "best/test/auroc",
        "best/test/op/accuracy",
        "best/val/op/specificity/pneumonia",
        "test-val/auroc",
        "test-val/accuracy",
    ):
        assert key in tracker.metrics, key
    assert tracker.params["class_weights"] != "none"
    assert "model/operating_point.json" in tracker.artifacts


def test_a_declared_test_folder_wins_over_test_fraction(tmp_path):
    from medtricks.data import build_manifest, card_from_dict

    rng = np.random.default_rng(0)
    for split, ids in (("train", range(0, 12)), ("test", range(100, 104))):
        for cls in ("NORMAL", "PNEUMONIA"):
            for i in ids:
                (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"person{i}{cls[0]}_0.png"
                )
    card = card_from_dict(
        {
            "name": "toy",
            "description": "toy",
            "source": "https://example.org",
            "license": "CC0",
            "citation": "none",
            "task": "binary",
            "classes": ["normal", "pneumonia"],
            "label_map": {"NORMAL": "normal", "PNEUMONIA": "pneumonia"},
            "layout": {"kind": "folder", "split_dirs": {"train": "train", "test": "test"}},
            "patient": {"regex": r"^(?P<patient>person\d+[NP])"},
        }
    )
    m = build_manifest(card, tmp_path, val_fraction=0.25, test_fraction=0.3, test_by="id_order")
    test_rows = m[m["split"] == "test"]
    assert len(test_rows) == 8 and all("/test/" in p for p in test_rows["path"])
    assert not any("/test/" in p for p in m[m["split"] != "test"]["path"])


@pytest.mark.realdata
def test_real_kermany_id_order_test_split_holds_the_earliest_patients(real_data_dir):
    root = real_data_dir / "kermany224"
    if not (root / "train").is_dir():
        pytest.skip(f"{root / 'train'} not present (see ../shared/data/README.md)")
    from medtricks.data import build_manifest, load_card

    m = build_manifest(load_card("kermany-pneumonia"), root, val_fraction=0.15, test_fraction=0.15, test_by="id_order")
    names = m["path"].map(lambda p: Path(p).name)
    test = names[m["split"] == "test"]
    assert abs(len(test) / len(m) - 0.15) < 0.02
    # the lowest-numbered patient of each series is held out, the highest is not
    for earliest, latest in (
        ("IM-0115-", "IM-0766-"),
        ("NORMAL2-IM-0383-", "NORMAL2-IM-1423-"),
        ("person1_", "person1945_"),
    ):
        assert test.str.startswith(earliest).any() and not test.str.startswith(latest).any()
    assert set(m.loc[m["split"] == "test", "patient"]).isdisjoint(m.loc[m["split"] != "test", "patient"])


def test_split_table_lists_every_class_for_multiclass_and_the_gap():
    from medtricks.evaluate import compute_metrics
    from medtricks.evaluate.split_table import headline_keys, split_gaps, split_table

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    probs = rng.dirichlet([1, 1, 1], 60)
    val = compute_metrics(y, probs, ["a", "b", "c"], n_bootstrap=0)
    test = compute_metrics(y[:30], probs[:30], ["a", "b", "c"], n_bootstrap=0)
    keys = headline_keys(val.values)
    assert {"sensitivity/a", "specificity/c", "accuracy", "auroc"} <= set(keys)
    text = split_table({"val": val, "test": test}, keys=keys)
    assert "test - val" in text and "sensitivity/b" in text
    gaps = split_gaps({"val": val, "test": test}, keys=keys)
    assert gaps["test-val/accuracy"] == pytest.approx(test.values["accuracy"] - val.values["accuracy"])


def test_cxr_shift_preset_is_seeded_and_changes_acquisition_not_shape():
    import random

    from medtricks.data.transforms import build_transforms

    img = np.random.default_rng(0).random((80, 72)).astype(np.float32)
    t = build_transforms("cxr_shift", 48, mean=(0.5,), std=(0.5,), in_chans=1, train=True)
    random.seed(3)
    a = [t(img) for _ in range(8)]
    random.seed(3)
    b = [t(img) for _ in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible from python's random
    assert all(x.shape == (1, 48, 48) and -1.0 <= x.min() and x.max() <= 1.0 for x in a)
    assert len({round(float(x.mean()), 4) for x in a}) > 4  # exposure/contrast actually vary
    eval_t = build_transforms("cxr_shift", 48, mean=(0.5,), std=(0.5,), in_chans=1, train=False)
    assert torch.equal(eval_t(img), eval_t(img))  # evaluation is deterministic
