"""BN-gamma strategies per model family: the right layers are found, exactly they change, and
zero_all makes every residual block return act(shortcut(x))."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from medtricks.gamma.bn import apply_gamma_strategy, find_residual_norms
from medtricks.gamma.blocks import is_norm_layer

timm = pytest.importorskip("timm")


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=2)


def _torchvision_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=2)


def _monai_resnet(block: str, layers: list[int], shortcut_type: str = "B") -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from monai.networks.nets import ResNet

        return ResNet(
            block=block,
            layers=layers,
            block_inplanes=[8, 16, 32, 64],
            spatial_dims=2,
            n_input_channels=3,
            num_classes=2,
            shortcut_type=shortcut_type,
        )

    return build


# Shortcut semantics: what a block returns when its residual branch outputs exactly zero.
def _act_after_shortcut(act_attr: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    def expected(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        ds = getattr(block, "downsample", None)
        shortcut = ds(x) if ds is not None else x
        return getattr(block, act_attr)(shortcut.clone())  # clone: the activation may be in-place

    return expected


def _identity(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


# name: (builder, n residual blocks, last-stage last norms, zero-branch output)
FAMILIES = {
    "timm_resnet18": (_timm("resnet18"), 8, ["layer4.0.bn2", "layer4.1.bn2"], _act_after_shortcut("act2")),
    "timm_resnet26d": (_timm("resnet26d"), 8, ["layer4.0.bn3", "layer4.1.bn3"], _act_after_shortcut("act3")),
    "timm_seresnext26d": (
        _timm("seresnext26d_32x4d"),
        8,
        ["layer4.0.bn3", "layer4.1.bn3"],
        _act_after_shortcut("act3"),
    ),
    "torchvision_resnet18": (_torchvision_resnet18, 8, ["layer4.0.bn2", "layer4.1.bn2"], _act_after_shortcut("relu")),
    "tf_efficientnet_lite0": (
        _timm("tf_efficientnet_lite0"),
        9,
        ["blocks.5.1.bn3", "blocks.5.2.bn3", "blocks.5.3.bn3"],
        _identity,
    ),
    "mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), 6, ["blocks.4.1.bn3", "blocks.4.2.bn3"], _identity),
    "mobilenetv4_conv_small": (
        _timm("mobilenetv4_conv_small"),
        10,
        [f"blocks.3.{i}.pw_proj.bn" for i in range(1, 6)],
        _identity,
    ),
    "tf_efficientnetv2_b0": (_timm("tf_efficientnetv2_b0"), 15, [f"blocks.5.{i}.bn3" for i in range(1, 8)], _identity),
    "regnetx_002": (_timm("regnetx_002"), 13, [f"s4.b{i}.conv3.bn" for i in range(1, 8)], _act_after_shortcut("act3")),
    "monai_resnet_basic": (_monai_resnet("basic", [1, 1, 1, 1]), 4, ["layer4.0.bn2"], _act_after_shortcut("act")),
    "monai_resnet_bottleneck_A": (
        _monai_resnet("bottleneck", [1, 1, 2, 2], "A"),
        6,
        ["layer4.0.bn3", "layer4.1.bn3"],
        _act_after_shortcut("act"),
    ),
}


def _pretrained_style(model: nn.Module, seed: int = 0) -> nn.Module:
    """Mimic loaded weights: γ != 1, β != 0, non-trivial running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_norm_layer(m) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                if getattr(m, "running_var", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_find_residual_norms_per_family(family):
    build, n_blocks, late_norms, _ = FAMILIES[family]
    found = find_residual_norms(build())
    assert len(found) == n_blocks
    assert [r.global_block for r in found] == list(range(n_blocks))
    last_stage = found[-1].stage
    assert [r.last_norm_name for r in found if r.stage == last_stage] == late_norms
    for r in found:
        assert r.last_norm_name in r.norms and r.last_norm is r.norms[r.last_norm_name]
        assert r.last_norm_name.startswith(r.name + ".")
        assert not any(".downsample." in n for n in r.norms)  # shortcut norms are not on the branch


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_late_changes_exactly_the_late_norms(family):
    build, _, late_norms, _ = FAMILIES[family]
    model = _pretrained_style(build())
    before = _snapshot(model)
    report = apply_gamma_strategy(model, {"strategy": "zero_late"})
    assert report.names == late_norms
    expected = {f"{n}.{p}" for n in late_norms for p in ("weight", "bias")}
    assert _changed(before, model) == expected
    state = model.state_dict()
    for n in late_norms:
        assert torch.count_nonzero(state[f"{n}.weight"]) == 0 and torch.count_nonzero(state[f"{n}.bias"]) == 0
    for row in report.rows:
        assert row["old_gamma_mean"] == pytest.approx(float(before[row["name"] + ".weight"].mean()))
        assert row["old_beta_mean"] == pytest.approx(float(before[row["name"] + ".bias"].mean()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_late_sets_exactly_one_and_keeps_beta(family):
    build, _, late_norms, _ = FAMILIES[family]
    model = _pretrained_style(build(), seed=1)
    before = _snapshot(model)
    report = apply_gamma_strategy(model, {"strategy": "one_late"})
    assert report.names == late_norms
    assert all(row["new_beta"] is None for row in report.rows)
    assert _changed(before, model) == {f"{n}.weight" for n in late_norms}
    state = model.state_dict()
    for n in late_norms:
        assert torch.equal(state[f"{n}.weight"], torch.ones_like(state[f"{n}.weight"]))


@pytest.mark.parametrize("family", [f for f, spec in FAMILIES.items() if spec[3] is not None])
def test_zero_all_makes_every_block_return_act_of_shortcut(family):
    build, n_blocks, _, expected_fn = FAMILIES[family]
    model = _pretrained_style(build(), seed=2).eval()
    blocks = [r.module for r in find_residual_norms(model)]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def run() -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        inputs: dict[int, torch.Tensor] = {}
        hooks = []
        for i, blk in enumerate(blocks):
            hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].clone())))
            hooks.append(
                blk.register_forward_hook(lambda m, a, out, i=i: pairs.append((out.clone(), expected_fn(m, inputs[i]))))
            )
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return pairs

    # Control: before the strategy, the residual branches contribute (so the check can fail).
    assert any(not torch.allclose(out, exp, atol=1e-5) for out, exp in run())
    report = apply_gamma_strategy(model, {"strategy": "zero_all"})
    assert len(report) == n_blocks
    pairs = run()
    assert len(pairs) == n_blocks
    for out, exp in pairs:
        torch.testing.assert_close(out, exp, atol=1e-6, rtol=0)
