"""LR schedules (warmup, cosine, step) and optimizer parameter groups (no-bias-decay)."""

import math

import pytest
import torch
from torch import nn

from medtricks.train.param_groups import build_optimizer, build_param_groups
from medtricks.train.schedules import build_scheduler, lr_curve, scaled_lr


def test_warmup_then_cosine_key_points():
    lrs = lr_curve(0.1, name="cosine", epochs=10, steps_per_epoch=10, warmup_epochs=2, warmup_lr_init=0.001)
    assert len(lrs) == 100
    # Update n (from 1) of the 20 warmup updates trains at init + n/20 (lr - init): none is spent at init.
    assert lrs[0] == pytest.approx(0.001 + (0.1 - 0.001) * 1 / 20)
    assert lrs[9] == pytest.approx(0.001 + (0.1 - 0.001) * 10 / 20)  # linear ramp
    assert lrs[19] == pytest.approx(0.1)  # the last warmup update reaches the base LR
    assert lrs[59] == pytest.approx(0.05)  # cosine midpoint of the 80 decay updates
    assert lrs[-2] == pytest.approx(0.05 * (1 + math.cos(math.pi * 79 / 80)))
    assert lrs[-1] == pytest.approx(0.0)  # the last update ends the cosine at min_lr
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))  # monotone decay after warmup


def test_warmup_from_zero_never_spends_an_update_at_lr_zero():
    lrs = lr_curve(0.4, name="cosine", epochs=4, steps_per_epoch=9, warmup_epochs=1)
    assert lrs[0] == pytest.approx(0.4 / 9) and min(lrs[:9]) > 0 and lrs[8] == pytest.approx(0.4)
    no_warmup = lr_curve(0.4, name="cosine", epochs=4, steps_per_epoch=9)
    assert no_warmup[0] == pytest.approx(0.4)  # without warmup the first update is at the base LR, as before


def test_step_decay_at_milestones():
    lrs = lr_curve(0.1, name="step", epochs=10, steps_per_epoch=10, milestones=[5, 8], gamma=0.1)
    assert lrs[49] == pytest.approx(0.1)
    assert lrs[50] == pytest.approx(0.01)
    assert lrs[79] == pytest.approx(0.01)
    assert lrs[80] == pytest.approx(0.001)


def test_constant_and_bad_warmup():
    assert set(lr_curve(0.3, name="constant", epochs=2, steps_per_epoch=5)) == {0.3}
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        build_scheduler(opt, name="cosine", epochs=2, steps_per_epoch=5, warmup_epochs=2)


def test_linear_scaling_rule():
    assert scaled_lr(0.1, 512, True) == pytest.approx(0.2)
    assert scaled_lr(0.1, 512, False) == pytest.approx(0.1)


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def test_no_bias_decay_groups():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    groups = build_param_groups(model, weight_decay=1e-4, no_bias_decay=True)
    decayed = [n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]]
    exempt = [n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]]
    assert sorted(decayed) == ["0.weight", "5.weight"]
    assert sorted(exempt) == ["0.bias", "1.bias", "1.weight", "5.bias"]
    # without the trick everything decays
    groups = build_param_groups(model, weight_decay=1e-4, no_bias_decay=False)
    assert all(g["weight_decay"] == 1e-4 for g in groups)


def test_lr_multiplier_and_layer_decay_feed_timm_lr_scale():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    stage_of = lambda m: {"0.weight": 0, "0.bias": 0, "1.weight": 1, "1.bias": 1, "2.weight": 2, "2.bias": 2}
    groups = build_param_groups(model, weight_decay=0.0, layer_decay=0.5, stage_of=stage_of, lr_mults={"0.": 3.0})
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["2.weight"] == pytest.approx(1.0)
    assert scale["1.weight"] == pytest.approx(0.5)
    assert scale["0.weight"] == pytest.approx(0.25 * 3.0)
    opt = build_optimizer(groups, name="nesterov", lr=0.2)
    sched = build_scheduler(opt, name="constant", epochs=1, steps_per_epoch=4)
    sched.step_update(1)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([0.1, 0.15, 0.2])
    assert all(g["nesterov"] for g in opt.param_groups)


def test_frozen_model_is_an_error():
    model = nn.Linear(2, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        build_param_groups(model, weight_decay=0.0)
