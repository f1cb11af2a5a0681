"""Named BN-gamma strategies (recipe section tricks.bn_gamma), the recipes and gamma_preview."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from medtricks.gamma.bn import STRATEGIES, GammaNoEffectWarning, apply_gamma_strategy, gamma_preview


timm = pytest.importorskip("timm")
REPO = Path(__file__).resolve().parents[2]
LATE = ["layer4.0.bn2", "layer4.1.bn2"]
REST = [f"layer{s}.{b}.bn2" for s in range(1, 4) for b in range(2)]


@pytest.fixture(scope="module")
def pretrained_resnet18(randomize_norms):
    """``pretrained_resnet18()``: resnet18 with 'loaded' norms: γ in [0.5, 1.5], β != 0 (timm zero-inits bn2
    otherwise)."""
    return lambda: randomize_norms(timm.create_model("resnet18", pretrained=False, num_classes=2))


def _norm(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _full(**kw):
    """The section as the recipe schema dumps it: every key present."""
    base = {
        "strategy": "none",
        "stages": None,
        "blocks": None,
        "last_n_blocks": None,
        "names": None,
        "which": "last",
        "beta": None,
        "rules": [],
    }
    base.update(kw)
    return base


def test_none_is_empty_and_silent(pretrained_resnet18):
    model = pretrained_resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = apply_gamma_strategy(model, _full())
        assert len(report) == 0 and report.summary() == "none: no layers changed"
        assert len(apply_gamma_strategy(model, {})) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_zero_all_sets_gamma_and_beta_to_zero_everywhere(pretrained_resnet18):
    model = pretrained_resnet18()
    report = apply_gamma_strategy(model, _full(strategy="zero_all"))
    assert report.names == REST + LATE
    for name in report.names:
        assert torch.count_nonzero(_norm(model, name).weight) == 0
        assert torch.count_nonzero(_norm(model, name).bias) == 0
    assert report.summary().startswith("zero_all: 8 layers; gamma=0 beta=0 x8 (layer1.0.bn2, layer1.1.bn2, ...)")


def test_zero_late_beta_keep_and_explicit_beta(pretrained_resnet18):
    model = pretrained_resnet18()
    old_bias = _norm(model, LATE[0]).bias.clone()
    report = apply_gamma_strategy(model, _full(strategy="zero_late", beta="keep"))
    assert report.names == LATE and report.rows[0]["new_beta"] is None
    assert torch.equal(_norm(model, LATE[0]).bias, old_bias)
    apply_gamma_strategy(model, _full(strategy="zero_late", beta=0.5))
    assert torch.all(_norm(model, LATE[0]).bias == 0.5)


def test_late_selectors_override_the_default_last_stage(pretrained_resnet18):
    assert apply_gamma_strategy(pretrained_resnet18(), _full(strategy="zero_late", stages=[-2])).names == [
        "layer3.0.bn2",
        "layer3.1.bn2",
    ]
    assert apply_gamma_strategy(pretrained_resnet18(), _full(strategy="one_late", last_n_blocks=3)).names == [
        "layer3.1.bn2",
        "layer4.0.bn2",
        "layer4.1.bn2",
    ]
    # blocks alone keeps the default last stage and narrows it
    assert apply_gamma_strategy(pretrained_resnet18(), _full(strategy="zero_late", blocks=[-1])).names == [
        "layer4.1.bn2"
    ]
    assert apply_gamma_strategy(pretrained_resnet18(), _full(strategy="zero_late", names=["layer2.0.*"])).names == [
        "layer2.0.bn1",
        "layer2.0.bn2",
        "layer2.0.downsample.1",
    ]


def test_one_late_sets_exactly_one_from_pretrained_values(pretrained_resnet18):
    model = pretrained_resnet18()
    assert all(abs(r - 1.0) > 1e-3 for r in [float(_norm(model, n).weight.detach().mean()) for n in LATE])
    old_bias = [_norm(model, n).bias.clone() for n in LATE]
    report = apply_gamma_strategy(model, _full(strategy="one_late", which="all"))
    assert report.names == ["layer4.0.bn1", "layer4.0.bn2", "layer4.1.bn1", "layer4.1.bn2"]
    for name in report.names:
        assert torch.equal(_norm(model, name).weight, torch.ones_like(_norm(model, name).weight))
    assert all(torch.equal(_norm(model, n).bias, b) for n, b in zip(LATE, old_bias))


def test_zero_late_one_rest(pretrained_resnet18):
    model = pretrained_resnet18()
    old_rest_bias = {n: _norm(model, n).bias.clone() for n in REST}
    report = apply_gamma_strategy(model, _full(strategy="zero_late_one_rest"))
    assert report.names == REST + LATE  # model order
    for n in REST:
        assert torch.all(_norm(model, n).weight == 1) and torch.equal(_norm(model, n).bias, old_rest_bias[n])
    for n in LATE:
        assert torch.all(_norm(model, n).weight == 0) and torch.all(_norm(model, n).bias == 0)
    assert report.summary() == (
        "zero_late_one_rest: 8 layers; gamma=1 x6 (layer1.0.bn2, layer1.1.bn2, ...); "
        "gamma=0 beta=0 x2 (layer4.0.bn2, layer4.1.bn2)"
    )


def test_rules_are_applied_in_order_and_later_rules_win(pretrained_resnet18):
    model = pretrained_resnet18()
    old = {n: float(_norm(model, n).weight.detach().mean()) for n in LATE}
    rules = [
        {"stages": [-1], "value": 0.0},
        {"last_n_blocks": 1, "value": 1.0},
        {"stages": [-2], "value": 0.5, "beta": "keep"},
    ]
    report = apply_gamma_strategy(model, _full(strategy="rules", rules=rules))
    assert torch.all(_norm(model, "layer4.0.bn2").weight == 0) and torch.all(_norm(model, "layer4.0.bn2").bias == 0)
    # rule 1 overrides rule 0 for layer4.1; β stays 0 from rule 0 (rule 1 keeps it)
    assert torch.all(_norm(model, "layer4.1.bn2").weight == 1) and torch.all(_norm(model, "layer4.1.bn2").bias == 0)
    assert torch.all(_norm(model, "layer3.0.bn2").weight == 0.5)
    rows = {row["name"]: row for row in report.rows}
    assert list(rows) == ["layer4.0.bn2", "layer4.1.bn2", "layer3.0.bn2", "layer3.1.bn2"]
    assert rows["layer4.1.bn2"]["new_gamma"] == 1.0 and rows["layer4.1.bn2"]["new_beta"] == 0.0
    assert rows["layer4.1.bn2"]["old_gamma_mean"] == pytest.approx(old["layer4.1.bn2"])  # net effect
    assert rows["layer3.0.bn2"]["new_beta"] is None
    # the reverse order gives the other value: order matters
    model2 = pretrained_resnet18()
    apply_gamma_strategy(model2, {"rules": list(reversed(rules[:2]))})
    assert torch.all(_norm(model2, "layer4.1.bn2").weight == 0)


def test_rule_that_matches_nothing_warns_with_its_index(pretrained_resnet18):
    with pytest.warns(GammaNoEffectWarning, match=r"rules\[1\]"):
        apply_gamma_strategy(pretrained_resnet18(), {"rules": [{"value": 0.0}, {"names": ["nope*"], "value": 1.0}]})


@pytest.mark.parametrize(
    "config, message",
    [
        ({"strategy": "zero_lat"}, "tricks.bn_gamma.strategy = 'zero_lat': expected one of none, zero_all"),
        ({"strategy": "zero_late", "stagez": [-1]}, r"unknown keys \['stagez'\]"),
        ({"strategy": "zero_all", "stages": [-1]}, "'zero_all' acts on every residual block.*stages"),
        ({"strategy": "none", "stages": [-1]}, "strategy 'none' changes nothing"),
        ({"strategy": "rules"}, "needs a non-empty 'rules' list"),
        ({"strategy": "rules", "stages": [1], "rules": [{"value": 0.0}]}, "inside each rule"),
        ({"strategy": "zero_late", "rules": [{"value": 0.0}]}, "use strategy: rules"),
        ({"rules": [{"stages": [-1]}]}, r"rules\[0\]\.value is missing"),
        ({"rules": [{"value": 0.0, "stage": [-1]}]}, r"rules\[0\]: unknown keys \['stage'\]"),
        ({"rules": [{"value": 0.0, "stages": [9]}]}, r"tricks.bn_gamma.rules\[0\].stages = \[9\].*out of range"),
        ({"strategy": "zero_late", "beta": "off"}, "tricks.bn_gamma.beta = 'off'"),
        ({"strategy": "zero_late", "which": "both"}, "tricks.bn_gamma.which = 'both'"),
    ],
)
def test_bad_config_is_named(pretrained_resnet18, config, message):
    with pytest.raises(ValueError, match=message):
        apply_gamma_strategy(pretrained_resnet18(), config)


def test_strategies_constant_matches_the_recipe_schema():
    recipe = pytest.importorskip("medtricks.recipe")
    schema = recipe.BnGammaConfig.model_fields["strategy"].annotation
    assert set(schema.__args__) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", ["zero_all", "zero_late", "one_late", "zero_late_one_rest", "rules"])
def test_recipe_files_run_through_the_schema(pretrained_resnet18, strategy):
    path = REPO / "recipes" / f"bn_gamma_{strategy}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["base"] == "bag_of_tricks.yaml" and data["experiment"]["name"] == f"bn_gamma_{strategy}"
    section = data["tricks"]["bn_gamma"]
    assert section["strategy"] == strategy
    recipe = pytest.importorskip("medtricks.recipe")
    section = recipe.BnGammaConfig(**section).model_dump()
    report = apply_gamma_strategy(pretrained_resnet18(), section)
    assert report.strategy == strategy and len(report) > 0


def test_preview_lite0_shows_stages_and_the_late_residual_stage():
    text = gamma_preview("tf_efficientnet_lite0", strategy="zero_late")
    assert "stage 6  blocks.6: 0/1 blocks residual  (no skip: not residual)" in text
    assert "stage 5  blocks.5: 3/4 blocks residual   <- changed" in text
    assert "Would change 3 norm layers:" in text and "blocks.5.3.bn3" in text and "blocks.6.0" not in text
    assert "summary: zero_late: 3 layers; gamma=0 beta=0 x3" in text


def test_preview_reports_no_effect_in_the_text_and_options():
    text = gamma_preview("resnet18", strategy="one_late", stages=[0], which="all")
    assert "layer1.0.bn1" in text and "layer1.1.bn2" in text and "layer4" not in text.split("Would change")[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = gamma_preview("tf_efficientnet_lite0", strategy="zero_late", stages=[6])
    assert "Would change 0 norm layers" in text and "warning: " in text and "matched no layer" in text
    with pytest.raises(ValueError, match="needs a recipe"):
        gamma_preview("resnet18", strategy="rules")


def test_preview_falls_back_to_timm_without_medtricks_models(monkeypatch):
    monkeypatch.setitem(sys.modules, "medtricks.models", None)  # import now fails
    text = gamma_preview("resnet18", strategy="zero_late")
    assert "built with timm.create_model (medtricks.models unavailable)" in text and "layer4.1.bn2" in text
    with pytest.raises(RuntimeError, match="weights='imagenet' needs medtricks.models"):
        gamma_preview("resnet18", weights="imagenet")
