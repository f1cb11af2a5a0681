"""Readers: PNG/JPEG 8/16-bit, RGB-encoded gray, DICOM (MONOCHROME1/2, with and without meta header,
windowed, rescaled), bad inputs, no PHI in metadata, and the four real DICOMs when present; the pixel limit
(decompression bombs), 12-bit data in 16-bit PNGs, truncated DICOMs."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtricks.data import BadImageError, build_datasets, read_image, read_image_with_meta, scan_images
from medtricks.data.readers import SAFE_META_FIELDS, BitDepthWarning

SECRET_NAME, SECRET_ID, SECRET_DATE = "PHANTOM^SECRET", "SECRET-ID-42", "19550505"


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric="MONOCHROME2",
    meta=True,
    window=None,
    slope=None,
    intercept=None,
    bits=12,
    pixel_data=True,
) -> Path:
    """A minimal DX DICOM with identifying (fake) tags; ``meta=False`` writes no preamble / meta header."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = SECRET_NAME, SECRET_ID, SECRET_DATE
    ds.StudyDate, ds.InstitutionName = SECRET_DATE, "Secret Hospital"
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixel_data:
        ds.PixelData = stored.astype(np.uint16).tobytes()
    if meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path


def ramp(h=8, w=16, top=4095) -> np.ndarray:
    return np.linspace(0, top, h * w).reshape(h, w).round().astype(np.uint16)


