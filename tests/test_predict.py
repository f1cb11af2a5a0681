"""`medtricks predict`: a trained run on new image files and folders, as a CSV (issue 21)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtricks.cli import main
from medtricks.data import synthesize_phantoms
from medtricks.errors import MedtricksError
from medtricks.evaluate.operating_point import OPERATING_POINT_FILE, select_threshold
from medtricks.posthoc.predict import bad_files_path, predict_images
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe

from conftest import binary_phantom_card, fresh_sqlite_uri

ROOT = Path(__file__).resolve().parents[1]
SECRET_NAME, SECRET_ID = "Doe^Jane^PHI", "MRN-PHI-4711"
UID_MARKER = "1.2.826.0.1.3680043.99.4711"


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    uri = fresh_sqlite_uri(tmp)
    synthesize_phantoms(tmp / "data", n=80, classes=("normal", "pneumonia"), size=32, seed=0)
    card = binary_phantom_card(tmp)
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            f"data.card={card}",
            "data.synth=null",
            f"data.root={tmp / 'data'}",
            "data.image_size=32",
            "data.val_fraction=0.25",
            "data.test_fraction=0.25",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.n_bootstrap=10",
            "train.progress=false",
            "schedule.warmup_epochs=0",
            f"experiment.output_dir={tmp / 'runs'}",
            f"tracking.uri={uri}",
        ],
    )
    result = run_recipe(recipe, quiet=True)
    op_path = result.run_dir / "model" / OPERATING_POINT_FILE
    if not op_path.is_file():  # a run.py that does not store operating points: store one as it would
        with np.load(result.run_dir / "artifacts" / "predictions_val.npz") as val:
            select_threshold(val["y_true"], val["probs"]).to_json(op_path)
    return result, uri, tmp


def _inputs(tmp, folder_name="new"):
    """A folder of new images: 6 PNG phantoms in sub-folders, a corrupt PNG, a text file, a DICOM."""
    new = tmp / folder_name
    if new.exists():
        shutil.rmtree(new)
    pngs = sorted((tmp / "data").rglob("*.png"))[:6]
    for i, src in enumerate(pngs):
        dest = new / ("a" if i < 3 else "b") / f"img{i}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    (new / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (new / "notes.txt").write_text("not an image\n")
    return new, pngs


def _write_dicom(path: Path, size: int = 40) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    rng = np.random.default_rng(0)
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = SECRET_NAME, SECRET_ID, "19700101"
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", UID_MARKER
    ds.StudyInstanceUID = UID_MARKER + ".1"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (size, size)).astype(np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_predict_csv_columns_relative_paths_and_bad_files(binary_run, tmp_path, capsys):
    result, uri, tmp = binary_run
    new, _ = _inputs(tmp)
    out = tmp_path / "out" / "preds.csv"
    assert main(["predict", str(result.run_dir), str(new), "--out", str(out), "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    preds = pd.read_csv(out)
    assert list(preds.columns) == ["image", "prob_normal", "prob_pneumonia", "predicted", "threshold"]
    assert preds["image"].tolist() == [f"a/img{i}.png" for i in range(3)] + [f"b/img{i}.png" for i in range(3, 6)]
    assert np.allclose(preds[["prob_normal", "prob_pneumonia"]].sum(1), 1.0, atol=1e-5)
    op = json.loads((result.run_dir / "model" / OPERATING_POINT_FILE).read_text())
    assert (preds["threshold"] == op["threshold"]).all()  # stored is the default
    expected = np.where(preds["prob_pneumonia"] >= op["threshold"], "pneumonia", "normal")
    assert preds["predicted"].tolist() == expected.tolist()
    bad = pd.read_csv(bad_files_path(out))
    assert set(bad["image"]) == {"corrupt.png", "notes.txt"}
    assert not any(str(tmp) in str(v) for v in [*bad["reason"], *bad["image"], *preds["image"]])  # never absolute
    assert "2 bad file(s)" in err and "corrupt.png" in err and "notes.txt" in err and str(tmp) not in err


def test_same_predictions_as_evaluate_preprocessing(binary_run):
    """The run's eval transform: the val split's images give the run's own stored val probabilities."""
    result, uri, tmp = binary_run
    manifest = pd.read_csv(result.run_dir / "artifacts" / "split_manifest.csv")
    with np.load(result.run_dir / "artifacts" / "predictions_val.npz") as val:
        val_probs = val["probs"]
    preds, bad = predict_images(str(result.run_dir), [tmp / "data"], threshold="0.5", progress=False)
    assert not any(name.endswith(".png") for name in bad["image"])  # only the set's CSV/JSON side files
    assert len(preds) == len(manifest)
    # every stored val probability row is found among the predictions (same images, same preprocessing)
    got = preds[["prob_normal", "prob_pneumonia"]].to_numpy()
    for row in val_probs:
        assert np.abs(got - row).max(axis=1).min() < 1e-4


