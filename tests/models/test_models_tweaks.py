"""Zero-gated SE/CBAM insertion: the pretrained function is unchanged at start, gates still learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtricks.models import add_attention, create_model


@pytest.mark.parametrize("kind", ["se", "cbam"])
def test_inserted_attention_keeps_outputs_and_learns(kind):
    # zero_init_last=False: timm's random init zeroes each block's last BN gamma, which would
    # zero the attention input (pretrained weights never do that)
    model = create_model("resnet18", num_classes=2, in_chans=1, zero_init_last=False).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        before = model(x)
    rows = add_attention(model, kind=kind)
    assert [r["module"] for r in rows] == ["layer3.0.se", "layer3.1.se", "layer4.0.se", "layer4.1.se"]
    assert [r["channels"] for r in rows] == [256, 256, 512, 512] and {r["stage"] for r in rows} == {3, 4}
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    model.train()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    last = model.layer4[1].se.fc2 if kind == "se" else model.layer4[1].se.channel.fc2
    assert last.weight.grad.abs().sum() > 0  # the zero-initialised logit layer gets gradient
    if kind == "cbam":
        assert model.layer4[1].se.spatial.conv.weight.grad.abs().sum() > 0
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.layer4[1].se.modules())


def test_attention_in_efficientnet_lite_and_chosen_stages():
    model = create_model(
        "efficientnet_lite0", weights="imagenet", num_classes=2, in_chans=1, attention="se", attention_stages=[6, 7]
    ).eval()
    assert model.medtricks_info["attention_blocks"][0] == "blocks.5.0.se"
    assert len(model.medtricks_info["attention_blocks"]) == 5  # 4 blocks in stage 6, 1 in stage 7
    reference = create_model("efficientnet_lite0", weights="imagenet", num_classes=2, in_chans=1).eval()
    reference.classifier.load_state_dict(model.classifier.state_dict())
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)


def test_checkpoint_with_attention_round_trips(tmp_path):
    model = create_model("resnet18", num_classes=2, attention="cbam")
    with torch.no_grad():
        model.layer4[0].se.channel.fc2.weight.normal_()
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    again = create_model("resnet18", weights=f"file:{path}", num_classes=2, attention="cbam")
    assert torch.equal(again.layer4[0].se.channel.fc2.weight, model.layer4[0].se.channel.fc2.weight)
    assert again.medtricks_info["head"] == "pretrained"


def test_attention_errors():
    with pytest.raises(ValueError, match="already has attention"):
        create_model("seresnet18", attention="se")
    with pytest.raises(ValueError, match="attention kind must be one of se, cbam"):
        create_model("resnet18", attention="eca")
    with pytest.raises(ValueError, match=r"attention_stages \[0\] hold no blocks; .*\[1, 2, 3, 4\]"):
        create_model("resnet18", attention="se", attention_stages=[0])
    with pytest.raises(ValueError, match="not MONAI nets"):
        create_model("monai:resnet18", attention="se")
    with pytest.raises(ValueError, match="attention_stages is set but attention is None"):
        create_model("resnet18", attention_stages=[3])
