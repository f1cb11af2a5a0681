"""The deployment site (issue 30): the Kermany patient key, site calibration profiles, unlabelled
adaptation (EM prior, AdaBN, TENT). Small synthetic data and tiny models only."""

from __future__ import annotations

import re
from pathlib import Path

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
    profile = calibrate_predictions(
        y,
        probs,
        groups,
        name="h-b",
        classes=["normal", "pneumonia"],
        stored_threshold=0.5,
        train_priors=[0.5, 0.5],
        n_bootstrap=50,
    )
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
@pytest.fixture(scope="module")
def bn_net(randomize_norms):
    """``bn_net(seed=0)``: a small CNN with two BatchNorms holding pretrained-like values, in eval mode."""
    return lambda seed=0: _bn_net(seed, randomize_norms)


def _bn_net(seed, randomize_norms):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8, 2),
    )
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


def test_adabn_changes_only_batchnorm_running_statistics(bn_net):
    import torch

    from medtricks.deploy.bn import adabn

    net = bn_net()
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


def test_tent_updates_only_batchnorm_affine_parameters_and_is_deterministic(bn_net):
    import torch
    from torch.utils.data import TensorDataset

    from medtricks.deploy.bn import tent

    data = TensorDataset(_site_batch(40), torch.zeros(40, dtype=torch.long))
    nets = [bn_net(), bn_net()]
    stats0, affine0, other0 = _split_state(nets[0])
    reports = [tent(net, data, steps=3, batch_size=8, lr=0.05, seed=7) for net in nets]
    stats1, affine1, other1 = _split_state(nets[0])
    assert _same(stats0, stats1) and _same(other0, other1)  # running statistics and every other weight: unchanged
    assert all(not torch.equal(affine0[k], affine1[k]) for k in affine0)  # every γ and β moved
    assert reports[0].steps == 15 and reports[0].losses[-1] < reports[0].losses[0]  # entropy went down
    assert _same(_split_state(nets[1])[1], affine1)  # same seed: the same parameters, bit for bit
    other_seed = bn_net()
    tent(other_seed, data, steps=3, batch_size=8, lr=0.05, seed=8)
    assert not _same(_split_state(other_seed)[1], affine1)
    assert all(p.requires_grad for p in nets[0].parameters()) and not nets[0].training


# ------------------------------------------------------------------ a tiny trained run and a site
ROOT = Path(__file__).resolve().parents[2]
SALT = "medtricks-deploy-tests"  # one patient salt for the module's run and every test (hashes must match)


@pytest.fixture(autouse=True)
def _one_salt(monkeypatch):
    monkeypatch.setenv("MEDTRICKS_PATIENT_SALT", SALT)


@pytest.fixture(scope="module")
def site_run(binary_phantom_card, fresh_sqlite_uri, tmp_path_factory, binary_run_overrides):
    """A 1-epoch resnet18 on 32 px binary phantoms (MLflow sqlite store), and a labelled "site": phantoms
    drawn with another seed (other patients, other images)."""
    from medtricks.data import synthesize_phantoms
    from medtricks.recipe import load_recipe
    from medtricks.run import run_recipe

    tmp = tmp_path_factory.mktemp("deploy")
    uri = fresh_sqlite_uri(tmp)
    synthesize_phantoms(tmp / "data", n=80, classes=("normal", "pneumonia"), size=32, seed=0)
    synthesize_phantoms(tmp / "site", n=90, classes=("normal", "pneumonia"), size=32, seed=5)
    card = binary_phantom_card(tmp)
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides=binary_run_overrides(tmp, card, uri))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTRICKS_PATIENT_SALT", SALT)
        result = run_recipe(recipe, quiet=True)
    return result, uri, tmp, card


@pytest.mark.slow
def test_calibrate_refuses_a_site_sample_that_shares_the_runs_training_data(site_run, monkeypatch):
    from medtricks.deploy.calibrate import SiteOverlapError, calibrate_site

    result, uri, tmp, card = site_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(SiteOverlapError, match=r"train: \d+ identical images, \d+ patients.*val: \d+"):
        calibrate_site(
            str(result.run_dir),
            card=str(card),
            root=str(tmp / "data"),
            name="own",
            n_bootstrap=5,
            log=False,
            progress=False,
        )
    # one training image copied into an otherwise new site sample is found too (identical bytes)
    import shutil

    site = tmp / "site_leak"
    shutil.copytree(tmp / "site", site)
    import pandas as pd

    train = pd.read_csv(result.run_dir / "artifacts" / "split_manifest.csv")
    assert "content_id" in train.columns
    rows = pd.read_csv(tmp / "data" / "phantoms.csv")
    table = pd.read_csv(site / "phantoms.csv")
    src = rows.iloc[0]
    shutil.copy(tmp / "data" / src["path"], site / "images" / "leaked.png")
    table.loc[len(table)] = {"path": "images/leaked.png", "label": src["label"], "patient": "PH999-00000"}
    table.to_csv(site / "phantoms.csv", index=False)
    with pytest.raises(SiteOverlapError, match=r"1 identical images"):
        calibrate_site(
            str(result.run_dir), card=str(card), root=str(site), name="leak", n_bootstrap=5, log=False, progress=False
        )
    assert not (result.run_dir / "model" / "sites").exists()  # nothing stored


