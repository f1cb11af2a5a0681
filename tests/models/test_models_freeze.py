"""Freezing: frozen parameters and BN statistics do not move during training; clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtricks.models import create_model, freeze_model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_step(model: nn.Module, in_chans: int = 1) -> None:
    model.train()
    # every parameter, frozen or not: SGD with weight decay must still leave frozen ones alone
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    torch.manual_seed(0)
    x, y = torch.randn(4, in_chans, 32, 32), torch.tensor([0, 1, 0, 1])
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_frozen_stages_do_not_change_after_a_step():
    from torchvision.ops.misc import FrozenBatchNorm2d  # what timm.utils.freeze converts BN into

    model = create_model("resnet18", num_classes=2, in_chans=1)
    frozen = freeze_model(model, ["stem", 1])
    assert frozen[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert all(n.startswith(("conv1.", "bn1.", "layer1.")) for n in frozen)
    assert "layer1.1.bn2.weight" in frozen and "layer2.0.conv1.weight" not in frozen
    assert isinstance(model.bn1, FrozenBatchNorm2d) and isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.layer2[0].bn1, nn.BatchNorm2d)
    before = _snapshot(model)
    _train_step(model)
    after = model.state_dict()
    frozen_keys = [k for k in before if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert len(frozen_keys) > len(frozen)  # running stats included
    for key in frozen_keys:  # weights, BN affine and running statistics
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["layer2.0.conv1.weight"], after["layer2.0.conv1.weight"])
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_linear_probe_trains_only_the_head():
    model = create_model("efficientnet_lite0", weights="imagenet", num_classes=2, in_chans=1)
    frozen = freeze_model(model, "all_but_head")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    assert "conv_head.weight" in frozen and "blocks.6.0.bn3.weight" in frozen
    before = _snapshot(model)
    _train_step(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_patterns_and_none():
    model = create_model("resnet18", num_classes=2)
    assert freeze_model(model, None) == [] and freeze_model(model, "none") == []
    frozen = freeze_model(model, ["layer4.*.conv*"])
    assert frozen == [f"layer4.{b}.conv{c}.weight" for b in (0, 1) for c in (1, 2)]
    assert model.layer4[0].bn1.weight.requires_grad


def test_freeze_errors_name_the_problem():
    model = create_model("resnet18", num_classes=2)
    with pytest.raises(ValueError, match=r"stage 9 out of range: .*0 \(stem\) to 5 \(head\)"):
        freeze_model(model, [9])
    with pytest.raises(ValueError, match=r"pattern 'layr1\*' matches no module; .*layer1"):
        freeze_model(model, ["layr1*"])
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        freeze_model(model, ["stem", "none"])
    with pytest.raises(ValueError, match="model.freeze must be"):
        freeze_model(model, {"stem": True})
