"""The backbone recipes load, validate and build the model their `model:` section describes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medtricks.models import create_model, freeze_model, get_data_config
from medtricks.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize(
    "recipe, name, weights",
    [
        ("resnet50.yaml", "resnet50", "imagenet"),
        ("resnet50d.yaml", "resnet50d", "imagenet"),
        ("seresnet50.yaml", "seresnet50", "imagenet"),
        ("efficientnet_lite0.yaml", "efficientnet_lite0", "imagenet"),
    ],
)
def test_backbone_recipes_build(recipe, name, weights):
    section = load_recipe(RECIPES / recipe).model
    assert (section.name, section.weights, section.in_chans) == (name, weights, 1)
    # Hub weights need a download (tested in test_models_weights); lite0's ship with a package.
    offline_ok = section.name == "efficientnet_lite0"
    model = create_model(
        section.name,
        weights=section.weights if offline_ok else "none",
        num_classes=2,
        in_chans=section.in_chans,
        drop_rate=section.drop_rate,
        **section.kwargs,
    )
    assert freeze_model(model, section.freeze) == []
    assert get_data_config(model)["input_size"][0] == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2)


def test_recipe_overrides_reach_the_factory():
    section = load_recipe(
        RECIPES / "resnet50.yaml",
        overrides=[
            "model.name=resnet18",
            "model.weights=none",
            "model.kwargs.attention=cbam",
            "model.freeze=all_but_head",
        ],
    ).model
    model = create_model(section.name, weights=section.weights, in_chans=section.in_chans, **section.kwargs)
    assert model.medtricks_info["attention_blocks"][-1] == "layer4.1.se"
    frozen = freeze_model(model, section.freeze)
    assert "layer4.1.se.channel.fc1.weight" in frozen and "fc.weight" not in frozen
