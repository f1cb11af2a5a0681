"""`medtricks predict`: a trained run on new image files and folders, as a CSV (issue 21); what it writes is safe and
whole (issue 31): no cell a spreadsheet would run, no output over an input, the CSV pair replaced whole or not at
all, every input accounted for."""

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import medtricks._atomic
from medtricks._atomic import csv_safe, write_csvs
from medtricks.cli import main
from medtricks.data import synthesize_phantoms
from medtricks.errors import ConfigError, MedtricksError, ResourceError
from medtricks.evaluate.operating_point import OPERATING_POINT_FILE, select_threshold
from medtricks.posthoc.predict import (
    NothingPredictedError,
    bad_files_path,
    collect_images,
    predict_images,
    require_predictions,
    write_predictions,
)
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe

ROOT = Path(__file__).resolve().parents[2]
SECRET_NAME, SECRET_ID = "Doe^Jane^PHI", "MRN-PHI-4711"
UID_MARKER = "1.2.826.0.1.3680043.99.4711"


@pytest.fixture(scope="module")
def binary_run(binary_phantom_card, fresh_sqlite_uri, tmp_path_factory, binary_run_overrides):
    tmp = tmp_path_factory.mktemp("predict")
    uri = fresh_sqlite_uri(tmp)
    synthesize_phantoms(tmp / "data", n=80, classes=("normal", "pneumonia"), size=32, seed=0)
    card = binary_phantom_card(tmp)
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=binary_run_overrides(tmp, card, uri))
    result = run_recipe(recipe, quiet=True)
    assert (result.run_dir / "model" / OPERATING_POINT_FILE).is_file()  # the run stores its operating point
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


def test_predict_on_a_missing_gpu_is_one_line(one_line_error, tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main(["predict", str(tmp_path / "no-run"), str(image), "--device", "cuda:99"]) == 2
    assert "cuda:99" in one_line_error(capsys, "predict")


def _pngs(tmp: Path, n: int) -> list[Path]:
    return sorted((tmp / "phantoms" / "images").glob("*.png"))[:n]


def _folder(tmp_path: Path, tmp: Path, names: list[str]) -> Path:
    folder = tmp_path / "new"
    folder.mkdir()
    for name, src in zip(names, _pngs(tmp, len(names))):
        shutil.copy(src, folder / name)
    return folder


# ------------------------------------------------------------------------- 4: CSV formula injection
def test_csv_cells_that_a_spreadsheet_would_run_are_quoted():
    frame = pd.DataFrame(
        {
            "image": ["=cmd|calc!A1.png", "+1.png", "-1.png", "@SUM(A1).png", "\tx.png", "\rx.png", "ok=1.png"],
            "prob": [-0.5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        }
    )
    safe = csv_safe(frame)
    assert list(safe["image"]) == [
        "'=cmd|calc!A1.png",
        "'+1.png",
        "'-1.png",
        "'@SUM(A1).png",
        "'\tx.png",
        "'\rx.png",
        "ok=1.png",
    ]
    assert list(safe["prob"]) == list(frame["prob"])  # numbers are data, a negative one is no formula
    assert frame["image"][0] == "=cmd|calc!A1.png"  # the caller's frame is not changed


def test_predict_csv_and_bad_files_neutralise_formula_names(salted_run, tmp_path, capsys):
    run_dir, tmp = salted_run
    folder = _folder(tmp_path, tmp, ["=cmd|calc!A1.png", "@SUM(1+1).png", "plain.png"])
    (folder / "-2+3.txt").write_text("not an image")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), str(folder), "--out", str(out), "--device", "cpu"]) == 0
    rows = out.read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == ["'=cmd|calc!A1.png", "'@SUM(1+1).png", "plain.png"]
    bad = bad_files_path(out).read_text().splitlines()[1:]
    assert len(bad) == 1 and bad[0].startswith("'-2+3.txt,")
    # read back with pandas, the names carry the quote: nothing in the file starts a formula
    cells = pd.read_csv(out)["image"].tolist() + pd.read_csv(bad_files_path(out))["image"].tolist()
    assert not [c for c in cells if c[0] in "=+-@\t\r"]


