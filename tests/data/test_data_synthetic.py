"""Synthetic phantoms: deterministic, fast, class lesions visible, PNG and DICOM agree."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pandas as pd
import pytest

from medtricks.data import build_manifest, read_image, synthesize_phantoms


def _digest(root):
    h = hashlib.sha256((root / "phantoms.csv").read_bytes())
    for path in sorted((root / "images").iterdir()):
        h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    a = synthesize_phantoms(tmp_path / "a", n=20, size=32, seed=4)
    synthesize_phantoms(tmp_path / "b", n=20, size=32, seed=4)
    synthesize_phantoms(tmp_path / "c", n=20, size=32, seed=5)
    assert a == tmp_path / "a" / "phantoms.csv"
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_quickstart_size_is_fast(tmp_path):
    start = time.perf_counter()
    synthesize_phantoms(tmp_path / "q", n=300, size=64)
    elapsed = time.perf_counter() - start
    assert elapsed < 8, f"300 64-px phantoms took {elapsed:.1f}s"
    m = pd.read_csv(tmp_path / "q" / "phantoms.csv")
    assert len(m) == 300 and list(m.columns) == ["path", "label", "patient"]


def test_manifest_balanced_and_several_images_per_patient(tmp_path):
    synthesize_phantoms(tmp_path, n=120, size=32, seed=0)
    m = pd.read_csv(tmp_path / "phantoms.csv")
    counts = m["label"].value_counts()
    assert set(counts.index) == {"normal", "bacterial", "covid"} and counts.min() >= 25
    per_patient = m.groupby("patient").size()
    assert per_patient.max() > 1 and per_patient.max() <= 4
    assert (m.groupby("patient")["label"].nunique() == 1).all()  # one diagnosis per patient
    # file names do not carry the patient ID
    assert not any(pid in path for pid, path in zip(m["patient"], m["path"]))


def test_lesions_make_lungs_denser(tmp_path):
    synthesize_phantoms(tmp_path, n=90, size=64, seed=1)
    m = pd.read_csv(tmp_path / "phantoms.csv")
    lung_means = {}
    for label, rows in m.groupby("label"):
        imgs = np.stack([read_image(tmp_path / p) for p in rows["path"]])
        # both lung fields: lateral bands at mid height
        lungs = np.concatenate(
            [imgs[:, 26:40, 16:24].reshape(len(imgs), -1), imgs[:, 26:40, 40:48].reshape(len(imgs), -1)], axis=1
        )
        lung_means[label] = lungs.mean()
        centre = imgs[:, 20:40, 30:34].mean()
        assert lungs.mean() < centre  # bright = dense: mediastinum/spine above lungs
    assert lung_means["bacterial"] > lung_means["normal"] + 0.01
    assert lung_means["covid"] > lung_means["normal"] + 0.01


def test_dicom_output_matches_png_including_monochrome1(tmp_path):
    import pydicom

    synthesize_phantoms(tmp_path / "png", n=12, size=48, seed=3)
    synthesize_phantoms(tmp_path / "dcm", n=12, size=48, seed=3, fmt="dicom")
    png = pd.read_csv(tmp_path / "png" / "phantoms.csv")
    dcm = pd.read_csv(tmp_path / "dcm" / "phantoms.csv")
    assert (png["label"] == dcm["label"]).all() and (png["patient"] == dcm["patient"]).all()
    photometrics = set()
    for p, d in zip(png["path"], dcm["path"]):
        photometrics.add(pydicom.dcmread(tmp_path / "dcm" / d, stop_before_pixels=True).PhotometricInterpretation)
        a, b = read_image(tmp_path / "png" / p), read_image(tmp_path / "dcm" / d)
        assert np.abs(a - b).max() < 1.5 / 255  # 8-bit PNG vs 12-bit DICOM of the same drawing
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert len(build_manifest("synthetic-phantoms", tmp_path / "dcm")) == 12


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(fmt="jpeg"), "fmt='jpeg'"),
        (dict(n=0), "n=0"),
        (dict(size=8), "size=8"),
        (dict(classes=("normal",)), "2 or more"),
        (dict(classes=("normal", "tuberculosis")), "tuberculosis"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        synthesize_phantoms(tmp_path, **kwargs)
