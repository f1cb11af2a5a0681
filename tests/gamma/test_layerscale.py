"""LayerScale-gamma strategies (issue 20): exactly the selected blocks change, the report, the
no-effect warning, the error for a ViT without LayerScale, insertion and the recipe trick."""

from pathlib import Path

import pytest
import timm
import torch

from medtricks.errors import ConfigError
from medtricks.gamma.bn import GammaNoEffectWarning
from medtricks.gamma.layerscale import (
    apply_layerscale_gamma,
    apply_layerscale_strategy,
    check_layerscale_config,
    find_layerscale,
    insert_layerscale_for_state,
)

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def tiny_vit(init_values=1e-5, depth=4):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=depth,
        init_values=init_values,
        num_classes=2,
    )


def gammas(model):
    return {s.name: s.gamma.detach().clone() for s in find_layerscale(model) if s.gamma is not None}


def changed(before, model):
    after = gammas(model)
    return sorted(n for n in after if n not in before or not torch.equal(before[n], after[n]))


def test_sites_of_a_vit_in_model_order():
    sites = find_layerscale(tiny_vit())
    assert [s.name for s in sites][:3] == ["blocks.0.ls1", "blocks.0.ls2", "blocks.1.ls1"]
    assert [s.block for s in sites] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {s.branch for s in sites[::2]} == {"attn"} and {s.branch for s in sites[1::2]} == {"mlp"}


def test_apply_changes_exactly_the_selected_blocks_and_reports_them():
    model = tiny_vit()
    before = gammas(model)
    report = apply_layerscale_gamma(model, 0.0, last_n_blocks=2)
    assert changed(before, model) == ["blocks.2.ls1", "blocks.2.ls2", "blocks.3.ls1", "blocks.3.ls2"]
    assert report.names == changed(before, model)
    row = report.rows[0]
    assert row["old_gamma_mean"] == pytest.approx(1e-5) and row["new_gamma"] == 0.0 and row["block"] == 2
    assert float(model.blocks[3].ls1.gamma.detach().abs().sum()) == 0.0

    model = tiny_vit()
    before = gammas(model)
    apply_layerscale_gamma(model, 1.0, blocks=[0, -1], branch="mlp")
    assert changed(before, model) == ["blocks.0.ls2", "blocks.3.ls2"]

    model = tiny_vit()
    before = gammas(model)
    apply_layerscale_gamma(model, 0.5, names=["blocks.1.ls*"])
    assert changed(before, model) == ["blocks.1.ls1", "blocks.1.ls2"]
    assert "old_beta_mean" not in str(report)  # LayerScale has no beta: the table leaves it out


def test_zero_gamma_makes_the_block_the_identity():
    model = tiny_vit().eval()
    apply_layerscale_gamma(model, 0.0, blocks=[-1])
    x = torch.randn(2, 5, 192)
    assert torch.equal(model.blocks[3](x), x)


def test_named_strategies_late_is_the_last_quarter():
    model = tiny_vit(depth=8)
    report = apply_layerscale_strategy(model, {"strategy": "zero_late"})
    assert report.names == ["blocks.6.ls1", "blocks.6.ls2", "blocks.7.ls1", "blocks.7.ls2"]
    model = tiny_vit(depth=8)
    report = apply_layerscale_strategy(model, {"strategy": "zero_late_one_rest", "last_n_blocks": 1})
    values = {row["name"]: row["new_gamma"] for row in report}
    assert len(values) == 16 and values["blocks.7.ls2"] == 0.0 and values["blocks.6.ls2"] == 1.0
    assert torch.all(model.blocks[0].ls1.gamma == 1.0)
    model = tiny_vit()
    report = apply_layerscale_strategy(
        model, {"rules": [{"value": 0.0, "blocks": [2, 3]}, {"value": 0.25, "blocks": [3], "branch": "attn"}]}
    )
    values = {row["name"]: row["new_gamma"] for row in report}
    assert values == {"blocks.2.ls1": 0.0, "blocks.2.ls2": 0.0, "blocks.3.ls1": 0.25, "blocks.3.ls2": 0.0}
    assert len(apply_layerscale_strategy(tiny_vit(), {"strategy": "none"})) == 0


