"""build_datasets / XrayDataset: synthetic quickstart path, decode cache, bad images (error / skip),
leakage stops the build, no PHI anywhere a run could log it (paths redacted, the quarantine exported by image ID)."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medtricks.data import (
    BadImageError,
    LeakageError,
    XrayDataset,
    build_datasets,
    build_manifest,
    build_transforms,
    cards_dir,
    data_check_report,
    export_manifest,
    export_quarantine,
    load_card,
    read_image_with_meta,
    redact_paths,
    synthesize_phantoms,
)
from medtricks.data.manifest import image_id
from medtricks.data.synthetic import FAKE_PATIENT_NAME

KW = dict(image_size=32, mean=(0.5,), std=(0.5,), in_chans=1, progress=False)


@pytest.fixture
def phantoms(tmp_path):
    root = tmp_path / "phantoms"
    synthesize_phantoms(root, n=60, size=48, seed=0)
    return root


def test_quickstart_path_generates_then_reuses(tmp_path):
    root = tmp_path / "ph"
    bundle = build_datasets(
        "synthetic-phantoms", root, synth={"n": 40, "size": 48, "seed": 0, "format": "png"}, augment="cxr_light", **KW
    )
    assert (root / "phantoms.csv").is_file()
    assert bundle.classes == ["normal", "bacterial", "covid"] and bundle.card.name == "synthetic-phantoms"
    assert len(bundle.train) + len(bundle.val) == 40 and bundle.test is None
    assert bundle.quarantine.empty and list(bundle.quarantine.columns) == ["path", "label", "reason"]
    x, y = bundle.train[0]
    assert tuple(x.shape) == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert set(bundle.manifest["split"]) == {"train", "val"}
    # same settings: reused; other settings: a clear error instead of silently using other data
    again = build_datasets("synthetic-phantoms", root, synth={"n": 40, "size": 48}, **KW)
    assert again.manifest["path"].tolist() == bundle.manifest["path"].tolist()
    with pytest.raises(ValueError, match=r"already holds a phantom set.*'n': \(40, 80\)"):
        build_datasets("synthetic-phantoms", root, synth={"n": 80, "size": 48}, **KW)
    with pytest.raises(ValueError, match="unknown key"):
        build_datasets("synthetic-phantoms", root, synth={"n": 40, "colour": True}, **KW)


def test_synth_only_for_the_phantom_card(tmp_path):
    with pytest.raises(ValueError, match="only for the 'synthetic-phantoms' card"):
        build_datasets("kermany-pneumonia", tmp_path, synth={"n": 10}, **KW)


def test_splits_and_test_fraction(phantoms):
    bundle = build_datasets("synthetic-phantoms", phantoms, val_fraction=0.2, test_fraction=0.2, **KW)
    sizes = {s: len(getattr(bundle, s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 60 and min(sizes.values()) > 0
    per_patient = bundle.manifest.groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    assert bundle.val.targets == bundle.manifest[bundle.manifest["split"] == "val"]["target"].tolist()


def test_cache_gives_identical_items_and_skips_decoding(phantoms, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cached = build_datasets("synthetic-phantoms", phantoms, cache_dir=cache, **KW)
    plain = build_datasets("synthetic-phantoms", phantoms, **KW)
    assert len(list(cache.glob("*.pt"))) == 60  # filled during the image scan
    for a, b in ((cached.train, plain.train), (cached.val, plain.val)):
        random.seed(5)
        xa = torch.stack([a[i][0] for i in range(len(a))])
        random.seed(5)
        xb = torch.stack([b[i][0] for i in range(len(b))])
        assert torch.equal(xa, xb)

    import medtricks.data.xray_dataset as datasets_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(datasets_module, "read_image", no_decoding)
    again = build_datasets("synthetic-phantoms", phantoms, cache_dir=cache, **KW)
    assert len(again.train) == len(cached.train) and again.train[0][0].shape == (1, 32, 32)


def test_cached_items_keep_their_own_labels(phantoms, tmp_path):
    # The image scan fills the cache first with every item labelled 0; a dataset must still return the
    # labels of its own manifest (a bug once returned the cached 0 for every image).
    cache = tmp_path / "cache"
    bundle = build_datasets("synthetic-phantoms", phantoms, cache_dir=cache, **KW)
    for split in (bundle.train, bundle.val):
        labels = [split[i][1] for i in range(len(split))]
        assert labels == split.targets and len(set(labels)) > 1
    # the same bytes under another label (a copy in another folder) get that label, from the same cache entry
    m = build_manifest("synthetic-phantoms", phantoms).head(4)
    t = build_transforms("none", 32, mean=(0.5,), std=(0.5,), in_chans=1, train=False)
    relabelled = m.assign(target=[(int(v) + 1) % 3 for v in m["target"]])
    assert [XrayDataset(relabelled, t, cache_dir=cache)[i][1] for i in range(4)] == relabelled["target"].tolist()


def test_cache_key_follows_content_not_path(phantoms, tmp_path):
    cache = tmp_path / "cache"
    m = build_manifest("synthetic-phantoms", phantoms)
    t = build_transforms("none", 32, mean=(0.5,), std=(0.5,), in_chans=1, train=False)
    first = XrayDataset(m.head(1), t, cache_dir=cache)[0][0]
    # new bytes at the same path -> a new cache entry, new pixels

    path = m["path"].iloc[0]
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48), dtype=np.uint8)).save(path)
    second = XrayDataset(m.head(1), t, cache_dir=cache)[0][0]
    assert not torch.equal(first, second)
    assert len(list(cache.glob("*.pt"))) == 2


def _break_some(root):
    m = pd.read_csv(root / "phantoms.csv")
    (root / m["path"][3]).write_bytes(b"")
    data = (root / m["path"][7]).read_bytes()
    (root / m["path"][7]).write_bytes(data[: len(data) // 2])
    (root / m["path"][11]).unlink()
    return {str((root / m["path"][i]).resolve()) for i in (3, 7, 11)}


def test_bad_images_error_lists_every_file(phantoms):
    broken = _break_some(phantoms)
    with pytest.raises(BadImageError) as err:
        build_datasets("synthetic-phantoms", phantoms, **KW)
    message = str(err.value)
    assert "3 unusable image(s)" in message and "on_bad_image=skip" in message
    for path in broken:
        assert path in message
    assert "empty file" in message and "truncated" in message and "file not found" in message


def test_bad_images_skip_goes_to_quarantine(phantoms):
    broken = _break_some(phantoms)
    bundle = build_datasets("synthetic-phantoms", phantoms, on_bad_image="skip", **KW)
    assert set(bundle.quarantine["path"]) == broken
    assert bundle.quarantine["reason"].str.len().gt(5).all()
    assert not set(bundle.manifest["path"]) & broken
    assert len(bundle.train) + len(bundle.val) == 57
    with pytest.raises(ValueError, match="on_bad_image='ignore'"):
        build_datasets("synthetic-phantoms", phantoms, on_bad_image="ignore", **KW)


def test_leakage_stops_the_build(phantoms):
    m = build_manifest("synthetic-phantoms", phantoms)
    src = m[m["split"] == "train"]["path"].iloc[0]
    dst = m[m["split"] == "val"]["path"].iloc[0]
    with open(src, "rb") as fh:
        data = fh.read()
    with open(dst, "wb") as fh:
        fh.write(data)
    with pytest.raises(LeakageError) as err:
        build_datasets("synthetic-phantoms", phantoms, **KW)
    assert src in str(err.value) and dst in str(err.value)


def test_dataloader_with_workers(phantoms, tmp_path):
    bundle = build_datasets(
        "synthetic-phantoms", phantoms, cache_dir=tmp_path / "c", augment="paper_baseline", **{**KW, "in_chans": 3}
    )
    loader = torch.utils.data.DataLoader(
        bundle.train, batch_size=8, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0)
    )
    xb, yb = next(iter(loader))
    assert tuple(xb.shape) == (8, 3, 32, 32) and yb.dtype == torch.int64


def test_dicom_phantoms_never_leak_phi(tmp_path):
    root = tmp_path / "dcm"
    synthesize_phantoms(root, n=24, size=48, fmt="dicom", seed=2)
    raw_ids = set(pd.read_csv(root / "phantoms.csv")["patient"])
    import pydicom

    header = pydicom.dcmread(next((root / "images").glob("*.dcm")), stop_before_pixels=True)
    assert str(header.PatientName) == FAKE_PATIENT_NAME and header.PatientID in raw_ids

    bundle = build_datasets("synthetic-phantoms", root, **KW)
    report = data_check_report("synthetic-phantoms", root, progress=False)
    texts = {
        "manifest": bundle.manifest.to_csv(),
        "export": export_manifest(bundle.manifest, root).to_csv(),
        "report": report,
        "quarantine": bundle.quarantine.to_csv(),
        "meta": repr([read_image_with_meta(p)[1] for p in bundle.manifest["path"][:5]]),
        "dataset": repr(bundle.train),
    }
    for where, text in texts.items():
        assert FAKE_PATIENT_NAME not in text and "PHANTOM" not in text, where
        assert not any(pid in text for pid in raw_ids), where
    assert len(bundle.train) + len(bundle.val) == 24


def test_card_object_and_path_are_accepted(phantoms, tmp_path):
    card = load_card("synthetic-phantoms")
    a = build_datasets(card, phantoms, **KW)
    path = tmp_path / "copy.yaml"
    path.write_text((cards_dir() / "synthetic-phantoms.yaml").read_text())
    b = build_datasets(str(path), phantoms, **KW)
    assert a.manifest["split"].tolist() == b.manifest["split"].tolist()


def test_datasets_pickle_for_spawned_workers(phantoms, tmp_path):
    import pickle

    bundle = build_datasets("synthetic-phantoms", phantoms, cache_dir=tmp_path / "c", **KW)
    clone = pickle.loads(pickle.dumps(bundle.train))
    random.seed(0)
    a = clone[0][0]
    random.seed(0)
    assert torch.equal(a, bundle.train[0][0])


# ------------------------------------------------------------------------------------ item 2: unit
def test_redact_paths_and_export_quarantine_hash_every_data_path(phi_set, tmp_path):
    data = phi_set(tmp_path)
    bad = data / "PNEUMONIA" / "ZZMRN12399_ZZPHI_0.png"
    spaced = data / "NORMAL" / "ZZMRN12300 ZZPHI copy.png"
    spaced.write_bytes(b"x")
    text = (
        f"BadImageError: {bad}: 2 unusable image(s) in {data} (card 'zz-toy'); fix:\n  {bad}: truncated\n"
        f"  {spaced}: empty\nrelative PNEUMONIA/ZZMRN12399_ZZPHI_0.png, bare 'ZZMRN12300_ZZPHI_1.png', "
        f"deleted {data}/NORMAL/ZZMRN12377_ZZPHI_9.png. lr 0.5, file.py"
    )
    out = redact_paths(text, data)
    assert "ZZMRN123" not in out and "ZZPHI" not in out, out
    expected = f"<data root>/{image_id('PNEUMONIA/ZZMRN12399_ZZPHI_0.png')}"
    assert out.startswith(f"BadImageError: {expected}: 2 unusable") and out.count(expected) == 3
    assert f"in {data} (card 'zz-toy')" in out and "lr 0.5, file.py" in out  # the root itself and prose stay
    assert redact_paths(text, f"{data}/") == out  # the root as given, with a trailing slash

    quarantine = pd.DataFrame({"path": [str(bad)], "label": ["pneumonia"], "reason": [f"cannot decode {bad}"]})
    exported = export_quarantine(quarantine, data)
    assert list(exported.columns) == ["image_id", "label", "reason"]
    assert exported["image_id"].tolist() == [image_id("PNEUMONIA/ZZMRN12399_ZZPHI_0.png")]
    assert "ZZMRN" not in exported.to_csv() and expected in exported["reason"][0]