@pytest.mark.slow
def test_calibrate_stores_a_profile_that_round_trips_through_mlflow_and_the_local_store(site_run, monkeypatch):
    from medtricks.deploy.calibrate import SiteSampleError, calibrate_site
    from medtricks.deploy.profiles import (
        SiteProfile,
        load_logged_site_profile,
        load_site_profile,
        log_site_profile,
        site_profile_path,
    )
    from medtricks.tracking import create_store
    from medtricks.posthoc.load import load_trained

    result, uri, tmp, card = site_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cal = calibrate_site(
        str(result.run_dir),
        card=str(card),
        root=str(tmp / "site"),
        name="site-b",
        n_bootstrap=20,
        folds=3,
        min_per_class=20,
        progress=False,
        tracking_uri=uri,
    )
    profile = cal.profile
    assert cal.path == site_profile_path(result.run_dir, "site-b") and cal.path.is_file()
    assert profile.sample["n_images"] == 90 and profile.sample["root"].startswith("r_")
    assert str(tmp) not in cal.path.read_text()  # no data paths in the profile
    assert profile.cross_fit["folds"] == 3 and "site/threshold" in profile.metrics()
    assert SiteProfile.from_json(cal.path).to_dict() == profile.to_dict()

    # MLflow: the profile is an artifact of a site_profile run nested under the trained run
    store = create_store("mlflow", uri)
    trained = load_trained(str(result.run_dir))
    experiment = trained.recipe.tracking.experiment or trained.recipe.experiment.name
    back = load_logged_site_profile(store, experiment=experiment, run_id=trained.run_id, name="site-b")
    assert back is not None and back.to_dict() == profile.to_dict()
    assert store.get_run(cal.logged_run).parent_run_id == trained.run_id
    # a run whose folder lost the file (or a run found by id on another machine) reads it from the store
    cal.path.rename(cal.path.with_suffix(".bak"))
    try:
        assert load_site_profile(trained, "site-b", store=store).to_dict() == profile.to_dict()
    finally:
        cal.path.with_suffix(".bak").rename(cal.path)

    # the local run store (tracking.backend: none) takes and gives back the same profile
    local = create_store("none", root=tmp / "local_runs")
    logged = log_site_profile(local, profile, experiment="exp", run_id="parent123")
    assert logged and local.get_run(logged).tags["medtricks.site"] == "site-b"
    again = load_logged_site_profile(
        create_store("none", root=tmp / "local_runs"), experiment="exp", run_id="parent123", name="site-b"
    )
    assert again.to_dict() == profile.to_dict()

    # the command line
    from medtricks.cli import main

    assert (
        main(
            [
                "calibrate",
                str(result.run_dir),
                "--card",
                str(card),
                "--root",
                str(tmp / "site"),
                "--name",
                "cli-site",
                "--n-bootstrap",
                "5",
                "--folds",
                "3",
                "--no-log",
            ]
        )
        == 0
    )
    assert site_profile_path(result.run_dir, "cli-site").is_file()
    # too small a sample: says so, stores nothing
    with pytest.raises(SiteSampleError, match="too small to calibrate safely"):
        calibrate_site(
            str(result.run_dir),
            card=str(card),
            root=str(tmp / "site"),
            name="tiny",
            min_per_class=1000,
            log=False,
            progress=False,
        )
    assert not site_profile_path(result.run_dir, "tiny").exists()


def _put_profile(run_dir, name="fixed", threshold=0.3, temperature=1.0):
    from medtricks.deploy.profiles import SiteProfile, save_site_profile

    profile = SiteProfile(
        name=name,
        method="youden",
        threshold=threshold,
        temperature=temperature,
        prevalence=0.5,
        classes=["normal", "pneumonia"],
    )
    save_site_profile(run_dir, profile)
    return profile


