"""Backbone factory: names, ImageNet sanity on real photos, grayscale equivalence, configs, stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtricks.models import create_model, get_data_config, stage_of_parameter
from medtricks.models.backbones import channel_stats, resolve_model_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_input(image: np.ndarray, config: dict, size: int = 224) -> torch.Tensor:
    """uint8 HxW or HxWx3 → normalized 1xCxHxW, resized (whole image) to ``size``."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    x = torch.from_numpy(resized)
    x = x.permute(2, 0, 1) if x.ndim == 3 else x[None]
    mean = torch.tensor(config["mean"])[:, None, None]
    std = torch.tensor(config["std"])[:, None, None]
    return ((x - mean) / std)[None]


def _imagenet_rgb(gray: torch.Tensor) -> torch.Tensor:
    """Nx1xHxW gray in [0, 1] → replicated to RGB and normalized per channel with ImageNet stats."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (gray.repeat(1, 3, 1, 1) - mean) / std


@pytest.fixture(scope="module")
def lite0_rgb():
    return create_model("efficientnet_lite0", weights="imagenet", num_classes=1000, in_chans=3).eval()


@pytest.fixture(scope="module")
def lite0_gray():
    return create_model("efficientnet_lite0", weights="imagenet", num_classes=1000, in_chans=1).eval()


@pytest.fixture(scope="module")
def gray_photo():
    from skimage import data
    from skimage.color import rgb2gray

    return (rgb2gray(data.chelsea()) * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------ ImageNet
@pytest.mark.parametrize("photo, label", [("chelsea", 285), ("coffee", 967)])
def test_offline_lite0_classifies_sample_photos(lite0_rgb, photo, label):
    """scikit-image's cat is ImageNet 285 (Egyptian cat), its coffee cup 967 (espresso)."""
    from skimage import data

    config = get_data_config(lite0_rgb)
    assert config == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "input_size": (3, 224, 224)}
    with torch.no_grad():
        logits = lite0_rgb(_to_input(getattr(data, photo)(), config))
    assert logits.argmax().item() == label


# ------------------------------------------------------------------------------------ grayscale
def test_gray_model_equals_rgb_model_on_replicated_image_exactly(lite0_rgb, lite0_gray, gray_photo):
    """Lite0's statistics are equal per channel (0.5/0.5): the 1-channel stem (sum of the RGB
    kernels) sees exactly what the RGB stem sees, padding included, so logits agree up to float32
    summation order (measured max |diff| ~3e-6 on logits of magnitude ~12)."""
    gray_config = get_data_config(lite0_gray)
    assert gray_config == {"mean": (0.5,), "std": (0.5,), "input_size": (1, 224, 224)}
    assert "exact" in lite0_gray.medtricks_info["input_adaptation"]
    rgb = np.repeat(gray_photo[:, :, None], 3, axis=2)
    with torch.no_grad():
        gray_logits = lite0_gray(_to_input(gray_photo, gray_config))
        rgb_logits = lite0_rgb(_to_input(rgb, get_data_config(lite0_rgb)))
    torch.testing.assert_close(gray_logits, rgb_logits, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def calibrated_resnet(tmp_path_factory):
    """A timm resnet18 with realistic BN statistics, saved as a checkpoint (ImageNet normalization)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, 64, 64))
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path


def test_gray_model_with_imagenet_statistics_matches_away_from_the_border(calibrated_resnet):
    """ImageNet means differ per channel: after the stem, the 1-channel model equals the RGB model
    exactly wherever the 7x7 kernel does not touch the zero padding (the mean offset is folded into
    bn1's running mean); only the outermost stem outputs differ, so logits stay close: measured
    1.5 % relative L2 difference at 224 px (3.5 % at 128, 9 % at 64), against 13.6 % for timm's
    plain kernel sum."""
    rgb = create_model("resnet18", weights=f"file:{calibrated_resnet}", num_classes=1000, in_chans=3).eval()
    gray = create_model("resnet18", weights=f"file:{calibrated_resnet}", num_classes=1000, in_chans=1).eval()
    assert get_data_config(gray)["mean"] == channel_stats(IMAGENET_MEAN, IMAGENET_STD, 1)[0] == (0.449,)
    assert "bn1.running_mean" in gray.medtricks_info["input_adaptation"]
    torch.manual_seed(1)
    g = torch.rand(2, 1, 224, 224)
    x_gray = (g - 0.449) / 0.226
    x_rgb = _imagenet_rgb(g)
    stem = {}
    hooks = [
        m.bn1.register_forward_hook(lambda mod, i, o, key=key: stem.__setitem__(key, o))
        for key, m in (("gray", gray), ("rgb", rgb))
    ]
    with torch.no_grad():
        gray_logits, rgb_logits = gray(x_gray), rgb(x_rgb)
    for hook in hooks:
        hook.remove()
    # conv1: 7x7, stride 2, padding 3 on 224 px → 112 outputs; outputs 0, 1 and 111 see padding.
    torch.testing.assert_close(stem["gray"][..., 2:111, 2:111], stem["rgb"][..., 2:111, 2:111], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stem["gray"][..., 0, :], stem["rgb"][..., 0, :], atol=1e-3)  # border differs
    relative = ((gray_logits - rgb_logits).norm() / rgb_logits.norm()).item()
    assert relative < 0.03, relative


def test_plain_kernel_sum_would_not_be_equivalent(calibrated_resnet):
    """Why the offset fold exists: timm's plain RGB kernel sum is far off for ImageNet statistics."""
    import timm
    from timm.models import adapt_input_conv

    rgb = create_model("resnet18", weights=f"file:{calibrated_resnet}", num_classes=1000, in_chans=3).eval()
    naive = timm.create_model("resnet18", in_chans=1).eval()
    state = torch.load(calibrated_resnet, weights_only=True)
    state["conv1.weight"] = adapt_input_conv(1, state["conv1.weight"])
    naive.load_state_dict(state)
    torch.manual_seed(1)
    g = torch.rand(2, 1, 224, 224)
    x_rgb = _imagenet_rgb(g)
    with torch.no_grad():
        folded = create_model("resnet18", weights=f"file:{calibrated_resnet}", num_classes=1000, in_chans=1).eval()(
            (g - 0.449) / 0.226
        )
        plain = naive((g - 0.449) / 0.226)
        reference = rgb(x_rgb)
    error = lambda out: ((out - reference).norm() / reference.norm()).item()  # noqa: E731
    assert 3 * error(folded) < error(plain)


# ------------------------------------------------------------------------------------ factory
def test_names_aliases_and_errors():
    assert resolve_model_name("efficientnet_lite0") == "tf_efficientnet_lite0"
    assert resolve_model_name("timm:efficientnet_lite0") == "efficientnet_lite0"
    assert resolve_model_name("resnet50.tv_in1k") == "resnet50.tv_in1k"
    assert resolve_model_name("monai:DenseNet121") == "monai:densenet121"
    with pytest.raises(ValueError, match="did you mean resnet50"):
        create_model("resnet5O")
    with pytest.raises(ValueError, match="unknown MONAI model 'monai:vit'.*monai:densenet121"):
        create_model("monai:vit")
    with pytest.raises(ValueError, match="in_chans must be a positive integer"):
        create_model("resnet18", in_chans=0)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="drop_rate must be a number"):
        create_model("resnet18", drop_rate=1.5)
    with pytest.raises(ValueError, match="not supported for monai:resnet18"):
        create_model("monai:resnet18", drop_rate=0.2)


def test_random_init_only_with_weights_none():
    model = create_model("resnet18", num_classes=3, in_chans=1, drop_rate=0.25)
    info = model.medtricks_info
    assert info["weights"] == "none" and info["weights_source"] is None and info["weights_sha256"] is None
    assert info["head"] == "random" and info["num_classes"] == 3 and model.drop_rate == 0.25
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="weights must be"):
        create_model("resnet18", weights="")


