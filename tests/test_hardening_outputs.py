"""Issue 31, items 4, 5, 6, 7, 10, 11: what predict, export and ensemble write is safe and whole --
CSV cells never run as spreadsheet formulas, no output overwrites an input, a full disk leaves the
previous files (and never aborts the process), temporary names are the writer's own, an ensemble warns
about data its members trained on and refuses one model counted twice, every input is accounted for."""

import builtins
import errno
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import medtricks._atomic
from medtricks._atomic import csv_safe, write_csvs
from medtricks.cli import main
from medtricks.posthoc.ensemble import ensemble_runs
from medtricks.errors import ConfigError, MedtricksError, ResourceError
from medtricks.posthoc.export import export_model
from medtricks.posthoc import evaluate_trained
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

ROOT = Path(__file__).resolve().parents[1]
SALT = "hardening-outputs-salt"  # the run's split manifest and the overlap checks hash with one salt


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny multiclass run on 32 px phantoms (resnet18 from scratch, one epoch, no tracking)."""
    tmp = tmp_path_factory.mktemp("outputs")
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            "data.synth.n=48",
            "data.synth.size=32",
            "data.image_size=32",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.n_bootstrap=0",
            "eval.plots=false",
            "train.progress=false",
            "schedule.warmup_epochs=0",
            f"data.root={tmp / 'phantoms'}",
            f"experiment.output_dir={tmp / 'runs'}",
            "tracking.backend=none",
        ],
    )
    with pytest.MonkeyPatch.context() as mp:  # module scope: the per-test cache fixture is not active yet
        mp.setenv("MEDTRICKS_CACHE", str(tmp / "cache"))
        mp.setenv("MEDTRICKS_PATIENT_SALT", SALT)
        result = run_recipe(recipe, quiet=True)
    return result.run_dir, tmp


def _pngs(tmp: Path, n: int) -> list[Path]:
    return sorted((tmp / "phantoms" / "images").glob("*.png"))[:n]


def _folder(tmp_path: Path, tmp: Path, names: list[str]) -> Path:
    folder = tmp_path / "new"
    folder.mkdir()
    for name, src in zip(names, _pngs(tmp, len(names))):
        shutil.copy(src, folder / name)
    return folder


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith(f"medtricks {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


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


def test_predict_csv_and_bad_files_neutralise_formula_names(tiny_run, tmp_path, capsys):
    run_dir, tmp = tiny_run
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
def test_cam_into_the_input_folder_is_refused_before_any_work(tiny_run, tmp_path, capsys):
    run_dir, tmp = tiny_run
    folder = _folder(tmp_path, tmp, ["a.png", "b.png"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "preds.csv"
    code = main(["predict", str(run_dir), str(folder), "--cam", str(folder), "--out", str(out), "--device", "cpu"])
    line = _one_error_line(capsys.readouterr().err, "predict")
    assert code == 2 and str(folder) in line and "--cam" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and not out.exists()
    # a --cam folder that holds an input below it is refused too, and the API refuses it as well
    with pytest.raises(ConfigError, match="holds the input"):
        predict_images(str(run_dir), [str(folder / "a.png")], cam_dir=tmp_path, device="cpu", progress=False)


def test_out_onto_an_input_image_or_its_bad_file_list_is_refused(tiny_run, tmp_path, capsys):
    run_dir, tmp = tiny_run
    folder = _folder(tmp_path, tmp, ["scan.jpeg.png", "b.png"])
    scan = folder / "scan.jpeg"
    shutil.copy(folder / "b.png", scan)  # a PNG named .jpeg, as in the report
    before = scan.read_bytes()
    code = main(["predict", str(run_dir), str(folder), "--out", str(scan), "--device", "cpu"])
    line = _one_error_line(capsys.readouterr().err, "predict")
    assert code == 2 and str(scan) in line and scan.read_bytes() == before
    assert not bad_files_path(scan).exists()
    (folder / "x.bad_files.csv").write_text("an input of the user's\n")  # listed as 'not an image'
    code = main(["predict", str(run_dir), str(folder), "--out", str(folder / "x.csv"), "--device", "cpu"])
    line = _one_error_line(capsys.readouterr().err, "predict")
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
def test_full_disk_keeps_the_previous_pair(tmp_path, monkeypatch, failing):
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
    assert _entries(tmp_path) == ["preds.bad_files.csv", "preds.csv"]  # no temporary file left


def test_full_disk_is_one_line_from_the_cli(tiny_run, tmp_path, monkeypatch, capsys):
    run_dir, tmp = tiny_run
    folder = _folder(tmp_path, tmp, ["a.png", "b.png"])
    out = tmp_path / "out" / "preds.csv"
    out.parent.mkdir()
    out.write_text("old\n")
    _failing_to_csv(monkeypatch, "preds.csv")
    assert main(["predict", str(run_dir), str(folder), "--out", str(out), "--device", "cpu"]) == 2
    assert "No space left on device" in _one_error_line(capsys.readouterr().err, "predict")
    assert out.read_text() == "old\n" and _entries(out.parent) == ["preds.csv"]


def test_write_csvs_rolls_back_when_the_second_rename_fails(tmp_path, monkeypatch):
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
    assert a.read_text() == "old a\n" and not b.exists() and _entries(tmp_path) == ["a.csv"]


# ------------------------------------------------------------- 7: export's temporary files are its own
def test_export_leaves_foreign_tmp_paths_alone(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    tmp_path = tmp_path / "exports"
    tmp_path.mkdir()
    foreign_file = tmp_path / "m.pt.tmp"
    foreign_file.write_text("someone else's")
    foreign_dir = tmp_path / "served.tmp"
    foreign_dir.mkdir()
    (foreign_dir / "keep.txt").write_text("someone else's")
    result = export_model(str(run_dir), "torchscript", tmp_path / "m.pt", n_check=2)
    assert result.path.is_file() and result.card_path.is_file()
    export_model(str(run_dir), "mlflow", tmp_path / "served", n_check=2)
    assert (tmp_path / "served" / "MLmodel").is_file()
    assert foreign_file.read_text() == "someone else's" and (foreign_dir / "keep.txt").read_text() == "someone else's"
    assert _entries(tmp_path) == ["m.pt", "m.pt.md", "m.pt.tmp", "served", "served.tmp"]


def _disk_full_on_write(monkeypatch):
    """Files the package opens for writing through its atomic writer go to /dev/full (ENOSPC on write)."""
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        return real_open("/dev/full", mode, *args, **kwargs) if "w" in mode else real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(medtricks._atomic, "open", full_open, raising=False)


def test_torchscript_export_on_a_full_disk_is_an_error_not_an_abort(tiny_run, tmp_path, monkeypatch, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    run_dir, _ = tiny_run
    tmp_path = tmp_path / "exports"
    tmp_path.mkdir()
    (tmp_path / "m.pt").write_text("the previous export")
    _disk_full_on_write(monkeypatch)
    with pytest.raises(ResourceError, match="No space left on device"):
        export_model(str(run_dir), "torchscript", tmp_path / "m.pt", n_check=2)
    assert (tmp_path / "m.pt").read_text() == "the previous export" and _entries(tmp_path) == ["m.pt"]
    code = main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    assert code == 2 and "No space left" in _one_error_line(capsys.readouterr().err, "export")
    assert _entries(tmp_path) == ["m.pt"]


# ------------------------------------------------------------------------------- 10: ensemble members
def _copy(run_dir: Path, dest: Path, perturb: bool = False) -> Path:
    shutil.copytree(run_dir, dest)
    (dest / "state.json").unlink(missing_ok=True)
    if perturb:  # another model: the same architecture, other weights
        state_file = dest / "model" / "model_state.pt"
        state = torch.load(state_file, weights_only=True)
        name = next(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight"))
        state[name] = state[name] + 0.01
        torch.save(state, state_file)
    return dest


def test_ensemble_refuses_one_run_twice_and_a_copy(tiny_run, tmp_path):
    run_dir, tmp = tiny_run
    kwargs = dict(card="synthetic-phantoms", root=str(tmp / "phantoms"), n_bootstrap=0, log=False, progress=False)
    with pytest.raises(ConfigError, match="same run") as info:
        ensemble_runs([str(run_dir), str(run_dir)], **kwargs)
    assert str(info.value).count(str(run_dir)) == 2
    copy = _copy(run_dir, tmp_path / "copy")
    with pytest.raises(ConfigError, match="identical model/model_state.pt") as info:
        ensemble_runs([str(run_dir), str(copy)], **kwargs)
    assert str(run_dir) in str(info.value) and str(copy) in str(info.value)


def test_ensemble_warns_about_training_data_as_evaluate_does(tiny_run, tmp_path, capsys, monkeypatch):
    run_dir, tmp = tiny_run
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", SALT)
    other = _copy(run_dir, tmp_path / "other", perturb=True)
    kwargs = dict(card="synthetic-phantoms", root=str(tmp / "phantoms"), n_bootstrap=0, log=False, progress=False)
    evaluated = evaluate_trained(str(run_dir), **kwargs)
    expected = [w for w in evaluated.warnings if "train split" in w]
    assert expected
    capsys.readouterr()
    report = ensemble_runs([str(run_dir), str(other)], **kwargs)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: member")]
    assert any(line.endswith(expected[0]) for line in printed)  # evaluate's own words, per member
    assert len([w for w in report.ensemble.warnings if "train split" in w]) == 2
    assert "WARNING" in report.table()


# -------------------------------------------------------------------- 11: every input is accounted for
def test_links_loops_and_broken_links_are_all_listed(tiny_run, tmp_path):
    run_dir, tmp = tiny_run
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


def test_all_bad_inputs_are_an_error_with_the_bad_file_list_written(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "b.png").symlink_to(folder / "gone.png")
    (folder / "notes.txt").write_text("x")
    out = tmp_path / "preds.csv"
    code = main(["predict", str(run_dir), str(folder), "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    line = _one_error_line(captured.err, "predict")
    assert code == 2 and "none of the 3 input file(s)" in line and str(bad_files_path(out)) in line
    assert sorted(pd.read_csv(bad_files_path(out))["image"]) == ["a.png", "b.png", "notes.txt"]
    assert len(pd.read_csv(out)) == 0
    with pytest.raises(NothingPredictedError, match="no image found"):
        require_predictions(pd.DataFrame({"image": []}), pd.DataFrame(columns=["image", "reason"]))
    assert issubclass(NothingPredictedError, MedtricksError)