@pytest.mark.slow
def test_predict_and_evaluate_use_the_site_profiles_threshold(site_run, monkeypatch, capsys):
    import numpy as np
    import pandas as pd

    from medtricks.cli import main
    from medtricks.deploy.fit import apply_temperature
    from medtricks.posthoc import evaluate_trained
    from medtricks.posthoc.predict import predict_images

    result, uri, tmp, card = site_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _put_profile(result.run_dir, "fixed", threshold=0.3)
    _put_profile(result.run_dir, "warm", threshold=0.6, temperature=2.0)
    images = tmp / "site" / "images"
    plain, _ = predict_images(str(result.run_dir), [images], progress=False)
    site, _ = predict_images(str(result.run_dir), [images], site="fixed", progress=False)
    assert (site["threshold"] == 0.3).all() and "site profile 'fixed'" in site.attrs["rule"]
    assert site.attrs["threshold_source"] == "site"
    assert (site["predicted"] == np.where(site["prob_pneumonia"] >= 0.3, "pneumonia", "normal")).all()
    warm, _ = predict_images(str(result.run_dir), [images], site="warm", progress=False)
    raw = plain[["prob_normal", "prob_pneumonia"]].to_numpy()
    assert np.allclose(warm[["prob_normal", "prob_pneumonia"]].to_numpy(), apply_temperature(raw, 2.0))
    assert (warm["predicted"] == np.where(warm["prob_pneumonia"] >= 0.6, "pneumonia", "normal")).all()
    # the command line
    out = tmp / "preds_site.csv"
    assert main(["predict", str(result.run_dir), str(images), "--site", "fixed", "--out", str(out)]) == 0
    assert (pd.read_csv(out)["threshold"] == 0.3).all()
    assert main(["predict", str(result.run_dir), str(images), "--site", "nope", "--out", str(out)]) == 2
    assert "no site profile 'nope'" in capsys.readouterr().err
    # evaluate --site: the operating point is the profile's
    report = evaluate_trained(
        str(result.run_dir),
        card=str(card),
        root=str(tmp / "site"),
        site="fixed",
        n_bootstrap=0,
        log=False,
        progress=False,
    )
    assert report.rule.threshold == 0.3 and report.rule.source == "site"
    positive = report.probs[:, 1] >= 0.3
    assert (report.probs_op.argmax(1) == positive).all()
    with pytest.raises(Exception, match="brings its own threshold"):
        evaluate_trained(
            str(result.run_dir),
            card=str(card),
            root=str(tmp / "site"),
            site="fixed",
            threshold=0.5,
            n_bootstrap=0,
            log=False,
            progress=False,
        )


@pytest.mark.slow
def test_adapt_adabn_and_tent_write_runs_that_record_their_parent_and_load_like_any_run(site_run, monkeypatch):
    import json

    import torch

    from medtricks.deploy.adapt import adapt_run
    from medtricks.posthoc import evaluate_trained
    from medtricks.posthoc.load import load_trained

    result, uri, tmp, card = site_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    parent = load_trained(str(result.run_dir))
    images = tmp / "site" / "images"
    for method in ("adabn", "tent"):
        adapted = adapt_run(
            str(result.run_dir),
            root=str(images),
            method=method,
            progress=False,
            tracking_uri=uri,
            batch_size=16,
            lr=0.01,
        )
        record = json.loads((adapted.run_dir / "model" / "adaptation.json").read_text())
        assert record["method"] == method and record["parent_run_id"] == parent.run_id
        assert record["n_images"] == 90 and all(i.startswith("i_") for i in record["image_ids"])
        assert str(tmp) not in json.dumps({k: v for k, v in record.items() if k != "parent_run_dir"})
        child = load_trained(str(adapted.run_dir))
        assert child.run_id == adapted.run_id and child.classes == parent.classes
        a, b = parent.model.state_dict(), child.model.state_dict()
        changed = {k for k in a if not torch.equal(a[k], b[k])}
        assert changed and all(
            k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")
            for k in changed
        )
        if method == "adabn":
            assert all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in changed)
        # found by its run id in MLflow too, and evaluated like any run
        assert load_trained(adapted.run_id, tracking_uri=uri).run_id == adapted.run_id
        report = evaluate_trained(
            str(adapted.run_dir), card=str(card), root=str(tmp / "site"), n_bootstrap=0, log=False, progress=False
        )
        assert report.n_images == 90


@pytest.mark.slow
def test_adapt_em_prior_stores_a_profile_that_shifts_the_prior(site_run, monkeypatch):
    from medtricks.deploy.adapt import adapt_run
    from medtricks.posthoc import resolve_decision_rule
    from medtricks.posthoc.load import load_trained

    result, uri, tmp, card = site_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    adapted = adapt_run(
        str(result.run_dir),
        root=str(tmp / "site" / "images"),
        method="em-prior",
        name="em-b",
        n_bootstrap=20,
        progress=False,
        log=False,
    )
    profile = adapted.profile
    assert profile.method == "em-prior" and profile.shift_from and 0 < profile.prevalence < 1
    assert (result.run_dir / "model" / "sites" / "em-b.json").is_file()
    rule = resolve_decision_rule(load_trained(str(result.run_dir)), site="em-b")
    assert rule.prevalence == profile.prevalence and rule.train_priors == profile.shift_from
    from medtricks.cli import main

    assert (
        main(
            [
                "adapt",
                str(result.run_dir),
                "--root",
                str(tmp / "site" / "images"),
                "--method",
                "em-prior",
                "--name",
                "em-cli",
                "--no-log",
            ]
        )
        == 0
    )
    assert (result.run_dir / "model" / "sites" / "em-cli.json").is_file()