def test_no_effect_warning_and_bad_arguments():
    model = tiny_vit()
    before = gammas(model)
    with pytest.warns(GammaNoEffectWarning, match="matches no LayerScale"):
        apply_layerscale_gamma(model, 0.0, names=["nothing.*"])
    assert changed(before, model) == []
    with pytest.raises(ValueError, match="blocks = \\[7\\].*out of range"):
        apply_layerscale_gamma(model, 0.0, blocks=7)
    with pytest.raises(ValueError, match="branch"):
        apply_layerscale_gamma(model, 0.0, branch="ffn")
    with pytest.raises(ValueError, match="unknown keys \\['stages'\\]"):
        check_layerscale_config({"strategy": "zero_late", "stages": [-1]})
    with pytest.raises(ValueError, match="zero_all"):
        check_layerscale_config({"strategy": "zero_all", "last_n_blocks": 2})


def test_a_vit_without_layerscale_is_an_error_naming_it_unless_insert():
    model = tiny_vit(init_values=None)
    with pytest.raises(ConfigError, match="vit_tiny_patch16_224.*has no LayerScale.*init_values"):
        apply_layerscale_gamma(model, 0.0, last_n_blocks=1)
    with pytest.raises(ConfigError, match="resnet18.*no transformer block"):
        apply_layerscale_gamma(timm.create_model("resnet18", pretrained=False), 0.0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out_before = model.eval()(x)
    report = apply_layerscale_strategy(model, {"strategy": "one_late", "insert": True})
    assert report.names == ["blocks.3.ls1", "blocks.3.ls2"] and report.rows[0]["old_gamma_mean"] is None
    assert isinstance(model.blocks[3].ls1, timm.layers.LayerScale) and isinstance(
        model.blocks[2].ls1, torch.nn.Identity
    )
    with torch.no_grad():
        assert torch.allclose(model(x), out_before, atol=1e-6)  # gamma=1: same function, now learnable
    # a state dict with inserted LayerScale loads into a fresh model after insert_layerscale_for_state
    fresh = tiny_vit(init_values=None)
    assert insert_layerscale_for_state(fresh, model.state_dict()) == ["blocks.3.ls1", "blocks.3.ls2"]
    fresh.load_state_dict(model.state_dict())


def test_cait_gamma_parameters():
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, depth=3, num_classes=2)
    names = [s.name for s in find_layerscale(model)]
    assert names[0] == "blocks.0.gamma_1" and names[-1] == "blocks_token_only.1.gamma_2"
    report = apply_layerscale_gamma(model, 0.0, blocks=[2])
    assert report.names == ["blocks.2.gamma_1", "blocks.2.gamma_2"]
    assert float(model.blocks[2].gamma_1.detach().abs().sum()) == 0.0


def test_recipe_trick_section(tmp_path):
    from medtricks.recipe import load_recipe
    from medtricks.tricks.registry import ablation_names

    recipe = load_recipe(
        QUICKSTART,
        overrides=[
            "model.name=vit_tiny_patch16_224",
            "tricks.layerscale_gamma.strategy=zero_late",
            "tricks.layerscale_gamma.last_n_blocks=2",
        ],
    )
    assert "layerscale_gamma=zero_late" in recipe.tricks_on()
    assert ablation_names()["layerscale_gamma"].key == "tricks.layerscale_gamma.strategy"
    with pytest.raises(ValueError, match="layerscale_gamma"):
        load_recipe(
            QUICKSTART,
            overrides=["tricks.layerscale_gamma.strategy=zero_all", "tricks.layerscale_gamma.last_n_blocks=2"],
        )
    from medtricks.tricks.base import TrickContext
    from medtricks.tricks.layerscale_gamma import LayerScaleGamma
    from medtricks.rundir import RunDir

    trick = LayerScaleGamma(recipe, TrickContext(recipe=recipe, classes=["a", "b"]))
    model = tiny_vit()
    trick.on_model(model)
    assert trick.log_params()["layerscale_gamma"].startswith("zero_late: 4 layers")
    assert "blocks.3.ls2" in trick.summary()
    ((path, folder),) = trick.artifacts(RunDir(tmp_path))
    assert path.name == "layerscale_gamma_report.csv" and folder == "tricks" and path.is_file()
