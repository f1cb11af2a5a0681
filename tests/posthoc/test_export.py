"""`medtricks export`: ONNX / TorchScript with preprocessing and softmax inside, parity-checked, with a model card;
its temporary files are its own and a full disk is an error, not an abort."""

import builtins
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import medtricks._atomic
from medtricks.cli import main
from medtricks.errors import ConfigError, MedtricksError, ResourceError
from medtricks.posthoc.export import export_model, prepare_input
from medtricks.posthoc.load import load_trained
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            "data.synth.n=48",
            "data.synth.size=40",
            "data.image_size=32",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.n_bootstrap=10",
            "train.progress=false",
            "schedule.warmup_epochs=0",
            f"data.root={tmp / 'phantoms'}",
            f"experiment.output_dir={tmp / 'runs'}",
            "tracking.backend=none",
        ],
    )
    result = run_recipe(recipe, quiet=True)
    return result, tmp


def _val_inputs(tmp: Path, trained, n: int = 4) -> np.ndarray:
    """Real-looking inputs made by the documented contract (prepare_input) from phantom files."""
    from medtricks.data import read_image

    paths = sorted((tmp / "phantoms" / "images").glob("*.png"))[:n]
    return np.stack(
        [
            prepare_input(
                read_image(p),
                image_size=32,
                in_chans=trained.recipe.model.in_chans,
                augment=trained.recipe.data.augment,
            )
            for p in paths
        ]
    )


def test_onnx_export_matches_torch_and_writes_a_card(trained_run, tmp_path):
    import onnxruntime as ort

    result, tmp = trained_run
    exported = export_model(str(result.run_dir), "onnx", tmp_path / "cxr.onnx")
    assert exported.path.is_file() and exported.max_abs_diff < 1e-4
    assert "validation split" in exported.check_source
    assert exported.input_shape == (None, 1, 32, 32)

    # independent check: onnxruntime on the documented contract vs the torch model + normalization
    trained = load_trained(str(result.run_dir))
    x = _val_inputs(tmp, trained)
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    probs = session.run(["probs"], {"images": x})[0]
    mean, std = trained.data_config["mean"][0], trained.data_config["std"][0]
    with torch.no_grad():
        ref = torch.softmax(trained.model(torch.from_numpy((x - np.float32(mean)) / np.float32(std))), 1).numpy()
    assert probs.shape == (4, 3)
    assert np.abs(probs - ref).max() < 1e-4
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)

    card = exported.card_path.read_text()
    assert exported.card_path == tmp_path / "cxr.onnx.md"
    for text in (
        "0. normal",
        "1. bacterial",
        "2. covid",
        "(N, 1, 32, 32)",
        "values in [0, 1]",
        "opset 17",
        f"{exported.max_abs_diff:.2e}",
        result.run_dir.name,
        "None stored with the run",
    ):
        assert text in card, text
    assert f"mean [{round(float(mean), 6)}]" in card


def test_prepare_input_is_the_eval_transform_before_normalization(trained_run):
    result, tmp = trained_run
    from medtricks.data import build_eval_dataset

    trained = load_trained(str(result.run_dir))
    dataset, _ = build_eval_dataset(
        "synthetic-phantoms",
        tmp / "phantoms",
        image_size=32,
        mean=trained.data_config["mean"],
        std=trained.data_config["std"],
        in_chans=1,
        augment=trained.recipe.data.augment,
        progress=False,
    )
    path = Path(dataset.items[0]["path"])
    from medtricks.data import read_image

    mean, std = trained.data_config["mean"][0], trained.data_config["std"][0]
    x = (prepare_input(read_image(path), image_size=32) - np.float32(mean)) / np.float32(std)
    assert np.array_equal(x, dataset[0][0].numpy())


