"""tricks.reinit_late (issue 28): re-draws exactly the named stages with timm's family init, leaves every
other tensor equal to the "pretrained" weights, seeded; registered as a trick with an ablate name."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from medtricks.ablation.variants import trick_overrides
from medtricks.errors import ConfigError
from medtricks.models import create_model
from medtricks.models.reinit import derive_seed, init_family, init_new_head
from medtricks.recipe import load_recipe
from medtricks.tricks.base import TrickContext
from medtricks.tricks.registry import build_tricks, trick_tags
from medtricks.tricks.reinit_late import reinit_late

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _pretrained_like(name: str, seed: int = 0) -> nn.Module:
    """A small timm model whose every tensor is moved off its init, as a loaded checkpoint would be."""
    model = create_model(name, weights="none", num_classes=2, in_chans=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            tensor.add_(0.3 + 0.1 * torch.randn(tensor.shape, generator=gen))
    return model


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _in(name: str, stages) -> bool:
    return any(name == s or name.startswith(s + ".") for s in stages)


@pytest.mark.parametrize(
    "name,stages,expected",
    [
        ("resnet10t", 1, ["layer4"]),
        ("resnet10t", ["layer3", "layer4"], ["layer3", "layer4"]),
        ("efficientnet_lite0", 1, ["blocks.5"]),  # the last stage with residual blocks (zero_late's)
        ("efficientnet_lite0", ["blocks.6", "conv_head"], ["blocks.6", "conv_head"]),
    ],
)
def test_redraws_exactly_the_named_stages(name, stages, expected):
    model = _pretrained_like(name)
    before = _tensors(model)
    rng_state = torch.get_rng_state()
    report = reinit_late(model, stages, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global stream is left alone
    assert report.stages == expected
    after = _tensors(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    inside = {k for k in before if _in(k, expected)}
    assert inside and changed == inside  # every tensor in them changed, nothing else did
    assert set(report.modules) == {k.rsplit(".", 1)[0] for k in inside}
    assert report.family == ("resnet" if name.startswith("resnet") else "efficientnet")
    assert "reinit_late" in report.summary() and expected[0] in str(report)


@pytest.mark.parametrize("name", ["resnet10t", "efficientnet_lite0"])
def test_init_statistics_are_timm_like(name):
    model = _pretrained_like(name)
    report = reinit_late(model, 1, seed=0)
    stage = model.get_submodule(report.stages[0])
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() >= 1000]
    assert convs
    for conv in convs:
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        if name.startswith("efficientnet"):
            fan_out //= conv.groups  # _init_weight_goog's group fan-out
        expected = math.sqrt(2.0 / fan_out)  # kaiming_normal fan_out (ResNet) / normal(0, sqrt(2/fan_out)) (goog)
        assert float(conv.weight.detach().std()) == pytest.approx(expected, rel=0.15)
        assert abs(float(conv.weight.detach().mean())) < 0.2 * expected
    for bn in (m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
        assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)


def test_seeded_same_seed_same_weights():
    a, b, c = (_pretrained_like("resnet10t") for _ in range(3))
    reinit_late(a, 1, seed=7)
    torch.manual_seed(123)  # the global stream does not matter
    reinit_late(b, 1, seed=7)
    reinit_late(c, 1, seed=8)
    sa, sb, sc = _tensors(a), _tensors(b), _tensors(c)
    late = [k for k in sa if k.startswith("layer4.")]
    assert late and all(torch.equal(sa[k], sb[k]) for k in late)
    assert not torch.equal(sa["layer4.0.conv1.weight"], sc["layer4.0.conv1.weight"])


def test_zero_init_last_zeroes_the_block_ends():
    model = _pretrained_like("resnet10t")
    reinit_late(model, 1, seed=0, zero_init_last=True)
    assert torch.all(model.layer4[0].bn2.weight == 0)


def test_bad_stages_are_named():
    model = _pretrained_like("resnet10t")
    with pytest.raises(ConfigError, match="1..4"):
        reinit_late(model, 5)
    with pytest.raises(ConfigError, match="layer4"):
        reinit_late(model, ["layer9"])


def test_trick_registration_recipe_and_run_point():
    assert trick_overrides("reinit_late") == ["tricks.reinit_late.stages=1"]
    assert trick_overrides("reinit_late=2") == ["tricks.reinit_late.stages=2"]
    recipe = load_recipe(RECIPES / "reinit_late.yaml", overrides=["model.weights=none", "experiment.seed=5"])
    assert recipe.tricks.reinit_late.stages == 1 and "reinit_late=1" in trick_tags(recipe)
    off = load_recipe(RECIPES / "efficientnet_lite0.yaml")
    assert off.tricks.reinit_late.stages == 0 and not any(t.startswith("reinit_late") for t in trick_tags(off))
    with pytest.raises(Exception, match="reinit_late"):
        load_recipe(RECIPES / "reinit_late.yaml", overrides=["tricks.reinit_late.stages=-1"])
    tricks = [
        t for t in build_tricks(recipe, TrickContext(recipe=recipe, classes=["a", "b"])) if t.name == "reinit_late"
    ]
    model = _pretrained_like("efficientnet_lite0")
    tricks[0].on_model(model)
    assert tricks[0].report.stages == ["blocks.5"] and "blocks.5" in tricks[0].log_params()["reinit_late"]
    again = _pretrained_like("efficientnet_lite0")
    reinit_late(again, 1, seed=5)
    assert torch.equal(
        again.blocks[5][0].conv_pw.weight, model.blocks[5][0].conv_pw.weight
    )  # seeded by experiment.seed


def test_new_head_is_drawn_from_its_own_seed():
    a = create_model("resnet10t", weights="none", num_classes=2, in_chans=1)
    torch.manual_seed(99)
    _ = torch.randn(1000)  # whatever was drawn before
    b = create_model("resnet10t", weights="none", num_classes=2, in_chans=1)
    assert init_new_head(a, 4) == ["fc"] and init_new_head(b, 4) == ["fc"]
    assert torch.equal(a.fc.weight, b.fc.weight) and not torch.equal(a.layer1[0].conv1.weight, b.layer1[0].conv1.weight)
    init_new_head(b, 5)
    assert not torch.equal(a.fc.weight, b.fc.weight)
    assert init_family(a) == "resnet" and derive_seed(4, "head") != derive_seed(4, "reinit_late")
