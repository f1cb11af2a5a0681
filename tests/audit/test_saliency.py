"""Grad-CAM overlays in `medtricks predict --cam DIR` (issue 21, item 1) and the target-layer choice."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from medtricks.cli import main
from medtricks.data import synthesize_phantoms
from medtricks.models.resizer import LearnableResizer, ResizerModel
from medtricks.posthoc.predict import predict_images
from medtricks.recipe import load_recipe
from medtricks.run import run_recipe
from medtricks.errors import MedtricksError
from medtricks.audit.saliency import cam_file_name, cam_target_layer, grad_cam


ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # resnet18 reduces 32x: a 2x2 last feature map, enough for maps that differ between images


@pytest.mark.parametrize(
    "arch, expected", [("resnet18", "layer4"), ("efficientnet_b0", "bn2"), ("convnext_atto", "norm_pre")]
)
def test_target_layer_is_the_last_feature_map_before_pooling(arch, expected):
    model = timm.create_model(arch, pretrained=False, num_classes=2, in_chans=1)
    name, layer = cam_target_layer(model, (1, 64, 64))
    assert name == expected
    assert dict(model.named_modules())[name] is layer


def test_small_inputs_fall_back_to_the_deepest_map_fine_enough():
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=2, in_chans=1)
    assert cam_target_layer(model, (1, 96, 96))[0] == "bn2"  # 3x3 at 96 px
    name, layer = cam_target_layer(model, (1, 96, 96), min_grid=4)
    assert name == "blocks.4"  # the stride-16 stage: 6x6
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, 96, 96))
    handle.remove()
    assert seen == [(6, 6)]
    assert cam_target_layer(model, (1, 224, 224), min_grid=4)[0] == "bn2"  # 7x7: the last map is fine
    with pytest.raises(MedtricksError, match="at least 64x64"):
        cam_target_layer(model, (1, 96, 96), min_grid=64)


def test_target_layer_inside_a_resizer_and_maps_in_unit_range():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=2, in_chans=1)
    model = ResizerModel(LearnableResizer(in_chans=1, out_size=64), backbone).eval()
    name, layer = cam_target_layer(model, (1, 64, 64))
    assert name == "layer4" and layer is backbone.layer4
    maps = grad_cam(model, layer, torch.randn(2, 1, 96, 96), classes=[1, 0])
    assert maps.shape == (2, 96, 96) and maps.min() >= 0 and maps.max() <= 1


def test_cam_file_names_mirror_the_image_column():
    taken = set()
    assert cam_file_name("a/img0.png", taken) == "a/img0.png"
    assert cam_file_name("scan.dcm", taken) == "scan.png"
    assert cam_file_name("scan.png", taken) == "scan.png.png"  # would clash with scan.dcm's overlay


@pytest.fixture(scope="module")
def cam_run(binary_phantom_card, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cam")
    synthesize_phantoms(tmp / "data", n=48, classes=("normal", "pneumonia"), size=SIZE + 8, seed=0)
    card = binary_phantom_card(tmp)
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            f"data.card={card}",
            "data.synth=null",
            f"data.root={tmp / 'data'}",
            f"data.image_size={SIZE}",
            "data.val_fraction=0.25",
            "model.name=resnet18",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=16",
            "eval.n_bootstrap=10",
            "train.progress=false",
            "schedule.warmup_epochs=0",
            f"experiment.output_dir={tmp / 'runs'}",
            "tracking.backend=none",
        ],
    )
    result = run_recipe(recipe, quiet=True)
    new = tmp / "new"
    table = pd.read_csv(tmp / "data" / "phantoms.csv")
    pngs = [
        tmp / "data" / path
        for label in ("normal", "pneumonia")
        for path in table.loc[table["label"] == label, "path"].iloc[-2:]
    ]
    for i, src in enumerate(pngs):
        dest = new / ("a" if i < 2 else "b") / f"img{i}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    (new / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return result, tmp, new


def test_predict_cam_writes_one_overlay_per_image(cam_run, tmp_path, capsys):
    result, tmp, new = cam_run
    cams, out = tmp_path / "cams", tmp_path / "preds.csv"
    code = main(["predict", str(result.run_dir), str(new), "--out", str(out), "--cam", str(cams), "--batch-size", "3"])
    assert code == 0
    err = capsys.readouterr().err
    assert "overlays: Grad-CAM at layer 'layer4' for class 'pneumonia' (the positive class)" in err
    preds = pd.read_csv(out)
    assert list(preds["image"]) == ["a/img0.png", "a/img1.png", "b/img2.png", "b/img3.png"]
    assert list(preds["cam"]) == list(preds["image"])  # same relative names: no PHI beyond the CSV's
    assert sorted(p.relative_to(cams).as_posix() for p in cams.rglob("*.png")) == list(preds["image"])
    assert pd.read_csv(tmp_path / "preds.bad_files.csv")["image"].tolist() == ["corrupt.png"]  # listed, no overlay

    overlays = [np.asarray(Image.open(cams / name)) for name in preds["cam"]]
    assert all(o.shape == (SIZE, SIZE, 3) and o.dtype == np.uint8 for o in overlays)
    assert max(np.abs(overlays[0].astype(int) - o.astype(int)).mean() for o in overlays[1:]) > 1.0


def test_heat_maps_differ_between_images(cam_run, tmp_path):
    from medtricks.audit.saliency import grad_cam as cam_fn
    from medtricks.posthoc.load import load_trained

    result, tmp, new = cam_run
    preds, bad = predict_images(str(result.run_dir), [new], cam_dir=tmp_path / "c", progress=False)
    assert len(bad) == 1 and preds.attrs["cam"].endswith(str(tmp_path / "c"))
    trained = load_trained(str(result.run_dir))
    name, layer = cam_target_layer(trained.model, (1, SIZE, SIZE))
    torch.manual_seed(1)
    maps = cam_fn(trained.model, layer, torch.randn(2, 1, SIZE, SIZE), classes=[1, 1])
    assert maps.shape == (2, SIZE, SIZE) and np.abs(maps[0] - maps[1]).max() > 1e-3


def test_a_failing_cam_batch_is_warned_not_fatal(cam_run, tmp_path, monkeypatch):
    import medtricks.posthoc.predict as predict_module

    result, tmp, new = cam_run

    def boom(*args, **kwargs):
        raise RuntimeError("no gradients here")

    monkeypatch.setattr(predict_module, "grad_cam", boom)
    with pytest.warns(RuntimeWarning, match="Grad-CAM failed for a batch of 4"):
        preds, bad = predict_images(str(result.run_dir), [new], cam_dir=tmp_path / "c", progress=False)
    assert len(preds) == 4 and set(preds["cam"].fillna("")) == {""}