def test_thresholds_reproduced_from_the_stored_validation_predictions(binary_run):
    result, uri, tmp = binary_run
    new, _ = _inputs(tmp, "new_thresholds")
    with np.load(result.run_dir / "artifacts" / "predictions_val.npz") as val:
        y, p = val["y_true"], val["probs"]
    sens = select_threshold(y, p, method="sensitivity", target_sensitivity=0.95)
    youden = select_threshold(y, p, method="youden")
    preds, _ = predict_images(str(result.run_dir), [new], threshold="sens=0.95", progress=False)
    assert preds["threshold"].iloc[0] == pytest.approx(sens.threshold)
    assert (
        preds["predicted"].tolist()
        == np.where(preds["prob_pneumonia"] >= sens.threshold, "pneumonia", "normal").tolist()
    )
    preds_y, _ = predict_images(str(result.run_dir), [new], threshold="youden", progress=False)
    assert preds_y["threshold"].iloc[0] == pytest.approx(youden.threshold)
    fixed, _ = predict_images(str(result.run_dir), [new], threshold=0.5, progress=False)
    assert (fixed["threshold"] == 0.5).all()
    # by run id (MLflow): the val predictions come from the run store
    by_id, _ = predict_images(result.run_id, [new], threshold="sens=0.95", tracking_uri=uri, progress=False)
    assert by_id["threshold"].iloc[0] == pytest.approx(sens.threshold)
    assert np.allclose(by_id["prob_pneumonia"], preds["prob_pneumonia"], atol=1e-6)
    with pytest.raises(MedtricksError, match="threshold"):
        predict_images(str(result.run_dir), [new], threshold="sens=2", progress=False)


def test_stored_without_operating_point_says_0_5(binary_run, tmp_path, capsys):
    result, uri, tmp = binary_run
    run_copy = tmp_path / "run_copy"
    shutil.copytree(result.run_dir, run_copy)
    (run_copy / "model" / OPERATING_POINT_FILE).unlink()
    new, pngs = _inputs(tmp, "new_default")
    assert main(["predict", str(run_copy), str(pngs[0]), "--out", str(tmp_path / "p.csv")]) == 0
    err = capsys.readouterr().err
    assert "threshold 0.5: the run has no model/operating_point.json" in err
    preds = pd.read_csv(tmp_path / "p.csv")
    assert preds["image"].tolist() == [pngs[0].name] and preds["threshold"].tolist() == [0.5]


def test_dicom_input_has_a_salted_sop_hash_and_no_phi(binary_run, tmp_path):
    result, uri, tmp = binary_run
    folder = tmp_path / "dicoms"
    _write_dicom(folder / "study" / "image.dcm")
    _write_dicom(folder / "study" / "NOEXTENSION")  # DICOM found by its preamble
    out = tmp_path / "dicom_preds.csv"
    assert main(["predict", str(result.run_dir), str(folder), "--out", str(out)]) == 0
    text = out.read_text()
    preds = pd.read_csv(out)
    assert preds["image"].tolist() == ["study/NOEXTENSION", "study/image.dcm"]
    assert "sop_instance_hash" in preds.columns
    assert preds["sop_instance_hash"].str.fullmatch(r"s_[0-9a-f]{16}").all()
    assert preds["sop_instance_hash"].nunique() == 1  # same UID, same hash
    for marker in (SECRET_NAME, SECRET_ID, "Doe", "MRN", UID_MARKER, "19700101", str(tmp_path)):
        assert marker not in text
        assert marker not in bad_files_path(out).read_text()


def test_missing_input_is_an_error_naming_it(binary_run, tmp_path, capsys):
    result, uri, tmp = binary_run
    missing = tmp_path / "no_such_folder"
    with pytest.raises(MedtricksError, match="no_such_folder"):
        predict_images(str(result.run_dir), [missing], progress=False)
    assert main(["predict", str(result.run_dir), str(missing)]) == 2
    assert "no_such_folder" in capsys.readouterr().err