@pytest.mark.parametrize(
    "name, first, head",
    [("monai:densenet121", "features.conv0", "class_layers.out"), ("monai:resnet18", "conv1", "fc")],
)
def test_monai_networks(name, first, head):
    model = create_model(name, num_classes=2, in_chans=1)
    assert model.get_submodule(first).in_channels == 1
    assert model.get_submodule(head).out_features == 2
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 2)
    assert get_data_config(model) == {"mean": (0.449,), "std": (0.226,), "input_size": (1, 224, 224)}


def test_data_config_through_a_wrapper():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.front = nn.Conv2d(1, 1, 3, padding=1)
            self.backbone = create_model("resnet18", num_classes=2, in_chans=1)

        def forward(self, x):
            return self.backbone(self.front(x))

    wrapper = Wrapper()
    assert get_data_config(wrapper)["input_size"] == (1, 224, 224)
    stages = stage_of_parameter(wrapper)
    assert stages["front.weight"] == 0 and stages["backbone.conv1.weight"] == 0
    assert stages["backbone.layer3.0.conv1.weight"] == 3 and stages["backbone.fc.weight"] == 5


# ------------------------------------------------------------------------------------ stages
def test_stages_resnet_lite0_densenet():
    resnet = stage_of_parameter(create_model("resnet18"))
    assert resnet["conv1.weight"] == 0 and resnet["bn1.bias"] == 0
    assert [resnet[f"layer{i}.0.conv1.weight"] for i in range(1, 5)] == [1, 2, 3, 4]
    assert resnet["fc.weight"] == resnet["fc.bias"] == 5 == max(resnet.values())

    lite0 = stage_of_parameter(create_model("efficientnet_lite0"))
    assert lite0["conv_stem.weight"] == 0 and lite0["blocks.0.0.conv_dw.weight"] == 1
    head = lite0["classifier.weight"]
    assert head == max(lite0.values()) and sum(s == head for s in lite0.values()) == 2

    dense = stage_of_parameter(create_model("monai:densenet121"))
    assert dense["features.conv0.weight"] == 0
    assert dense["features.denseblock1.denselayer1.layers.conv1.weight"] == 1
    assert dense["features.transition1.conv.weight"] == 1
    assert dense["features.norm5.weight"] == 4
    assert dense["features.denseblock4.denselayer1.layers.conv1.weight"] == 4
    assert dense["class_layers.out.weight"] == 5


def test_fine_stages_follow_blocks():
    fine = stage_of_parameter(create_model("resnet18"), coarse=False)
    assert fine["layer1.0.conv1.weight"] < fine["layer1.1.conv1.weight"] < fine["fc.weight"]
