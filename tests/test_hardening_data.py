"""Issue 15, items 9-13: symlinked data, decompression bombs, conflicting duplicates and 12-bit PNGs,
the exit code of `medtricks data check`, and strict YAML (duplicate keys, aliases, bools as numbers)."""

from __future__ import annotations

import shutil
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medtricks.data import (
    BadImageError,
    CardError,
    LeakageError,
    ManifestError,
    build_datasets,
    build_manifest,
    card_from_dict,
    export_manifest,
    load_card,
    read_image,
    scan_images,
)
from medtricks.data.readers import BitDepthWarning, read_image_with_meta
from medtricks.recipe import RecipeError, load_recipe, recipe_from_dict

CARD_BASE = {"description": "toy", "source": "https://example.org", "license": "CC0", "citation": "none"}


def _png(path: Path, seed: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)).save(path)
    return path


def _folder_set(root: Path, n_patients: int = 8, per_patient: int = 2, start: int = 0, seed: int = 0) -> Path:
    for p in range(start, start + n_patients):
        cls = ("NORMAL", "PNEUMONIA")[p % 2]
        for i in range(per_patient):
            _png(root / cls / f"person{p}_img{i}.png", seed + 100 * p + i)
    return root


def _card_dict(**changes) -> dict:
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


def _card(**changes):
    return card_from_dict(_card_dict(**changes))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A 60-byte PNG whose header claims side x side pixels (PIL refuses it on open, before decoding)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0")) + _chunk(b"IEND", b"")
    )
    return path


def _with_sbit(path: Path, bits: int) -> Path:
    data = path.read_bytes()
    at = data.index(b"IDAT") - 4
    path.write_bytes(data[:at] + _chunk(b"sBIT", bytes([bits])) + data[at:])
    return path


# ------------------------------------------------------------------------------- 9. symlinks
def test_symlinked_class_and_split_folders_are_followed_and_loops_are_not(tmp_path):
    elsewhere = _folder_set(tmp_path / "elsewhere", n_patients=6)
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / "train" / cls).symlink_to(elsewhere / cls, target_is_directory=True)
    _folder_set(tmp_path / "test_real", n_patients=4, start=10, seed=7)
    (root / "test").symlink_to(tmp_path / "test_real", target_is_directory=True)  # a linked split folder
    (root / "train" / "NORMAL" / "loop").symlink_to(root, target_is_directory=True)  # a loop back to the root
    card = _card(layout={"kind": "folder", "split_dirs": {"train": "train", "test": "test"}})
    start = time.monotonic()
    m = build_manifest(card, root, val_fraction=0.3)
    assert time.monotonic() - start < 30
    assert len(m) == 12 + 8
    assert all(p.startswith(str(root.resolve())) for p in m["path"])  # link paths, not their targets
    assert set(m.loc[m["path"].str.contains("/test/"), "split"]) == {"test"}
    assert m.attrs["notes"] == {"symlinked folders not followed (they loop back to a parent)": 1}


def test_symlinked_file_outside_the_root_is_kept_under_its_link_path(tmp_path):
    root = _folder_set(tmp_path / "data", n_patients=6)
    outside = _png(tmp_path / "outside" / "scan.png", 999)
    link = root / "NORMAL" / "person20_img0.png"
    link.symlink_to(outside)
    (root / "PNEUMONIA" / "person21_img0.png").symlink_to(tmp_path / "missing.png")  # broken: counted
    m = build_manifest(_card(), root, val_fraction=0.3)
    assert str(root.resolve() / "NORMAL" / "person20_img0.png") in set(m["path"])  # the link, not its target
    assert m.attrs["notes"]["broken symlinks ignored"] == 1
    exported = export_manifest(m, root, keep_paths=True)
    assert "NORMAL/person20_img0.png" in set(exported["path"])
    assert read_image(m.loc[m["path"].str.endswith("person20_img0.png"), "path"].iloc[0]).shape == (32, 32)


# ------------------------------------------------------------------------------- 10. pixel limit
def test_decompression_bomb_is_quarantined_or_named(tmp_path):
    root = _folder_set(tmp_path / "data", n_patients=8)
    bomb = _bomb_png(root / "NORMAL" / "person0_img1.png")
    kwargs = dict(image_size=32, mean=(0.5,), std=(0.5,), in_chans=1, progress=False, augment="none")
    bundle = build_datasets(_card(), root, on_bad_image="skip", **kwargs)
    assert list(bundle.quarantine["path"]) == [str(bomb)]
    reason = bundle.quarantine["reason"].iloc[0]
    assert "larger than the pixel limit" in reason and "400,000,000 pixels" in reason
    assert "MEDTRICKS_MAX_IMAGE_PIXELS" in reason
    with pytest.raises(BadImageError) as err:
        build_datasets(_card(), root, on_bad_image="error", **kwargs)
    assert str(bomb) in str(err.value) and "pixel limit" in str(err.value)


