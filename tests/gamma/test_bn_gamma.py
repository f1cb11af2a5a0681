"""apply_bn_gamma selection rules, the registry, and GammaReport."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from torch import nn

from medtricks.gamma.bn import (
    GammaNoEffectWarning,
    GammaReport,
    apply_bn_gamma,
    find_residual_norms,
    register_residual_block,
    unregister_residual_block,
)


timm = pytest.importorskip("timm")


def resnet18() -> nn.Module:
    return timm.create_model("resnet18", pretrained=False, num_classes=2)


def lite0() -> nn.Module:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2)


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- selection
def test_no_selector_acts_on_every_residual_block():
    report = apply_bn_gamma(resnet18(), 0.0)
    assert report.names == [f"layer{s}.{b}.bn2" for s in range(1, 5) for b in range(2)]
    assert [(row["stage"], row["block"]) for row in report.rows] == [(s, b) for s in range(4) for b in range(2)]


@pytest.mark.parametrize(
    "stages, expected",
    [
        ([0], ["layer1.0.bn2", "layer1.1.bn2"]),
        (-1, ["layer4.0.bn2", "layer4.1.bn2"]),
        ([-2, 3], ["layer3.0.bn2", "layer3.1.bn2", "layer4.0.bn2", "layer4.1.bn2"]),
        ([1, -3], ["layer2.0.bn2", "layer2.1.bn2"]),  # the same stage twice is selected once
    ],
)
def test_stage_selection_positive_and_negative(stages, expected):
    assert apply_bn_gamma(resnet18(), 0.0, stages=stages).names == expected


@pytest.mark.parametrize("stages", [[4], [-5]])
def test_stage_out_of_range_is_a_clear_error(stages):
    model = resnet18()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"stages = \[-?\d\].*out of range"):
        apply_bn_gamma(model, 0.0, stages=stages)
    assert not _changed(model, before)


def test_block_selection_within_stages():
    assert apply_bn_gamma(resnet18(), 1.0, blocks=[0]).names == [f"layer{s}.0.bn2" for s in range(1, 5)]
    assert apply_bn_gamma(resnet18(), 1.0, stages=[1, 2], blocks=-1).names == ["layer2.1.bn2", "layer3.1.bn2"]
    with pytest.raises(ValueError, match=r"blocks = \[2\]"):
        apply_bn_gamma(resnet18(), 1.0, blocks=[2])


def test_last_n_blocks():
    assert apply_bn_gamma(resnet18(), 0.0, last_n_blocks=3).names == ["layer3.1.bn2", "layer4.0.bn2", "layer4.1.bn2"]
    # selectors intersect: the last three blocks that are also first in their stage
    assert apply_bn_gamma(resnet18(), 0.0, last_n_blocks=3, blocks=[0]).names == ["layer4.0.bn2"]
    with pytest.raises(ValueError, match="last_n_blocks = 9.*at most 8"):
        apply_bn_gamma(resnet18(), 0.0, last_n_blocks=9)
    with pytest.raises(ValueError, match="last_n_blocks = 0"):
        apply_bn_gamma(resnet18(), 0.0, last_n_blocks=0)


def test_name_patterns_alone_and_combined():
    assert apply_bn_gamma(resnet18(), 0.0, names=["layer4.*.bn2"]).names == ["layer4.0.bn2", "layer4.1.bn2"]
    # alone, a pattern may pick any norm, even one on the shortcut
    assert apply_bn_gamma(resnet18(), 1.0, names="layer4.0.downsample.*").names == ["layer4.0.downsample.1"]
    # combined, it filters what the other selectors picked (which="all": bn1 and bn2 of layer4)
    assert apply_bn_gamma(resnet18(), 1.0, stages=[-1], which="all", names=["*.bn1"]).names == [
        "layer4.0.bn1",
        "layer4.1.bn1",
    ]


def test_name_pattern_on_a_model_without_residual_blocks():
    # A plain (DenseNet-like) stack: no residual block, but names= may still select its BNs.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    report = apply_bn_gamma(model, 0.0, names=["4"])
    assert report.names == ["4"] and report.rows[0]["stage"] is None
    assert torch.count_nonzero(model[4].weight) == 0 and torch.count_nonzero(model[1].weight) == 4


def test_which_all_touches_every_branch_norm_but_not_the_shortcut(randomize_norms):
    model = randomize_norms(timm.create_model("resnet26d", pretrained=False))  # timm zero-inits bn3
    before = _snapshot(model)
    report = apply_bn_gamma(model, 0.0, stages=[-1], which="all")
    assert report.names == [f"layer4.{b}.bn{i}" for b in range(2) for i in (1, 2, 3)]
    assert _changed(model, before) == {f"{n}.{p}" for n in report.names for p in ("weight", "bias")}  # β follows γ=0
    assert "layer4.0.downsample.2.weight" in before  # ResNet-D shortcut BN exists and was left alone


def test_beta_follows_gamma_zero_like_the_strategies_unless_kept_or_given(randomize_norms):
    model = randomize_norms(resnet18())
    before = _snapshot(model)
    apply_bn_gamma(model, 0.0, stages=[-1])  # one rule with apply_gamma_strategy: β=0 where γ=0
    late = {"layer4.0.bn2", "layer4.1.bn2"}
    assert _changed(model, before) == {f"{n}.{p}" for n in late for p in ("weight", "bias")}
    assert torch.all(model.layer4[0].bn2.bias == 0)
    model = randomize_norms(resnet18())
    before = _snapshot(model)
    apply_bn_gamma(model, 0.0, stages=[-1], beta="keep")
    assert _changed(model, before) == {f"{n}.weight" for n in late}
    apply_bn_gamma(model, 1.0, stages=[-1])  # γ=1 keeps β by default
    assert torch.equal(model.layer4[0].bn2.bias, before["layer4.0.bn2.bias"])
    report = apply_bn_gamma(model, 0.0, stages=[-1], beta=0.25)
    assert torch.all(model.layer4[0].bn2.bias == 0.25)
    assert [row["new_beta"] for row in report.rows] == [0.25, 0.25]


def test_idempotent(randomize_norms):
    model = randomize_norms(resnet18())
    apply_bn_gamma(model, 0.0, stages=[-1], beta=0.0)
    once = _snapshot(model)
    report = apply_bn_gamma(model, 0.0, stages=[-1], beta=0.0)
    assert not _changed(model, once)
    assert all(row["old_gamma_mean"] == 0.0 and row["old_beta_mean"] == 0.0 for row in report.rows)


def test_negative_stage_counts_over_residual_stages_only():
    # EfficientNet-Lite0: blocks.6 has no skip, so the last *residual* stage is blocks.5.
    assert apply_bn_gamma(lite0(), 0.0, stages=[-1]).names == ["blocks.5.1.bn3", "blocks.5.2.bn3", "blocks.5.3.bn3"]
    assert apply_bn_gamma(lite0(), 0.0, stages=[1], blocks=[-1]).names == ["blocks.1.1.bn3"]
    # block 0 of every stage has no skip: asking for it selects nothing -> warning
    with pytest.warns(GammaNoEffectWarning, match="matched no layer"):
        assert len(apply_bn_gamma(lite0(), 0.0, blocks=[0])) == 0


def test_no_effect_warning_when_nothing_matches():
    model = lite0()
    before = _snapshot(model)
    with pytest.warns(GammaNoEffectWarning, match=r"stages=\[6\].*matched no layer.*blocks\.6"):
        report = apply_bn_gamma(model, 0.0, stages=[6])
    assert len(report) == 0 and not _changed(model, before)
    with pytest.warns(GammaNoEffectWarning) as caught:
        apply_bn_gamma(resnet18(), 0.0, names=["layer9.*"])
    assert "names pattern 'layer9.*' matches no norm layer of the model" in str(caught[0].message)
    assert "selection (names=['layer9.*']) matched no layer" in str(caught[1].message)
    assert caught[0].filename == __file__  # points at the caller
    with pytest.warns(GammaNoEffectWarning, match="no residual block"):
        apply_bn_gamma(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), 0.0)


def test_a_selection_that_matches_gives_no_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = apply_bn_gamma(resnet18(), 0.0, stages=[-1])
    assert not [w for w in caught if issubclass(w.category, GammaNoEffectWarning)]
    assert len(report.rows) == 2  # resnet18's layer4 has two blocks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"value": "0"}, "value = '0': expected a finite number"),
        ({"value": float("nan")}, "value = nan"),
        ({"value": True}, "value = True"),
        ({"value": 0.0, "which": "first"}, "which = 'first': expected 'last'.*or 'all'"),
        ({"value": 0.0, "stages": [1.5]}, r"stages = \[1.5\]: expected an integer"),
        ({"value": 0.0, "stages": []}, r"stages = \[\]"),
        ({"value": 0.0, "names": [""]}, "names"),
        ({"value": 0.0, "beta": "zero"}, "beta = 'zero': expected a number, 'keep' or null"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_bn_gamma(resnet18(), **kwargs)


def test_non_affine_norm_is_an_error_and_nothing_changes():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, affine=False))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'1' .*no affine weight"):
        apply_bn_gamma(model, 0.0, names=["*"])
    assert not _changed(model, before)


def test_wrapped_model_keeps_stage_numbers():
    wrapped = nn.Sequential(nn.Identity(), nn.Sequential(*list(resnet18().children())[:-2]))
    assert apply_bn_gamma(wrapped, 0.0, stages=[3]).names == ["1.7.0.bn2", "1.7.1.bn2"]


# ---------------------------------------------------------------- registry
class TinyResBlock(nn.Module):
    def __init__(self, ch: int, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.conv1, self.n1 = nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch)
        self.conv2, self.n2 = nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(2, ch)

    def forward(self, x):
        y = self.n2(self.conv2(torch.relu(self.n1(self.conv1(x)))))
        return x + y if self.skip else y


def _tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Sequential(TinyResBlock(4), TinyResBlock(4)),
        nn.Sequential(TinyResBlock(4, skip=False), TinyResBlock(4)),
    )


def test_registry_adds_a_block_type_with_has_skip():
    assert find_residual_norms(_tiny_net()) == []
    register_residual_block(TinyResBlock, "n2", has_skip=lambda b: b.skip)
    try:
        found = find_residual_norms(_tiny_net())
        assert [(r.name, r.stage, r.block, r.last_norm_name) for r in found] == [
            ("1.0", 0, 0, "1.0.n2"),
            ("1.1", 0, 1, "1.1.n2"),
            ("2.1", 1, 1, "2.1.n2"),
        ]
        assert list(found[0].norms) == ["1.0.n1", "1.0.n2"]
        model = _tiny_net()
        x = torch.randn(2, 4, 8, 8)
        apply_bn_gamma(model, 0.0, stages=[-1], beta=0.0)
        assert torch.equal(model[2][1](x), x)  # GroupNorm γ=β=0: the block is the identity
        # a callable last_norm replaces the earlier entry
        register_residual_block(TinyResBlock, lambda b: b.n1)
        assert [r.last_norm_name for r in find_residual_norms(_tiny_net())][-1] == "2.1.n1"
    finally:
        unregister_residual_block(TinyResBlock)
    assert find_residual_norms(_tiny_net()) == []


def test_registry_errors():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_residual_block(int, "bn")
    with pytest.raises(TypeError, match="last_norm"):
        register_residual_block(TinyResBlock, 3)
    with pytest.raises(KeyError):
        unregister_residual_block(TinyResBlock)
    register_residual_block(TinyResBlock, "missing")
    try:
        with pytest.raises(ValueError, match=r"block '1.0' \(TinyResBlock\).*'missing' does not exist"):
            find_residual_norms(_tiny_net())
        register_residual_block(TinyResBlock, "conv1")
        with pytest.raises(ValueError, match="is a Conv2d, not a norm layer"):
            find_residual_norms(_tiny_net())
    finally:
        unregister_residual_block(TinyResBlock)


def test_user_registration_overrides_a_builtin():
    from timm.models.resnet import BasicBlock

    register_residual_block(BasicBlock, "bn1")
    try:
        assert find_residual_norms(resnet18())[0].last_norm_name == "layer1.0.bn1"
    finally:
        unregister_residual_block(BasicBlock)
        register_residual_block(BasicBlock, "bn2")  # restore the built-in behaviour
    assert find_residual_norms(resnet18())[0].last_norm_name == "layer1.0.bn2"


# ---------------------------------------------------------------- report
def test_report_table_csv_dataframe_summary(randomize_norms, tmp_path):
    model = randomize_norms(resnet18())
    report = apply_bn_gamma(model, 0.0, stages=[-1], beta=0.0)
    assert len(report) == 2
    lines = str(report).splitlines()
    assert lines[0].split() == ["name", "stage", "block", "old_gamma_mean", "new_gamma", "old_beta_mean", "new_beta"]
    assert lines[2].startswith("layer4.0.bn2") and lines[3].startswith("layer4.1.bn2")
    assert len({len(line) for line in lines}) == 1  # aligned columns

    path = report.to_csv(tmp_path / "sub" / "bn_gamma.csv")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == report.names
    assert float(rows[0]["old_gamma_mean"]) == pytest.approx(report.rows[0]["old_gamma_mean"])
    assert float(rows[0]["new_gamma"]) == 0.0

    df = report.to_dataframe()
    assert list(df.columns) == ["name", "stage", "block", "old_gamma_mean", "new_gamma", "old_beta_mean", "new_beta"]
    assert df["new_gamma"].tolist() == [0.0, 0.0]
    assert report.summary() == "apply_bn_gamma: 2 layers; gamma=0 beta=0 x2 (layer4.0.bn2, layer4.1.bn2)"


def test_report_kept_beta_is_empty_in_csv_and_summary_is_short(tmp_path):
    model = timm.create_model("regnetx_002", pretrained=False)
    report = apply_bn_gamma(model, 1.0, which="all")
    assert len(report) == 39 and len(report.summary()) <= 250
    with report.to_csv(tmp_path / "r.csv").open() as fh:
        assert {r["new_beta"] for r in csv.DictReader(fh)} == {""}
    assert str(GammaReport([], strategy="zero_late")) == "zero_late: no layers changed"
    with pytest.raises(ValueError, match="lacks the columns"):
        GammaReport([{"name": "x"}])


# ---------------------------------------------------------------- docs
@pytest.mark.parametrize("module", ["bn", "blocks", "report"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"medtricks.gamma.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
