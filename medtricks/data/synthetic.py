"""Synthetic chest-radiograph phantoms: a small, labelled, patient-grouped data set made in seconds.

Each image has a body outline, two dark lung fields, a bright mediastinum, heart and spine, ribs and
clavicles, blur and noise. Classes differ only by lesions drawn inside the lungs:

- ``normal``: clear lungs;
- ``bacterial`` / ``pneumonia``: one dense lobar consolidation (one lung, upper or lower zone);
- ``covid`` / ``viral``: bilateral, peripheral, hazy ground-glass patches.

Patients have 1-4 images each (same anatomy and label, new position, exposure and lesion jitter).
Output: ``images/img_NNNNN.png|dcm``, ``phantoms.csv`` (``path,label,patient``) and ``phantoms.json``
(the generation settings). DICOM files carry realistic tags, including the fake ``PatientName``
:data:`FAKE_PATIENT_NAME`, so tests can prove header values never reach a log. Deterministic for a seed.

Example::

    csv_path = synthesize_phantoms("data/phantoms", n=300, size=64)    # ~1 s
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from medtricks._atomic import atomic_path
from medtricks.errors import ConfigError

SYNTHETIC_CARD = "synthetic-phantoms"
MANIFEST_NAME = "phantoms.csv"
PARAMS_NAME = "phantoms.json"
FAKE_PATIENT_NAME = "PHANTOM^SECRET"
FORMATS = ("png", "dicom")
# class name -> lesion drawn; a class name must say which lesion it stands for.
LESIONS = {
    "normal": None,
    "healthy": None,
    "bacterial": "lobar",
    "pneumonia": "lobar",
    "consolidation": "lobar",
    "covid": "ground_glass",
    "viral": "ground_glass",
    "ground_glass": "ground_glass",
}
_VERSION = 1


def _ellipse(x, y, cx, cy, ax, ay, soft):
    """Soft-edged ellipse mask in [0, 1] (``soft`` = edge width in normalized units)."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return np.clip((1.0 - r) / max(soft, 1e-6), 0.0, 1.0)


def _patient_anatomy(rng: np.random.Generator) -> dict:
    return {
        "body_w": rng.uniform(0.40, 0.45),
        "body_h": rng.uniform(0.52, 0.58),
        "lung_w": rng.uniform(0.12, 0.14),
        "lung_h": rng.uniform(0.25, 0.29),
        "lung_gap": rng.uniform(0.16, 0.19),
        "heart_w": rng.uniform(0.13, 0.16),
        "heart_h": rng.uniform(0.12, 0.14),
        "rib_gap": rng.uniform(0.05, 0.06),
        "rib_curve": rng.uniform(1.0, 1.5),
        "tissue": rng.uniform(0.40, 0.50),
        "lung": rng.uniform(0.10, 0.18),
    }