# ------------------------------------------------------------------------------------ PNG / JPEG
def test_png_8bit_exact(tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.dtype == np.float32 and img.shape == (8, 8)
    np.testing.assert_allclose(img, arr / 255.0, atol=1e-7)


def test_png_16bit_uses_full_range(tmp_path):
    arr = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a16.png")
    img, meta = read_image_with_meta(tmp_path / "a16.png")
    np.testing.assert_allclose(img, arr / 65535.0, atol=1e-7)
    assert meta["bits"] == 16 and meta["format"] == "png"


def test_rgb_encoded_gray_collapses_exactly(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (12, 10), dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.png")
    img, meta = read_image_with_meta(tmp_path / "rgb.png")
    assert img.shape == (12, 10) and meta["color_collapsed"] == "gray_rgb"
    np.testing.assert_allclose(img, gray / 255.0, atol=1e-7)


def test_true_colour_becomes_luma(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    rgb[0, 0] = 0
    Image.fromarray(rgb).save(tmp_path / "red.png")
    img, meta = read_image_with_meta(tmp_path / "red.png")
    assert meta["color_collapsed"] == "luma"
    assert img[1, 1] == pytest.approx(0.299, abs=1e-3)


def test_jpeg_reads_gray(tmp_path):
    arr = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    Image.fromarray(arr).save(tmp_path / "a.jpeg", quality=95)
    img = read_image(tmp_path / "a.jpeg")
    assert img.shape == (32, 32)
    assert np.abs(img - arr / 255.0).max() < 0.05


# ------------------------------------------------------------------------------------ DICOM
def test_dicom_monochrome2_minmax_without_window(tmp_path):
    stored = ramp()
    img, meta = read_image_with_meta(write_dicom(tmp_path / "m2.dcm", stored))
    np.testing.assert_allclose(img, stored / 4095.0, atol=1e-6)
    assert meta["voi"] == "minmax" and not meta["inverted"]


def test_dicom_window_applied(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "w.dcm", stored, window=(2000, 1000))
    img, meta = read_image_with_meta(path)
    assert meta["voi"] == "window"
    assert (img[stored <= 1500] == 0).all() and (img[stored >= 2500] == 1).all()
    mid = (stored > 1600) & (stored < 2400)
    # DICOM LINEAR window: ((x - (c - 0.5)) / (w - 1) + 0.5) mapped to [0, 1]
    expected = np.clip((stored[mid] - 1999.5) / 999.0 + 0.5, 0, 1)
    np.testing.assert_allclose(img[mid], expected, atol=1e-4)
    # voi='none' ignores the window; voi='window' is the same as auto here
    np.testing.assert_allclose(read_image(path, voi="none"), stored / 4095.0, atol=1e-6)
    np.testing.assert_allclose(read_image(path, voi="window"), img)


def test_dicom_rescale_before_window(tmp_path):
    stored = ramp()
    # HU-like: value = 2 * stored - 1000; window centred on HU 1000 = stored 1000
    path = write_dicom(tmp_path / "r.dcm", stored, window=(1000, 400), slope=2, intercept=-1000)
    img = read_image(path)
    assert (img[stored < 850] == 0).all() and (img[stored > 1150] == 1).all()
    assert 0.3 < img[np.abs(stored.astype(int) - 1000) < 10].mean() < 0.7


def test_dicom_monochrome1_is_inverted(tmp_path):
    stored = ramp()
    m1, meta = read_image_with_meta(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", stored))
    assert meta["inverted"] and meta["photometric"] == "MONOCHROME1"
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_dicom_without_meta_header_reads_like_with(tmp_path):
    stored = ramp()
    without = write_dicom(tmp_path / "nometa.dcm", stored, photometric="MONOCHROME1", meta=False, window=(2048, 4096))
    with_meta = write_dicom(tmp_path / "meta.dcm", stored, photometric="MONOCHROME1", window=(2048, 4096))
    assert without.read_bytes()[128:132] != b"DICM"
    img, meta = read_image_with_meta(without)
    np.testing.assert_allclose(img, read_image(with_meta), atol=1e-6)
    assert meta["transfer_syntax"] == "Implicit VR Little Endian"


def test_dicom_without_extension_is_detected(tmp_path):
    path = write_dicom(tmp_path / "image", ramp())
    assert read_image(path).shape == (8, 16)


def test_metadata_is_whitelisted_and_free_of_phi(tmp_path):
    path = write_dicom(tmp_path / "phi.dcm", ramp(), window=(2048, 4096))
    _, meta = read_image_with_meta(path)
    assert set(meta) <= set(SAFE_META_FIELDS)
    text = repr(meta)
    for secret in (SECRET_NAME, "PHANTOM", SECRET_ID, SECRET_DATE, "Secret Hospital"):
        assert secret not in text
    assert meta["modality"] == "DX" and meta["view"] == "PA" and meta["bits"] == 12


def test_window_mode_without_window_is_an_error(tmp_path):
    path = write_dicom(tmp_path / "nowin.dcm", ramp())
    with pytest.raises(BadImageError, match="no WindowCenter/WindowWidth") as err:
        read_image(path, voi="window")
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="voi='lut'"):
        read_image(path, voi="lut")


# ------------------------------------------------------------------------------------ bad input
def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    cases = {}
    (tmp_path / "empty.png").write_bytes(b"")
    cases["zero-byte"] = (tmp_path / "empty.png", "empty file")
    Image.fromarray(noise).save(tmp_path / "t.png")
    cases["truncated png"] = (_truncate(tmp_path / "t.png"), "truncated")
    Image.fromarray(noise).save(tmp_path / "t.jpeg", quality=95)
    cases["truncated jpeg"] = (_truncate(tmp_path / "t.jpeg"), "truncated")
    cases["no pixel data"] = (write_dicom(tmp_path / "nopix.dcm", ramp(), pixel_data=False), "no pixel data")
    write_dicom(tmp_path / "tdcm.dcm", ramp(64, 64))
    cases["truncated dicom"] = (_truncate(tmp_path / "tdcm.dcm"), "truncated")
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(tmp_path / "const.png")
    cases["constant"] = (tmp_path / "const.png", "constant image")
    Image.fromarray(np.array([[np.nan, 1.0], [0.0, 0.5]], np.float32)).save(tmp_path / "nan.tif")
    cases["nan"] = (tmp_path / "nan.tif", "NaN")
    (tmp_path / "notes.png").write_text("this is not an image")
    cases["not an image"] = (tmp_path / "notes.png", "not a readable")
    cases["missing"] = (tmp_path / "nowhere.png", "file not found")
    return cases


@pytest.mark.parametrize(
    "kind",
    [
        "zero-byte",
        "truncated png",
        "truncated jpeg",
        "no pixel data",
        "truncated dicom",
        "constant",
        "nan",
        "not an image",
        "missing",
    ],
)
def test_each_bad_input_names_file_and_problem(tmp_path, kind):
    path, words = _bad_inputs(tmp_path)[kind]
    with pytest.raises(BadImageError) as err:
        read_image(path)
    assert err.value.path == str(path)
    assert str(path) in str(err.value) and words in str(err.value)


# ------------------------------------------------------------------------------------ real DICOMs
REAL_DICOMS = {
    "RG1_J2KI.dcm": ("MONOCHROME1", "JPEG 2000"),
    "CR-MONO1-10-chest.dcm": ("MONOCHROME1", "Implicit"),
    "siim.dcm": ("MONOCHROME2", "JPEG Baseline"),
    "nih_dx.dcm": ("MONOCHROME2", "Implicit"),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REAL_DICOMS))
def test_real_dicoms_display_convention(real_data_dir, name):
    import pydicom

    path = real_data_dir / "dicom" / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    img, meta = read_image_with_meta(path)
    photometric, syntax = REAL_DICOMS[name]
    assert img.dtype == np.float32 and img.ndim == 2 and np.isfinite(img).all()
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() - img.min() > 0.5
    assert meta["photometric"] == photometric and meta["inverted"] == (photometric == "MONOCHROME1")
    assert syntax in meta["transfer_syntax"]
    # Lung fields (lateral thirds, mid-height) darker than mediastinum and spine (central strip).
    h, w = img.shape
    rows = slice(int(h * 0.3), int(h * 0.6))
    centre = img[rows, int(w * 0.45) : int(w * 0.55)].mean()
    lungs = np.concatenate(
        [img[rows, int(w * 0.2) : int(w * 0.35)].ravel(), img[rows, int(w * 0.65) : int(w * 0.8)].ravel()]
    )
    assert lungs.mean() < centre - 0.1, f"{name}: lungs {lungs.mean():.2f} not darker than mediastinum {centre:.2f}"
    # The real PatientName never reaches returned metadata.
    header = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    name_value = str(header.get("PatientName", ""))
    assert name_value and name_value not in repr(meta)
    assert set(meta) <= set(SAFE_META_FIELDS)


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


# ------------------------------------------------------------------------------- 10. pixel limit
def test_decompression_bomb_is_quarantined_or_named(person_folders, folder_card, tmp_path):
    root = person_folders(tmp_path / "data", n_patients=8)
    bomb = _bomb_png(root / "NORMAL" / "person0_img1.png")
    kwargs = dict(image_size=32, mean=(0.5,), std=(0.5,), in_chans=1, progress=False, augment="none")
    bundle = build_datasets(folder_card(), root, on_bad_image="skip", **kwargs)
    assert list(bundle.quarantine["path"]) == [str(bomb)]
    reason = bundle.quarantine["reason"].iloc[0]
    assert "larger than the pixel limit" in reason and "400,000,000 pixels" in reason
    assert "MEDTRICKS_MAX_IMAGE_PIXELS" in reason
    with pytest.raises(BadImageError) as err:
        build_datasets(folder_card(), root, on_bad_image="error", **kwargs)
    assert str(bomb) in str(err.value) and "pixel limit" in str(err.value)


def test_pixel_limit_can_be_raised_for_genuine_large_images(write_png, tmp_path, monkeypatch):
    path = write_png(tmp_path / "big.png", 1, size=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32*32 > 2*100: a "bomb" for Pillow
    with pytest.raises(BadImageError, match=r"big\.png: image is larger than the pixel limit"):
        read_image(path)
    monkeypatch.setenv("MEDTRICKS_MAX_IMAGE_PIXELS", "none")
    assert read_image(path).shape == (32, 32)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored after the read


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


def test_a_truncated_dicom_is_called_truncated(tmp_path):
    from medtricks.data.errors import BadImageError
    from medtricks.data.readers import read_image

    whole = write_dicom(tmp_path / "whole.dcm", ramp(64, 64)).read_bytes()
    for cut in (200, 400, len(whole) // 2, len(whole) - 10):  # in the file meta, the header, the pixels
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(whole[:cut])
        with pytest.raises(BadImageError, match="truncated or corrupt"):
            read_image(path)
    with pytest.raises(BadImageError, match="no PixelData element\\): not an image"):  # whole, but no pixels
        read_image(write_dicom(tmp_path / "nopix.dcm", ramp(), pixel_data=False))
