"""Issue 19 item 4: gradient-masking checks -- they fire on a model that hides its gradients behind a
non-differentiable quantisation layer, stay quiet on an honestly trained one, and read right by hand."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medtricks.audit import AuditResult, masking_checks, run_audit
from medtricks.audit.masking import LARGE_EPS


class Quantize(nn.Module):
    """Rounds the (normalised) input to a coarse grid: the forward pass barely changes, the gradient is 0."""

    def forward(self, x):
        return torch.round(x * 4) / 4


@pytest.fixture(scope="module")
def model(blob_task):
    return blob_task.train(0)


@pytest.fixture(scope="module")
def loader(blob_task):
    x01, y = blob_task.pixels(48, seed=7)
    return DataLoader(TensorDataset(blob_task.normalized(x01), y), batch_size=16)


@pytest.fixture(scope="module")
def audit(blob_task):
    """``audit(model, loader, attacks=("pgd_linf",), **kw)``: run_audit on the toy task at 0, 8 and 16 / 255."""

    def run(model, loader, attacks=("pgd_linf",), **kw):
        return run_audit(
            model,
            loader,
            classes=blob_task.classes,
            mean=blob_task.mean,
            std=blob_task.std,
            attacks=attacks,
            eps=(0.0, 8 / 255, 16 / 255),
            corruptions=(),
            n_bootstrap=0,
            progress=False,
            **kw,
        )

    return run


def test_checks_fire_on_a_model_that_masks_its_gradients(audit, model, loader):
    masked = nn.Sequential(Quantize(), model).eval()
    with pytest.warns(RuntimeWarning, match="possible gradient masking"):
        res = audit(masked, loader, attacks=("pgd_linf", "square"), square_queries=100)
    verdict = {c["check"]: c["passed"] for c in res.masking}
    assert verdict["large_eps"] is False  # zero gradients: PGD cannot push accuracy to ~0 at 64/255
    assert verdict["black_box:square"] is False  # the gradient-free attack breaks what PGD could not
    assert "WARNING gradient-masking check large_eps" in res.table()
    assert res.metrics["audit/masking/large_eps/passed"] == 0.0
    assert AuditResult.from_json(res.to_json()).masking == res.masking  # kept in the JSON report


def test_checks_stay_quiet_on_an_honest_model(audit, model, loader, recwarn):
    res = audit(model, loader)
    assert {c["check"] for c in res.masking} == {"more_steps", "black_box:random_noise", "large_eps"}
    assert all(c["passed"] for c in res.masking), res.masking
    assert not [w for w in recwarn if "gradient masking" in str(w.message)]
    assert res.table().count("ok gradient-masking check") == 3


def test_checks_can_be_switched_off_and_skip_targeted_audits(audit, model, loader):
    assert audit(model, loader, masking=False).masking == []
    assert audit(model, loader, target_class="pneumonia").masking == []  # the checks are for untargeted PGD


def test_the_checks_by_hand():
    n = 200
    strong = np.zeros(n, dtype=bool)
    strong[:20] = True  # PGD-k leaves 10% correct
    weak = np.zeros(n, dtype=bool)
    weak[:60] = True  # PGD with fewer steps: 30%
    ok = masking_checks(
        {4 / 255: strong},
        pgd_steps=10,
        correct_fewer=weak,
        black_box={"square": {4 / 255: weak}},
        correct_large=np.zeros(n, dtype=bool),
    )
    assert [c.passed for c in ok] == [True, True, True]
    bad = masking_checks(
        {4 / 255: weak}, pgd_steps=10, correct_fewer=strong, black_box={"square": {4 / 255: strong}}, correct_large=weak
    )
    assert [c.check for c in bad] == ["more_steps", "black_box:square", "large_eps"]
    assert not any(c.passed for c in bad)
    assert "PGD-10 leaves accuracy 0.300, PGD-2 0.100" in bad[0].detail
    assert f"{LARGE_EPS * 255:.0f}/255" in bad[2].detail
    # one image of difference on 200 is noise, not masking
    noisy = strong.copy()
    noisy[100] = True
    assert masking_checks({4 / 255: noisy}, pgd_steps=10, correct_fewer=strong)[0].passed
    assert math.isclose(LARGE_EPS, 64 / 255)