# ------------------------------------------------------------------- 5: outputs never overwrite inputs
def test_cam_into_the_input_folder_is_refused_before_any_work(salted_run, one_line_error, tmp_path, capsys):
    run_dir, tmp = salted_run
    folder = _folder(tmp_path, tmp, ["a.png", "b.png"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "preds.csv"
    code = main(["predict", str(run_dir), str(folder), "--cam", str(folder), "--out", str(out), "--device", "cpu"])
    line = one_line_error(capsys, "predict")
    assert code == 2 and str(folder) in line and "--cam" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and not out.exists()
    # a --cam folder that holds an input below it is refused too, and the API refuses it as well
    with pytest.raises(ConfigError, match="holds the input"):
        predict_images(str(run_dir), [str(folder / "a.png")], cam_dir=tmp_path, device="cpu", progress=False)


def test_out_onto_an_input_image_or_its_bad_file_list_is_refused(salted_run, one_line_error, tmp_path, capsys):
    run_dir, tmp = salted_run
    folder = _folder(tmp_path, tmp, ["scan.jpeg.png", "b.png"])
    scan = folder / "scan.jpeg"
    shutil.copy(folder / "b.png", scan)  # a PNG named .jpeg, as in the report
    before = scan.read_bytes()
    code = main(["predict", str(run_dir), str(folder), "--out", str(scan), "--device", "cpu"])
    line = one_line_error(capsys, "predict")
    assert code == 2 and str(scan) in line and scan.read_bytes() == before
    assert not bad_files_path(scan).exists()
    (folder / "x.bad_files.csv").write_text("an input of the user's\n")  # listed as 'not an image'
    code = main(["predict", str(run_dir), str(folder), "--out", str(folder / "x.csv"), "--device", "cpu"])
    line = one_line_error(capsys, "predict")
    assert code == 2 and "x.bad_files.csv" in line and not (folder / "x.csv").exists()
    assert (folder / "x.bad_files.csv").read_text() == "an input of the user's\n"


# --------------------------------------------------------- 6: the CSV pair is replaced whole, or not at all
def _failing_to_csv(monkeypatch, failing: str):
    """The write of the file whose name contains ``failing`` runs out of disk after half its rows."""
    real = pd.DataFrame.to_csv

    def to_csv(self, path_or_buf=None, *args, **kwargs):
        name = getattr(path_or_buf, "name", str(path_or_buf))
        if failing in str(name):
            real(self.head(len(self) // 2), path_or_buf, *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, path_or_buf, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)


@pytest.mark.parametrize("failing", ["preds.csv", "bad_files"])
def test_full_disk_keeps_the_previous_pair(entries, tmp_path, monkeypatch, failing):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    out = tmp_path / "preds.csv"
    out.write_text("old predictions\n")
    bad_files_path(out).write_text("old bad files\n")
    preds = pd.DataFrame({"image": [f"img{i}.png" for i in range(10)], "prob_a": 0.5})
    bad = pd.DataFrame({"image": ["x.txt"], "reason": ["not an image"]})
    _failing_to_csv(monkeypatch, failing)
    with pytest.raises(ResourceError, match="No space left on device") as info:
        write_predictions(preds, bad, out)
    assert "\n" not in str(info.value) and str(out) in str(info.value)
    assert out.read_text() == "old predictions\n" and bad_files_path(out).read_text() == "old bad files\n"
    assert entries(tmp_path) == ["preds.bad_files.csv", "preds.csv"]  # no temporary file left


def test_full_disk_is_one_line_from_the_cli(salted_run, entries, one_line_error, tmp_path, monkeypatch, capsys):
    run_dir, tmp = salted_run
    folder = _folder(tmp_path, tmp, ["a.png", "b.png"])
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    out.write_text("old\n")
    _failing_to_csv(monkeypatch, "preds.csv")
    assert main(["predict", str(run_dir), str(folder), "--out", str(out), "--device", "cpu"]) == 2
    assert "No space left on device" in one_line_error(capsys, "predict")
    assert out.read_text() == "old\n" and entries(out.parent) == ["preds.csv"]


def test_write_csvs_rolls_back_when_the_second_rename_fails(entries, tmp_path, monkeypatch):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("old a\n")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == b:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(medtricks._atomic.os, "replace", replace)
    with pytest.raises(OSError):
        write_csvs({a: pd.DataFrame({"x": [1]}), b: pd.DataFrame({"y": [2]})})
    assert a.read_text() == "old a\n" and not b.exists() and entries(tmp_path) == ["a.csv"]


# -------------------------------------------------------------------- 11: every input is accounted for
def test_links_loops_and_broken_links_are_all_listed(salted_run, tmp_path):
    run_dir, tmp = salted_run
    folder = _folder(tmp_path, tmp, ["good.png"])
    (folder / "link.png").symlink_to(folder / "good.png")
    (folder / "broken.png").symlink_to(folder / "missing.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)
    os.mkfifo(folder / "pipe.png")
    images, _ = collect_images([folder])
    assert [i.image for i in images] == ["good.png", "link.png"]
    preds, bad = predict_images(str(run_dir), [str(folder)], device="cpu", progress=False)
    assert sorted(preds["image"]) == ["good.png", "link.png"]  # a link and its target: two rows
    reasons = dict(zip(bad["image"], bad["reason"]))
    assert set(reasons) == {"broken.png", "loop.png", "sub/up", "pipe.png"}
    assert "broken symbolic link" in reasons["broken.png"] and "loop" in reasons["loop.png"]
    assert "loop" in reasons["sub/up"] and "not a regular file" in reasons["pipe.png"]


def test_all_bad_inputs_are_an_error_with_the_bad_file_list_written(salted_run, one_line_error, tmp_path, capsys):
    run_dir, _ = salted_run
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "b.png").symlink_to(folder / "gone.png")
    (folder / "notes.txt").write_text("x")
    out = tmp_path / "preds.csv"
    code = main(["predict", str(run_dir), str(folder), "--out", str(out), "--device", "cpu"])
    line = one_line_error(capsys, "predict")
    assert code == 2 and "none of the 3 input file(s)" in line and str(bad_files_path(out)) in line
    assert sorted(pd.read_csv(bad_files_path(out))["image"]) == ["a.png", "b.png", "notes.txt"]
    assert len(pd.read_csv(out)) == 0
    with pytest.raises(NothingPredictedError, match="no image found"):
        require_predictions(pd.DataFrame({"image": []}), pd.DataFrame(columns=["image", "reason"]))
    assert issubclass(NothingPredictedError, MedtricksError)