def test_torchscript_export_and_cli_by_run_id(trained_run, tmp_path, capsys):
    result, tmp = trained_run
    code = main(
        ["export", result.run_id, "--format", "torchscript", "--out", str(tmp_path), "--runs-dir", str(tmp / "runs")]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "max |delta prob|" in out and "model card" in out
    module = torch.jit.load(str(tmp_path / "model.pt"))
    trained = load_trained(str(result.run_dir))
    x = torch.from_numpy(_val_inputs(tmp, trained, n=3))
    mean, std = trained.data_config["mean"][0], trained.data_config["std"][0]
    with torch.no_grad():
        got = module(x)
        ref = torch.softmax(trained.model((x - mean) / std), 1)
    assert (got - ref).abs().max() < 1e-4
    assert "TorchScript" in (tmp_path / "model.pt.md").read_text()


def test_model_card_carries_the_stored_operating_point(trained_run, tmp_path):
    from medtricks.evaluate.operating_point import OperatingPoint
    from medtricks.rundir import RunDir

    result, tmp = trained_run
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    OperatingPoint(threshold=0.3125, method="youden", val_sensitivity=0.9, val_specificity=0.8).to_json(
        RunDir(copy).operating_point
    )
    recipe = (copy / "recipe.yaml").read_text()  # the run's data gone: the parity check draws phantoms
    (copy / "recipe.yaml").write_text(recipe.replace(str(tmp / "phantoms"), str(tmp_path / "gone")))
    exported = export_model(str(copy), "onnx", tmp_path / "m.onnx", opset=18)
    card = exported.card_path.read_text()
    assert "probs[:, 1] >= 0.3125" in card and "Youden" in card and "opset 18" in card
    assert exported.check_source.startswith("synthetic phantoms") and exported.max_abs_diff < 1e-4
    assert "synthetic phantoms" in card


def test_bad_format_and_missing_run(trained_run, tmp_path, capsys):
    result, _ = trained_run
    with pytest.raises(ConfigError, match="onnx"):
        export_model(str(result.run_dir), "tflite", tmp_path / "m.tflite")
    with pytest.raises(MedtricksError, match="neither"):
        export_model("no-such-run", "onnx", tmp_path / "m.onnx", runs_dir=tmp_path)
    assert (
        main(
            [
                "export",
                "no-such-run",
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "m.onnx"),
                "--runs-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "medtricks export: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(result.run_dir), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert not list(tmp_path.glob("m*"))  # nothing written on failure


def test_parity_failure_writes_nothing(trained_run, tmp_path):
    from medtricks.posthoc.export import ExportParityError

    result, _ = trained_run
    with pytest.raises(ExportParityError, match="max \\|delta prob\\|"):
        export_model(str(result.run_dir), "torchscript", tmp_path / "bad.pt", tolerance=-1.0)
    assert not list(tmp_path.glob("bad*"))  # neither the file, its temporary copy, nor a card


def test_resizer_model_exports_to_onnx_with_its_antialiased_resize(tmp_path):
    """The TorchScript-based exporter has no antialiased bilinear resize: the torch.export one takes over."""
    import onnxruntime as ort

    from medtricks.models import create_model
    from medtricks.models.resizer import LearnableResizer, ResizerModel
    from medtricks.posthoc.export import ExportWrapper, _export_onnx

    torch.manual_seed(0)
    model = ResizerModel(
        LearnableResizer(in_chans=1, out_size=16, n_filters=4, n_res_blocks=1),
        create_model("resnet18", weights="none", num_classes=2, in_chans=1),
    ).eval()
    wrapper = ExportWrapper(model, (0.5,), (0.25,), 1).eval()
    x = torch.rand(3, 1, 24, 24)
    opset, exporter = _export_onnx(wrapper, x[:1], tmp_path / "r.onnx", 17)
    assert opset >= 18 and "torch.export" in exporter
    got = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"]).run(
        ["probs"], {"images": x.numpy()}
    )[0]
    with torch.no_grad():
        assert np.abs(got - wrapper(x).numpy()).max() < 1e-4


# ------------------------------------------------------------- 7: export's temporary files are its own
def test_export_leaves_foreign_tmp_paths_alone(salted_run, entries, tmp_path):
    run_dir, _ = salted_run
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
    assert entries(tmp_path) == ["m.pt", "m.pt.md", "m.pt.tmp", "served", "served.tmp"]


def _disk_full_on_write(monkeypatch):
    """Files the package opens for writing through its atomic writer go to /dev/full (ENOSPC on write)."""
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        return real_open("/dev/full", mode, *args, **kwargs) if "w" in mode else real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(medtricks._atomic, "open", full_open, raising=False)


def test_torchscript_export_on_a_full_disk_is_an_error_not_an_abort(
    salted_run, entries, one_line_error, tmp_path, monkeypatch, capsys
):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    run_dir, _ = salted_run
    tmp_path = tmp_path / "exports"
    tmp_path.mkdir()
    (tmp_path / "m.pt").write_text("the previous export")
    _disk_full_on_write(monkeypatch)
    with pytest.raises(ResourceError, match="No space left on device"):
        export_model(str(run_dir), "torchscript", tmp_path / "m.pt", n_check=2)
    assert (tmp_path / "m.pt").read_text() == "the previous export" and entries(tmp_path) == ["m.pt"]
    code = main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "m.pt")])
    assert code == 2 and "No space left" in one_line_error(capsys, "export")
    assert entries(tmp_path) == ["m.pt"]
