"""The deployment site (issue 30): the Kermany patient key, site calibration profiles, unlabelled
adaptation (EM prior, AdaBN, TENT). Small synthetic data and tiny models only."""
from __future__ import annotations

import re

import pytest


# ------------------------------------------------------------------------------ the patient key
def _kermany_key(name: str, card: str = "kermany-pneumonia") -> str:
    from medtricks.data import load_card

    m = re.search(load_card(card).patient.regex, name)
    assert m is not None, name
    return m.group("patient")


@pytest.mark.parametrize("card", ["kermany-pneumonia", "kermany-pneumonia-3class"])
def test_kermany_patient_key_is_person_number_and_subtype(card):
    # Kermany numbers pneumonia patients per sub-type: person12_bacteria and person12_virus are two children
    assert _kermany_key("person12_bacteria_46.jpeg", card) == "person12_bacteria"
    assert _kermany_key("person12_bacteria_47.jpeg", card) == "person12_bacteria"
    assert _kermany_key("person12_virus_1.jpeg", card) == "person12_virus"
    assert _kermany_key("person447_virus_921_1.jpeg", card) == "person447_virus"
    assert _kermany_key("IM-0115-0001.jpeg", card) == "IM-0115"
    assert _kermany_key("NORMAL2-IM-0115-0001.jpeg", card) == "NORMAL2-IM-0115"
    assert _kermany_key("IM-0429-0001-0002.jpeg", card) == "IM-0429"


# ------------------------------------------------------------------------------ fits on arrays
def _posteriors(prevalence: float, n: int, train_prior: float = 0.5, seed: int = 0):
    """Labels at ``prevalence`` and the exact posteriors of a model trained at ``train_prior``
    (class-conditional N(±1, 1) scores): what a calibrated classifier outputs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    log_lr = 2.0 * x  # log N(x;1,1)/N(x;-1,1)
    odds = np.exp(log_lr) * train_prior / (1 - train_prior)
    p1 = odds / (1 + odds)
    return y, np.stack([1 - p1, p1], axis=1)


@pytest.mark.parametrize("planted", [0.15, 0.3, 0.7])
def test_em_prior_recovers_a_planted_prevalence(planted):
    from medtricks.deploy.fit import em_prior

    _, probs = _posteriors(planted, 20000, train_prior=0.5, seed=1)
    assert abs(probs[:, 1].mean() - planted) > 0.03 or planted == 0.5  # the naive mean is biased towards 0.5
    priors, iterations = em_prior(probs, [0.5, 0.5])
    assert abs(priors[1] - planted) < 0.015 and iterations > 1
    # a model trained at another prior: EM starts from it and still finds the site's
    _, probs = _posteriors(planted, 20000, train_prior=0.74, seed=2)
    assert abs(em_prior(probs, [0.26, 0.74])[0][1] - planted) < 0.015


def test_temperature_fit_undoes_a_planted_temperature():
    import numpy as np

    from medtricks.deploy.fit import apply_temperature, fit_temperature

    y, calibrated = _posteriors(0.4, 5000, seed=3)
    overconfident = apply_temperature(calibrated, 0.5)  # logits doubled
    assert abs(fit_temperature(y, overconfident) - 2.0) < 0.15
    assert np.allclose(apply_temperature(overconfident, 2.0), calibrated, atol=1e-6)


def test_calibrate_predictions_fits_intervals_and_cross_fits_by_patient():
    import numpy as np

    from medtricks.deploy.calibrate import SiteSampleError, calibrate_predictions

    y, probs = _posteriors(0.4, 400, seed=4)
    groups = np.array([f"p{i // 2}" for i in range(len(y))])  # two images per patient
    y[1::2] = y[::2]  # one label per patient
    profile = calibrate_predictions(y, probs, groups, name="h-b", classes=["normal", "pneumonia"],
                                    stored_threshold=0.5, train_priors=[0.5, 0.5], n_bootstrap=50)
    lo, hi = profile.intervals["threshold"]
    assert lo <= profile.threshold <= hi and 0.0 < profile.threshold < 1.0
    assert profile.intervals["prevalence"][0] <= profile.prevalence <= profile.intervals["prevalence"][1]
    site = profile.cross_fit["site"]
    assert set(site) >= {"sensitivity", "specificity", "accuracy", "ece", "nll"}
    assert profile.cross_fit["stored"]["threshold"] == 0.5
    assert "cross-fitted by patient" in profile.table()
    with pytest.raises(SiteSampleError, match="too small.*19 image"):
        keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:19]]
        calibrate_predictions(y[keep], probs[keep], groups[keep], name="h-b", classes=["normal", "pneumonia"])


# --------------------------------------------------------------------------------- AdaBN, TENT
def _bn_net(seed: int = 0):
    import torch
    from torch import nn

    from conftest import randomize_norms

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                        nn.Linear(8, 2))
    return randomize_norms(net, seed).eval()


def _site_batch(n: int = 24, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g) * 2.0 + 0.7  # shifted and scaled: another "site"


def _split_state(model):
    from torch.nn.modules.batchnorm import _BatchNorm

    stats, affine, other = {}, {}, {}
    bn_names = {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in bn_names and leaf in ("running_mean", "running_var", "num_batches_tracked"):
            stats[key] = value.clone()
        elif owner in bn_names and leaf in ("weight", "bias"):
            affine[key] = value.clone()
        else:
            other[key] = value.clone()
    return stats, affine, other


def _same(a, b):
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adabn_changes_only_batchnorm_running_statistics():
    import torch

    from medtricks.deploy.bn import adabn

    net = _bn_net()
    stats0, affine0, other0 = _split_state(net)
    x = _site_batch()
    report = adabn(net, [(x[:10], None), (x[10:], None)])
    stats1, affine1, other1 = _split_state(net)
    assert _same(affine0, affine1) and _same(other0, other1)
    changed = [k for k in stats0 if "running" in k and not torch.equal(stats0[k], stats1[k])]
    assert len(changed) == 4 and report.n_layers == 2 and report.n_images == 24 and not net.training
    # the statistics are the site's: the first BN's running mean is the mean of its input over all images
    with torch.no_grad():
        first = net[0](x)
    assert torch.allclose(net[1].running_mean, first.mean(dim=(0, 2, 3)), atol=1e-5)
    assert all(p.requires_grad for p in net.parameters())


def test_tent_updates_only_batchnorm_affine_parameters_and_is_deterministic():
    import torch
    from torch.utils.data import TensorDataset

    from medtricks.deploy.bn import tent

    data = TensorDataset(_site_batch(40), torch.zeros(40, dtype=torch.long))
    nets = [_bn_net(), _bn_net()]
    stats0, affine0, other0 = _split_state(nets[0])
    reports = [tent(net, data, steps=3, batch_size=8, lr=0.05, seed=7) for net in nets]
    stats1, affine1, other1 = _split_state(nets[0])
    assert _same(stats0, stats1) and _same(other0, other1)  # running statistics and every other weight: unchanged
    assert all(not torch.equal(affine0[k], affine1[k]) for k in affine0)  # every γ and β moved
    assert reports[0].steps == 15 and reports[0].losses[-1] < reports[0].losses[0]  # entropy went down
    assert _same(_split_state(nets[1])[1], affine1)  # same seed: the same parameters, bit for bit
    other_seed = _bn_net()
    tent(other_seed, data, steps=3, batch_size=8, lr=0.05, seed=8)
    assert not _same(_split_state(other_seed)[1], affine1)
    assert all(p.requires_grad for p in nets[0].parameters()) and not nets[0].training