def _draw(size: int, anat: dict, lesion, rng: np.random.Generator, lesion_plan: dict) -> np.ndarray:
    """One phantom, float32 (size, size) in [0, 1], bright = dense."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    # Per-image pose: small shift and rotation of the whole chest.
    angle = np.deg2rad(rng.uniform(-3, 3))
    dx, dy = rng.uniform(-0.03, 0.03, size=2)
    xc, yc = xx - 0.5 - dx, yy - 0.5 - dy
    x = 0.5 + xc * np.cos(angle) + yc * np.sin(angle)
    y = 0.5 - xc * np.sin(angle) + yc * np.cos(angle)

    body = _ellipse(x, y, 0.5, 0.58, anat["body_w"], anat["body_h"], 0.04)
    img = 0.04 + body * (anat["tissue"] - 0.04)
    lungs = []
    for side in (-1, 1):  # -1: patient's right lung (image left)
        cx = 0.5 + side * anat["lung_gap"]
        lung = _ellipse(x, y, cx, 0.47, anat["lung_w"], anat["lung_h"], 0.06)
        lung *= np.clip((y - 0.17) / 0.04, 0, 1)  # flat-ish apex
        lungs.append(lung)
    lung_mask = np.maximum(*lungs)
    img = img * (1 - lung_mask) + anat["lung"] * lung_mask
    # Mediastinum, heart (left of the patient = image right), spine.
    mediastinum = np.clip((0.065 - np.abs(x - 0.5)) / 0.02, 0, 1) * np.clip((y - 0.12) / 0.05, 0, 1) * body
    heart = _ellipse(x, y, 0.56, 0.64, anat["heart_w"], anat["heart_h"], 0.15)
    spine = np.clip((0.025 - np.abs(x - 0.5)) / 0.01, 0, 1) * body
    img = np.maximum(img, 0.55 * np.maximum(mediastinum, heart))
    img = img + 0.12 * spine
    # Ribs: arcs that drop laterally, seen over the lungs; clavicles on top.
    ribs = np.zeros_like(img)
    d = np.abs(x - 0.5)
    for k in range(10):
        y0 = 0.19 + k * anat["rib_gap"]
        arc = y0 + anat["rib_curve"] * (d - 0.05) ** 2 + 0.02 * k * d
        ribs = np.maximum(ribs, np.clip(1 - np.abs(y - arc) / 0.012, 0, 1) * (d > 0.04) * (d < 0.40))
    clav = np.clip(1 - np.abs(y - (0.16 + 0.12 * (d - 0.05))) / 0.012, 0, 1) * (d > 0.05) * (d < 0.30)
    img = img + 0.14 * np.maximum(ribs, clav) * body

    if lesion == "lobar":
        side, zone = lesion_plan["side"], lesion_plan["zone"]
        cx = 0.5 + side * anat["lung_gap"] + rng.uniform(-0.02, 0.02)
        cy = (0.36 if zone == "upper" else 0.58) + rng.uniform(-0.03, 0.03)
        # Wider than the lung, then cut by it: the consolidation fills a zone of the lung (lobar).
        blob = _ellipse(x, y, cx, cy, anat["lung_w"] * 1.4, 0.12 * rng.uniform(0.9, 1.1), 0.35)
        img = img + 0.35 * blob * lungs[0 if side < 0 else 1] * (1 - heart)
    elif lesion == "ground_glass":
        haze = np.zeros_like(img)
        for side in (-1, 1):
            for _ in range(lesion_plan["patches"]):
                cx = 0.5 + side * (anat["lung_gap"] + anat["lung_w"] * rng.uniform(0.45, 0.8))  # periphery
                cy = rng.uniform(0.42, 0.68)
                sigma = rng.uniform(0.04, 0.07)
                haze += np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)))
        img = img + 0.2 * np.clip(haze, 0, 1.3) * lung_mask * (1 - heart)

    img = gaussian_filter(img, sigma=max(0.6, size / 256))
    gamma = rng.uniform(0.85, 1.15)  # exposure
    img = np.clip(img, 0, 1) ** gamma
    img = img + rng.normal(0.0, 0.02, size=img.shape)  # quantum noise
    return np.clip(img, 0, 1).astype(np.float32)


def _dicom(path: Path, image: np.ndarray, *, patient_id: str, index: int, seed: int, monochrome1: bool) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    dx_storage = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    stored = np.round(image * 4095).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    uid = lambda *parts: generate_uid(entropy_srcs=["medtricks-phantom", str(seed), *map(str, parts)])  # noqa: E731
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dx_storage
    meta.MediaStorageSOPInstanceUID = uid("sop", index)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = dx_storage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study", patient_id), uid("series", index)
    # Realistic identifying tags, all fake: they must never leave the reader.
    ds.PatientName, ds.PatientID = FAKE_PATIENT_NAME, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate = ds.ContentDate = "20240101"
    ds.InstitutionName = "Phantom General Hospital"
    ds.AccessionNumber = f"ACC{index:06d}"
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def synthesize_phantoms(
    out_dir,
    n: int = 600,
    classes: Sequence[str] = ("normal", "bacterial", "covid"),
    size: int = 256,
    fmt: str = "png",
    seed: int = 0,
) -> Path:
    """Draw ``n`` phantom radiographs into ``out_dir``; returns the path of ``phantoms.csv``.

    ``classes``: names from :data:`LESIONS` (e.g. normal, bacterial, covid, pneumonia, viral), balanced
    over patients. ``fmt``: ``png`` (8-bit) or ``dicom`` (12-bit DX; every third patient MONOCHROME1).
    """
    from PIL import Image

    classes = tuple(str(c).strip() for c in classes)
    if fmt not in FORMATS:
        raise ConfigError(f"fmt={fmt!r}: expected one of {FORMATS}")
    if int(n) < 1:
        raise ConfigError(f"n={n}: expected at least one image")
    if int(size) < 16:
        raise ConfigError(f"size={size}: expected at least 16 pixels")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"classes={classes}: expected 2 or more distinct class names")
    unknown = [c for c in classes if c not in LESIONS]
    if unknown:
        raise ConfigError(f"classes {unknown} have no phantom lesion; use names from {sorted(LESIONS)}")

    out = Path(out_dir).expanduser()
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    class_cycle = list(rng.permutation(len(classes)))
    rows = []
    index, patient_no = 0, 0
    while index < n:
        label = classes[class_cycle[patient_no % len(classes)]]
        patient = f"PH{seed:03d}-{patient_no:05d}"
        anat = _patient_anatomy(rng)
        plan = {
            "side": int(rng.choice([-1, 1])),
            "zone": str(rng.choice(["upper", "lower"])),
            "patches": int(rng.integers(2, 4)),
        }
        for _ in range(min(int(rng.integers(1, 5)), n - index)):
            image = _draw(int(size), anat, LESIONS[label], rng, plan)
            name = f"img_{index:05d}." + ("png" if fmt == "png" else "dcm")
            # Atomic: runs started together (ablation children) may draw the same set into one folder
            # while another already reads it; a reader must never see a half-written image.
            with atomic_path(images / name) as tmp:
                if fmt == "png":
                    Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(tmp, format="PNG")
                else:
                    _dicom(tmp, image, patient_id=patient, index=index, seed=seed, monochrome1=patient_no % 3 == 2)
            rows.append({"path": f"images/{name}", "label": label, "patient": patient})
            index += 1
        patient_no += 1

    csv_path = out / MANIFEST_NAME
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    params = {
        "n": int(n),
        "classes": list(classes),
        "size": int(size),
        "fmt": fmt,
        "seed": int(seed),
        "version": _VERSION,
    }
    with atomic_path(out / PARAMS_NAME) as tmp:
        tmp.write_text(json.dumps(params, indent=2) + "\n")
    return csv_path
