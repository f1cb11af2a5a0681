"""Issue 16 item 4: the shortcut audit flags a model that reads a planted border marker, and not one
that reads the lungs (hand-built models on phantom-like images, so the verdicts are known)."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medtricks.audit.shortcut import blank_border, hide_lungs, lung_field_mask, lungs_only, run_shortcut_audit
from medtricks.cli import main


S = 32
MEAN, STD = (0.5,), (0.25,)
LUNGS = lung_field_mask(S, S)
CORNER = np.zeros((S, S), dtype=bool)
CORNER[:2, :2] = True  # inside the 8 % border frame (3 px at 32 px)


def _images(n=96, seed=0, marker=False, lesion=False):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.35 + 0.1 * torch.rand(n, 1, S, S, generator=g)
    if lesion:  # a bright patch in the left lung of every positive image
        x[y == 1, :, 12:20, 7:12] += 0.3
    if marker:  # a bright corner marker on every positive image: a perfect shortcut
        x[y == 1, :, :2, :2] = 0.95
    return DataLoader(TensorDataset((x.clamp(0, 1) - MEAN[0]) / STD[0], y), batch_size=32)


class RegionModel(nn.Module):
    """Reads the mean grey of one region: channel 0 = the lung field, channel 1 = the corner."""

    def __init__(self, region: int):
        super().__init__()
        self.region = region
        self.register_buffer("masks", torch.tensor(np.stack([LUNGS, CORNER]), dtype=torch.float32)[None])
        self.split = nn.Conv2d(2, 2, 1, groups=2, bias=False)  # identity weights: puts the maps in the graph
        nn.init.ones_(self.split.weight)
        self.gain = nn.Parameter(torch.tensor(40.0))  # a model has parameters (the CAM finder looks for their device)

    def forward(self, z):
        x01 = z * STD[0] + MEAN[0]
        maps = self.split(x01 * self.masks)  # (N, 2, S, S): Grad-CAM's layer
        mask = self.masks[0, self.region]
        value = maps[:, self.region].sum((1, 2)) / mask.sum()
        score = self.gain * (value - (0.40 if self.region == 0 else 0.5))
        return torch.stack([-score, score], dim=1)


def test_the_image_probes():
    x = torch.rand(2, 1, S, S)
    assert LUNGS.mean() == pytest.approx(0.32, abs=0.03)  # the documented ~32 % of the image
    hidden, only, framed = hide_lungs(x, LUNGS), lungs_only(x, LUNGS), blank_border(x, 0.1)
    assert torch.equal(hidden[:, :, ~torch.tensor(LUNGS)], x[:, :, ~torch.tensor(LUNGS)])
    assert torch.equal(only[:, :, torch.tensor(LUNGS)], x[:, :, torch.tensor(LUNGS)])
    assert (hidden[:, 0][:, torch.tensor(LUNGS)] == x.median()).all()  # one grey for every image: no leak
    assert torch.equal(framed[:, :, 3:-3, 3:-3], x[:, :, 3:-3, 3:-3]) and not torch.equal(framed, x)


def test_a_planted_border_marker_is_flagged():
    res = run_shortcut_audit(
        RegionModel(region=1),
        _images(marker=True),
        classes=["normal", "covid"],
        mean=MEAN,
        std=STD,
        n_bootstrap=100,
        progress=False,
    )
    assert res.variants["clean"]["auroc"] == pytest.approx(1.0)
    assert res.flags == {"lungs_hidden": True, "border": True, "cam_outside_lungs": True}
    assert res.variants["border_blanked"]["auroc"] < 0.7
    assert res.verdict.startswith("VERDICT: shortcut suspected")
    assert res.metrics["audit/shortcut/flag/border"] == 1.0
    assert {"right_1", "right_2"} <= {name.rsplit("_p", 1)[0] for name in res.overlays}
    assert json.loads(res.to_json())["flags"]["lungs_hidden"] is True


def test_a_model_that_reads_the_lungs_is_not_flagged():
    res = run_shortcut_audit(
        RegionModel(region=0),
        _images(lesion=True),
        classes=["normal", "covid"],
        mean=MEAN,
        std=STD,
        n_bootstrap=100,
        progress=False,
    )
    assert res.variants["clean"]["auroc"] > 0.95
    assert res.variants["lungs_hidden"]["auroc_ci_low"] < 0.65  # no signal left without the lungs
    assert res.flags == {"lungs_hidden": False, "border": False, "cam_outside_lungs": False}
    assert res.cam_lung_share["value"] > 0.9
    assert res.verdict.startswith("VERDICT: no shortcut found")
    assert "Grad-CAM share in the lung field" in res.table()


def test_shortcut_audit_of_a_run_from_the_cli(trained_run, capsys):
    result, uri, tmp = trained_run
    assert main(["audit", str(result.run_dir), "--shortcut", "--n", "24", "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "Shortcut audit: n=" in out and "VERDICT:" in out and "lungs_hidden" in out  # the run's val split
