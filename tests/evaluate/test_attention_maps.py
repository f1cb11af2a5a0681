"""Issue 32: attention maps of a ViT (rollout, mean attention distance, the recomputed timm weights),
per-stage maps of a CNN, `medtricks attention`, and CKA across architectures (ViT blocks vs CNN stages)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import Attention
from torch import nn

from medtricks.errors import ConfigError, MedtricksError
from medtricks.evaluate.attention_capture import AttentionProbe, StageProbe, attention_probs, cnn_stages, find_vit
from medtricks.evaluate.attention_stats import (
    attention_rollout,
    class_token_maps,
    mean_attention_distance,
    normalise_maps,
    patch_distances,
)

ROOT = Path(__file__).resolve().parents[2]


def tiny_vit(**kw):
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "depth": 3, "num_classes": 2, **kw}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).eval()


# ------------------------------------------------------------------------------------ rollout
def test_rollout_of_a_hand_built_two_layer_attention():
    # layer 1, two heads whose mean is [[0.2, 0.8], [0.6, 0.4]]; layer 2, one head [[0.5, 0.5], [0.1, 0.9]]
    layer1 = torch.tensor([[[[0.4, 0.6], [0.6, 0.4]], [[0.0, 1.0], [0.6, 0.4]]]])
    layer2 = torch.tensor([[[[0.5, 0.5], [0.1, 0.9]]]])
    # by hand: A1' = 0.5 A1 + 0.5 I = [[0.6, 0.4], [0.3, 0.7]], A2' = [[0.75, 0.25], [0.05, 0.95]];
    # rollout = A2' A1' = [[0.75*0.6 + 0.25*0.3, 0.75*0.4 + 0.25*0.7], [0.05*0.6 + 0.95*0.3, 0.05*0.4 + 0.95*0.7]]
    expected = torch.tensor([[0.525, 0.475], [0.315, 0.685]], dtype=torch.float64)
    rollout = attention_rollout([layer1, layer2])
    assert torch.allclose(rollout[0], expected)
    assert torch.allclose(rollout.sum(-1), torch.ones(1, 2, dtype=torch.float64))  # still a flow: rows sum to 1
    # head-averaged layers give the same; residual=0 is the plain product of the attentions
    assert torch.allclose(attention_rollout([layer1.mean(1), layer2[:, 0]]), rollout)
    plain = attention_rollout([layer1, layer2], residual=0.0)[0]
    assert torch.allclose(plain, (layer2[0, 0] @ layer1[0].mean(0)).double())


def test_class_token_row_over_the_patches_on_the_grid():
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 0] = torch.tensor([0.2, 0.1, 0.2, 0.3, 0.2])  # class token, then a 2 x 2 grid
    attn[0, 0, 1:] = 0.2
    maps = class_token_maps(attn, (2, 2), num_prefix_tokens=1)
    assert maps.shape == (1, 1, 2, 2) and torch.allclose(maps[0, 0], torch.tensor([[0.1, 0.2], [0.3, 0.2]]))
    # no class token (global pooling): the mean over the queries
    no_cls = class_token_maps(attn, (2, 2), num_prefix_tokens=1, class_token=False)
    assert torch.allclose(no_cls[0, 0], attn[0, 0].mean(0)[1:].reshape(2, 2))
    with pytest.raises(ConfigError, match="not the 3 x 3 patch grid"):
        class_token_maps(attn, (3, 3), num_prefix_tokens=1)
    assert torch.allclose(normalise_maps(maps)[0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.5]], dtype=torch.float64))


# ---------------------------------------------------------------------------- attention distance
def _centres(g, p):
    return [((i + 0.5) * p, (j + 0.5) * p) for i in range(g) for j in range(g)]


def test_uniform_attention_distance_is_the_mean_pairwise_distance_and_ignores_the_class_token():
    g, p = 3, 8
    centres = _centres(g, p)
    brute = np.mean([math.dist(a, b) for a in centres for b in centres])  # queries x keys, self included
    attn = torch.full((1, 2, 1 + g * g, 1 + g * g), 0.9 / (g * g))
    attn[..., 0] = 0.1  # 10% to the class token: renormalised away
    attn[:, 1, :, 0] = 0.7  # head 1 sends most to the class token: the same distance once renormalised
    attn[:, 1, :, 1:] = 0.3 / (g * g)
    d = mean_attention_distance(attn, (g, g), p, num_prefix_tokens=1)
    assert d.shape == (1, 2) and torch.allclose(d, torch.full((1, 2), brute, dtype=torch.float64))
    assert torch.allclose(
        patch_distances((g, g), (p, p)),
        torch.tensor([[math.dist(a, b) for b in centres] for a in centres], dtype=torch.float64),
    )


def test_local_attention_distances_identity_zero_neighbours_one_patch():
    g, p = 4, 16
    identity = torch.eye(g * g)[None, None]
    assert mean_attention_distance(identity, (g, g), p).item() == 0.0
    neighbours = torch.zeros(g * g, g * g)
    for i in range(g):
        for j in range(g):
            near = [
                (i + di, j + dj) for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)) if 0 <= i + di < g and 0 <= j + dj < g
            ]
            for a, b in near:
                neighbours[i * g + j, a * g + b] = 1.0 / len(near)
    assert mean_attention_distance(neighbours[None, None], (g, g), p).item() == pytest.approx(p)
    # non-square patches: a row neighbour is ph away, a column neighbour pw
    rows_only = torch.zeros(g * g, g * g)
    for i in range(g):
        for j in range(g):
            rows_only[i * g + j, (i + 1 if i + 1 < g else i - 1) * g + j] = 1.0  # the patch below (last row: above)
    assert mean_attention_distance(rows_only[None, None], (g, g), (16, 8)).item() == pytest.approx(16)


# ------------------------------------------------------------------------- the timm weights
def test_recomputed_timm_attention_reproduces_the_fused_module_output():
    model = tiny_vit(reg_tokens=2, qk_norm=True)
    layout = find_vit(model)
    assert [layer.name for layer in layout.layers] == ["blocks.0", "blocks.1", "blocks.2"]
    assert layout.num_prefix_tokens == 3 and layout.class_token and layout.patch_size == (8, 8)
    module = layout.layers[1].module
    assert module.fused_attn  # the weights exist nowhere in the module's own forward
    seen = {}
    hook = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with AttentionProbe(layout) as probe, torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    hook.remove()
    assert probe.input_size == (32, 32) and layout.grid(probe.input_size) == (4, 4)
    probs = probe.probs["blocks.1"]
    assert probs.shape == (2, 3, 19, 19) and torch.allclose(probs.sum(-1), torch.ones(2, 3, 19))
    x = seen["x"]
    b, n, c = x.shape
    v = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)[2]
    out = module.proj(module.norm((probs @ v).transpose(1, 2).reshape(b, n, c)))
    assert torch.allclose(out, seen["out"], atol=1e-5)


def test_a_module_with_attention_probs_is_asked_and_another_class_is_refused():
    class Locality(Attention):  # like medtricks.models.vit_locality: its own (temperature, masked) weights
        def attention_probs(self, x):
            b, n, _ = x.shape
            return torch.full((b, self.num_heads, n, n), 1.0 / n)

    model = tiny_vit()
    model.blocks[0].attn = Locality(192, num_heads=3)
    with AttentionProbe(find_vit(model)) as probe, torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert torch.allclose(probe.probs["blocks.0"], torch.full((1, 3, 17, 17), 1 / 17))

    class Other(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(MedtricksError, match="Other.*attention_probs"):
        attention_probs(Other(), torch.rand(1, 5, 8))


def test_cnn_stage_maps_are_the_channel_mean_of_the_absolute_output():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    assert cnn_stages(model) == ["layer1", "layer2", "layer3", "layer4"]
    seen = {}
    hook = model.layer2.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with StageProbe(model, cnn_stages(model)) as probe, torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    hook.remove()
    assert [tuple(probe.maps[n].shape) for n in cnn_stages(model)] == [(2, 16, 16), (2, 8, 8), (2, 4, 4), (2, 2, 2)]
    assert torch.allclose(probe.maps["layer2"], seen["out"].abs().mean(1))
    with pytest.raises(ConfigError, match="neither a ViT"):
        cnn_stages(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------ CKA across architectures
def test_cka_of_features_with_a_known_relation_across_widths():
    from medtricks.evaluate.cka import linear_cka, minibatch_cka

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 30, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    y = torch.cat([x @ q, torch.zeros(400, 20, dtype=torch.float64)], dim=1)  # a rotation, padded to width 50
    assert linear_cka(x, y) == pytest.approx(1.0) and minibatch_cka(x, y, 100) == pytest.approx(1.0)
    tokens = y.reshape(400, 5, 10)  # the same numbers as a ViT's (tokens, width) per image
    assert linear_cka(x, tokens) == pytest.approx(1.0)
    independent = torch.randn(400, 12, generator=g, dtype=torch.float64)
    assert linear_cka(x, independent) < 0.1
    assert abs(minibatch_cka(x, independent, 100)) < 0.05  # unbiased: near 0, either sign


def test_cka_capture_between_a_vit_and_a_cnn_at_different_image_sizes():
    from medtricks.posthoc.representations import CKAResult, capture_cka, default_layers, select_layers

    vit = tiny_vit()
    torch.manual_seed(1)
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    assert default_layers(cnn, "stage") == ["layer1", "layer2", "layer3", "layer4"]
    assert len(default_layers(cnn)) == 8 and default_layers(vit, "stage") == default_layers(vit)
    images = torch.rand(16, 3, 48, 48)
    loader_a = [(images[i : i + 8, :, 8:40, 8:40], None) for i in (0, 8)]  # 32 px for the ViT
    loader_b = [(images[i : i + 8], None) for i in (0, 8)]  # the same images at 48 px for the CNN
    layers_a, layers_b = default_layers(vit), select_layers(cnn, granularity="stage")
    m = capture_cka(vit, cnn, loader_a, loader_b, layers_a, layers_b, method="linear")
    assert m.shape == (3, 4) and np.all((m > 0) & (m <= 1 + 1e-9))
    with pytest.raises(ConfigError, match="--layers-b pattern 'blocks.*'"):
        select_layers(cnn, "blocks.*", option="--layers-b")
    with pytest.raises(ConfigError, match="--granularity 'layer'"):
        default_layers(cnn, "layer")
    result = CKAResult(
        matrix=m,
        layers_a=layers_a,
        layers_b=layers_b,
        label_a="vit",
        label_b="cnn",
        method="linear",
        n_images=16,
        data="test",
        batch_size=8,
        granularity="stage",
        model_a="vit_tiny_patch16_224",
        model_b="resnet18",
    )
    assert result.diagonal is None and result.metrics() == {}
    table = result.table()
    assert "most similar layer of B" in table and "blocks.2" in table
    assert result.to_dict()["granularity"] == "stage"
    assert result.figure().get_axes()[0].get_xlabel() == "cnn (resnet18)"


# ------------------------------------------------------------------------------------ the command
def test_a_missing_image_is_one_line_naming_it(tmp_path, capsys):
    from medtricks.cli import main

    missing = tmp_path / "no_such_xray.png"
    assert main(["attention", str(tmp_path / "any_run"), "--images", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "medtricks attention: error" in err and str(missing) in err


def _tiny_run(tmp, *extra):
    from medtricks.recipe import load_recipe
    from medtricks.run import run_recipe

    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        overrides=[
            "data.synth.n=24",
            "data.synth.size=32",
            "data.image_size=32",
            "model.weights=none",
            "train.epochs=1",
            "train.batch_size=8",
            "eval.n_bootstrap=10",
            "train.progress=false",
            "schedule.warmup_epochs=0",
            f"data.root={tmp / 'phantoms'}",
            f"experiment.output_dir={tmp / 'runs'}",
            "tracking.backend=none",
            *extra,
        ],
    )
    return run_recipe(recipe, quiet=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attention")
    vit = _tiny_run(
        tmp,
        "model.name=vit_tiny_patch16_224",
        "tricks.bn_gamma.strategy=none",
        "model.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
    )
    cnn = _tiny_run(tmp, "model.name=resnet18", "data.image_size=48")  # another architecture and image size
    return vit, cnn, tmp


@pytest.mark.slow
def test_attention_command_on_a_vit_and_a_cnn_run(two_runs, capsys):
    from medtricks.cli import main
    from medtricks.tracking import create_store

    vit, cnn, tmp = two_runs
    images = tmp / "phantoms" / "images"
    out = tmp / "att_vit"
    assert (
        main(["attention", str(vit.run_dir), "--images", str(images), "--max-images", "3", "--out", str(out), "--log"])
        == 0
    )
    text = capsys.readouterr().out
    assert "mean attention distance" in text and "blocks.1" in text and "logged to" in text
    saved = json.loads((out / "attention.json").read_text())
    assert saved["kind"] == "vit" and saved["layers"] == ["blocks.0", "blocks.1"] and saved["grid"] == [4, 4]
    assert len(saved["images"]) == 3 and all(
        Path(i).suffix == ".png" and not Path(i).is_absolute() for i in saved["images"]
    )
    per_layer = saved["mean_attention_distance"]["per_layer"]
    assert len(per_layer) == 2 and all(0 < d < 8 * math.hypot(3, 3) for d in per_layer)
    assert np.array(saved["rollout"]["per_image"][saved["images"][0]]).shape == (4, 4)
    assert (out / "attention_distance.png").stat().st_size > 1000
    assert len(list((out / "maps").rglob("*.png"))) == 3
    record = create_store("none", root=tmp / "runs").get_run(vit.run_id)
    assert "attention_distance/blocks.0" in record.metrics

    out = tmp / "att_cnn"
    assert main(["attention", str(cnn.run_dir), "--images", str(images / "img_00000.png"), "--out", str(out)]) == 0
    saved = json.loads((out / "attention.json").read_text())
    assert saved["kind"] == "cnn" and saved["layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert saved["input_size"] == [48, 48] and saved["grids"]["layer1"] == [12, 12]
    assert (out / "maps" / "img_00000.png").stat().st_size > 1000

    bad = tmp / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["attention", str(cnn.run_dir), "--images", str(bad), "--out", str(tmp / "att_bad")]) == 2
    last = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()[-1]  # after the progress bar
    assert last.startswith("medtricks attention: error:") and "broken.png: not a readable PNG" in last
    assert main(["attention", str(vit.run_dir), "--images", str(images), "--layers", "layer*"]) == 2
    assert "matches no transformer block" in capsys.readouterr().err


@pytest.mark.slow
def test_cka_command_between_a_vit_and_a_cnn_trained_at_other_sizes(two_runs, capsys):
    from medtricks.cli import main

    vit, cnn, tmp = two_runs
    out = tmp / "cka_cross"
    assert (
        main(
            [
                "cka",
                str(vit.run_dir),
                str(cnn.run_dir),
                "--granularity",
                "stage",
                "--split",
                "all",
                "--n",
                "16",
                "--batch-size",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "most similar layer of B" in capsys.readouterr().out
    saved = json.loads((out / "cka.json").read_text())
    assert saved["layers_a"] == ["blocks.0", "blocks.1"]
    assert saved["layers_b"] == ["layer1", "layer2", "layer3", "layer4"]
    assert saved["diagonal"] is None and saved["model_b"] == "resnet18"
    assert (
        main(
            [
                "cka",
                str(vit.run_dir),
                str(cnn.run_dir),
                "--layers",
                "blocks.1",
                "--layers-b",
                "layer4",
                "--split",
                "all",
                "--n",
                "8",
                "--batch-size",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = json.loads((out / "cka.json").read_text())
    assert saved["layers_a"] == ["blocks.1"] and saved["layers_b"] == ["layer4"]