def test_pixel_limit_can_be_raised_for_genuine_large_images(tmp_path, monkeypatch):
    path = _png(tmp_path / "big.png", 1, size=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32*32 > 2*100: a "bomb" for Pillow
    with pytest.raises(BadImageError, match=r"big\.png: image is larger than the pixel limit"):
        read_image(path)
    monkeypatch.setenv("MEDTRICKS_MAX_IMAGE_PIXELS", "none")
    assert read_image(path).shape == (32, 32)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored after the read


# ------------------------------------------------------------------------------- 11. duplicates
def test_identical_bytes_with_two_labels_stop_the_manifest_unless_the_card_allows_them(tmp_path):
    root = _folder_set(tmp_path / "data", n_patients=8)
    src = root / "NORMAL" / "person0_img0.png"
    copy = root / "PNEUMONIA" / "person31_img0.png"
    shutil.copyfile(src, copy)
    with pytest.raises(ManifestError, match="identical bytes under different labels") as err:
        build_manifest(_card(), root, val_fraction=0.3)
    assert str(src) in str(err.value) and str(copy) in str(err.value)
    with pytest.raises(ManifestError, match="identical bytes"):  # the run stops too
        build_datasets(_card(), root, image_size=32, mean=(0.5,), std=(0.5,), in_chans=1, progress=False)
    allowed = _card(allow_conflicting_duplicates=True)
    m = build_manifest(allowed, root, val_fraction=0.3)
    (group,) = m.attrs["conflicting_duplicates"]
    assert {(p, label) for p, label, _ in group} == {(str(src), "normal"), (str(copy), "pneumonia")}


def test_identical_bytes_with_two_labels_across_declared_splits(tmp_path):
    root = tmp_path / "data"
    _folder_set(root / "train", n_patients=6)
    _folder_set(root / "test", n_patients=4, start=10, seed=5)
    src = root / "train" / "NORMAL" / "person0_img0.png"
    copy = root / "test" / "PNEUMONIA" / "person11_img9.png"
    shutil.copyfile(src, copy)
    card = _card(layout={"kind": "folder", "split_dirs": {"train": "train", "test": "test"}})
    with pytest.raises(LeakageError, match="identical bytes under different labels") as err:
        build_manifest(card, root, val_fraction=0.3)
    assert f"{copy} (pneumonia, test)" in str(err.value) and set(err.value.files) == {str(src), str(copy)}


def test_allow_conflicting_duplicates_is_a_card_yaml_key(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(_card_dict(allow_conflicting_duplicates=True)))
    assert load_card(path).allow_conflicting_duplicates is True
    assert load_card("kermany-pneumonia").allow_conflicting_duplicates is False


def test_twelve_bit_png_is_read_with_twelve_bits_and_warns(tmp_path):
    values = np.linspace(0, 4000, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "twelve.png")
    with pytest.warns(BitDepthWarning, match=r"twelve\.png: 16-bit image holding 12-bit data"):
        image, meta = read_image_with_meta(tmp_path / "twelve.png")
    assert meta["bits"] == 12
    assert image.max() == pytest.approx(4000 / 4095, abs=1e-6)  # was 4000 / 65535 = 0.061
    # An sBIT chunk names the depth when the values fit in it.
    Image.fromarray((values // 4).astype(np.uint16)).save(tmp_path / "ten.png")
    with pytest.warns(BitDepthWarning, match="sBIT"):
        image = read_image(_with_sbit(tmp_path / "ten.png", 10))
    assert image.max() == pytest.approx(1000 / 1023, abs=1e-6)
    # A 16-bit image that uses its range keeps the 16-bit scale, without a warning.
    Image.fromarray(values * 16).save(tmp_path / "sixteen.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BitDepthWarning)
        assert read_image(tmp_path / "sixteen.png").max() == pytest.approx(64000 / 65535, abs=1e-6)


def test_twelve_bit_dataset_warns_once(tmp_path):
    paths = []
    for i in range(4):
        arr = np.random.default_rng(i).integers(0, 4096, (32, 32)).astype(np.uint16)
        Image.fromarray(arr).save(tmp_path / f"x{i}.png")
        paths.append(str(tmp_path / f"x{i}.png"))
    manifest = pd.DataFrame({"path": paths, "label": ["a"] * 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        good, bad = scan_images(manifest, progress=False)
    bit_warnings = [w for w in caught if issubclass(w.category, BitDepthWarning)]
    assert len(bit_warnings) == 1 and "4 of 4 images" in str(bit_warnings[0].message)
    assert paths[0] in str(bit_warnings[0].message)
    assert len(good) == 4 and all(good["bit_depth_note"] != "")


# ------------------------------------------------------------------------------- 12. data check exit code
def _card_file(tmp_path, **changes) -> Path:
    path = tmp_path / "toy-card.yaml"
    path.write_text(yaml.safe_dump(_card_dict(**changes)))
    return path


def test_data_check_exits_1_on_problems_and_0_when_clean(tmp_path, capsys):
    from medtricks.cli import main

    root = _folder_set(tmp_path / "data", n_patients=8)
    card = _card_file(tmp_path)
    assert main(["data", "check", str(card), "--root", str(root)]) == 0
    assert "FAILED" not in capsys.readouterr().out

    (root / "NORMAL" / "person0_img1.png").write_bytes(b"")  # unreadable
    assert main(["data", "check", str(card), "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "Unreadable files: 1" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("medtricks data check: FAILED:") and "1 unreadable file" in last
    assert out.index("Known pitfalls") < out.index("FAILED")  # the report first, then the summary


def test_data_check_reports_conflicting_duplicates_and_leakage(tmp_path, capsys):
    from medtricks.cli import main
    from medtricks.data.report import data_check

    root = _folder_set(tmp_path / "data", n_patients=8)
    shutil.copyfile(root / "NORMAL" / "person0_img0.png", root / "PNEUMONIA" / "person31_img0.png")
    check = data_check(_card(), root, progress=False)
    assert "Identical files with different labels: 1 group(s)" in check.text
    assert "NORMAL/person0_img0.png (normal," in check.text
    assert any("different labels" in p for p in check.problems)
    assert main(["data", "check", str(_card_file(tmp_path)), "--root", str(root)]) == 1
    assert "different labels" in capsys.readouterr().out.strip().splitlines()[-1]
    allowed = data_check(_card(allow_conflicting_duplicates=True), root, progress=False)
    assert "allowed by the card" in allowed.text
    assert not any("different labels" in p for p in allowed.problems)


# ------------------------------------------------------------------------------- 13. strict YAML
def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_recipe_duplicate_keys_are_refused_with_key_and_lines(tmp_path):
    path = _recipe(tmp_path, "train:\n  epochs: 1\n  batch_size: 8\n  epochs: 5\n")
    with pytest.raises(RecipeError, match=r"duplicate key 'epochs' \(first on line 2, again on line 4\)"):
        load_recipe(path)


def test_recipe_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    # Each level repeats the one before 9 times: 9**6 leaves from ~400 bytes (9**9 gave a 351 MB message).
    lines = ["experiment:", "  tags:", "    a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcde", "bcdef"):
        lines.append(f"    {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    path = _recipe(tmp_path, "\n".join(lines) + "\n")
    assert path.stat().st_size < 500
    start = time.monotonic()
    with pytest.raises(RecipeError, match="anchors and aliases are not allowed in a recipe") as err:
        load_recipe(path)
    assert time.monotonic() - start < 5 and len(str(err.value)) < 1000
    assert "line 3" in str(err.value)


def test_card_duplicate_keys_and_aliases_are_refused(tmp_path):
    text = yaml.safe_dump(_card_dict())
    path = tmp_path / "dup.yaml"
    path.write_text(text + "task: multiclass\n")
    with pytest.raises(CardError, match=r"duplicate key 'task'"):
        load_card(path)
    path.write_text(text.replace("classes:", "extra: &c [normal, pneumonia]\nclasses:", 1))
    with pytest.raises(CardError, match="anchors and aliases are not allowed in a data card"):
        load_card(path)


def test_values_echoed_in_recipe_errors_are_capped():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"data": {"val_fraction": "9" * 200_000 + "x"}})
    assert "data.val_fraction" in str(err.value) and len(str(err.value)) < 2000


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("train", "batch_size", True),
        ("train", "epochs", False),
        ("model", "in_chans", True),
        ("optim", "lr", True),
        ("train", "max_steps_per_epoch", True),
        ("optim", "betas", [0.9, True]),
        ("ablation", "seeds", True),
    ],
)
def test_booleans_are_refused_for_number_fields(section, key, value):
    with pytest.raises(RecipeError, match=rf"{section}\.{key} = .*boolean"):
        recipe_from_dict({section: {key: value}})


def test_numbers_lists_and_booleans_still_validate_where_they_belong():
    recipe = recipe_from_dict(
        {
            "optim": {"lr": 1, "betas": [1, 0]},
            "train": {"batch_size": 4, "progress": False},
            "ablation": {"seeds": [0, 1]},
            "model": {"in_chans": 3},
        }
    )
    assert recipe.optim.lr == 1.0 and recipe.optim.betas == (1.0, 0.0) and recipe.train.batch_size == 4
    assert recipe.train.progress is False and recipe.model.in_chans == 3


def test_shipped_recipes_and_cards_load_with_the_strict_loader():
    root = Path(__file__).resolve().parents[1]
    recipes = [load_recipe(path) for path in sorted((root / "recipes").glob("*.yaml"))]
    cards = [load_card(path) for path in sorted((root / "data_cards").glob("*.yaml"))]
    assert len(recipes) >= 10 and all(r.experiment.name for r in recipes)
    assert len(cards) >= 3 and all(c.classes for c in cards)
