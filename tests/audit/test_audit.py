"""Robustness audit: attacks (budget, clamping, strength order), run_audit metrics, report, MLflow keys.

A tiny CNN is trained for a few steps on a synthetic 2-class problem (a bright central blob =
"pneumonia") at 24 px; attacks at 8-16 grey levels flip it, smaller budgets do not.
"""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medtricks.audit import (
    AuditResult,
    PerturbationBudgetError,
    apgd,
    apgd_square,
    check_perturbation,
    corruption_error,
    fgsm,
    l2_radius,
    normalized_model,
    pgd,
    run_audit,
    square,
)
from medtricks.evaluate import compute_metrics
from medtricks.train import predict

EPS = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
MLFLOW_SAFE = re.compile(r"^[A-Za-z0-9_\-. /]+$")


@pytest.fixture(scope="module")
def trained(blob_task) -> nn.Module:
    return blob_task.train(0)


@pytest.fixture(scope="module")
def val(blob_task) -> tuple[torch.Tensor, torch.Tensor]:
    return blob_task.pixels(96, seed=1)


@pytest.fixture()
def loader(blob_task, val) -> DataLoader:
    x01, y = val
    return DataLoader(TensorDataset(blob_task.normalized(x01), y), batch_size=32)


@pytest.fixture(scope="module")
def pgd_vs_fgsm(blob_task, trained, val) -> AuditResult:
    x01, y = val
    dl = DataLoader(TensorDataset(blob_task.normalized(x01), y), batch_size=32)
    return run_audit(
        trained,
        dl,
        classes=blob_task.classes,
        mean=blob_task.mean,
        std=blob_task.std,
        attacks=("fgsm", "pgd_linf", "pgd_l2"),
        eps=EPS,
        corruptions=(),
        n_bootstrap=100,
        progress=False,
    )


# ------------------------------------------------------------------------ the attacks themselves
def test_tiny_model_is_accurate_but_not_robust(blob_task, trained, val):
    x01, y = val
    model01 = normalized_model(trained, blob_task.mean, blob_task.std)
    with torch.no_grad():
        assert (model01(x01).argmax(1) == y).float().mean() >= 0.95
    x_adv = pgd(model01, x01, y, 16 / 255, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model01(x_adv).argmax(1) == y).float().mean() <= 0.2


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_and_fgsm_respect_budget_and_clamp(blob_task, trained, val, norm):
    x01, y = val
    # saturated pixels: every step would leave [0, 1] without the clamp
    x01 = x01.clone()
    x01[:, :, :4] = 0.0
    x01[:, :, -4:] = 1.0
    model01 = normalized_model(trained, blob_task.mean, blob_task.std)
    for eps in (0.5 / 255, 4 / 255, 16 / 255):
        budget = l2_radius(eps, x01.shape[1:]) if norm == "l2" else eps
        x_adv = pgd(model01, x01, y, budget, norm=norm, steps=5, generator=torch.Generator().manual_seed(1))
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        norms = check_perturbation(x_adv, x01, budget, norm)
        assert float(norms.max()) <= budget + 1e-6
        assert float(norms.max()) > 0.5 * budget  # it did move
        if norm == "linf":
            x_f = fgsm(model01, x01, y, eps)
            assert x_f.min() >= 0 and x_f.max() <= 1
            assert float((x_f - x01).abs().max()) <= eps + 1e-6
            # the clamp took effect on saturated pixels: some moves there were cut to 0
            assert torch.all(x_f[:, :, :4] >= 0) and torch.any(x_f[:, :, :4] == 0)


def test_check_perturbation_catches_violations(val):
    x01, _ = val
    with pytest.raises(PerturbationBudgetError, match="exceeds eps"):
        check_perturbation((x01 + 2 / 255).clamp(0, 1), x01, 1 / 255)
    with pytest.raises(PerturbationBudgetError, match=r"leave \[0, 1\]"):
        check_perturbation(x01 + 1.0, x01, 10.0)


def test_pgd_keeps_model_state(blob_task, trained, val):
    x01, y = val
    model = blob_task.cnn()
    model.train()
    model[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    pgd(normalized_model(model, blob_task.mean, blob_task.std), x01[:8], y[:8], 4 / 255, steps=2)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


def test_two_class_apgd_apgd_square_square_do_not_crash(blob_task, trained, val):
    x01, y = val[0][:16], val[1][:16]
    model01 = normalized_model(trained, blob_task.mean, blob_task.std)
    eps = 16 / 255
    for x_adv in (
        apgd(model01, x01, y, eps, steps=10, seed=0),
        square(model01, x01, y, eps, queries=30, seed=0),
        square(model01, x01, y, eps, queries=30, targeted=True, seed=0),
        apgd_square(model01, x01, y, eps, apgd_steps=10, square_queries=30, seed=0),
    ):
        check_perturbation(x_adv, x01, eps)
    with torch.no_grad():
        robust = (model01(x_adv).argmax(1) == y).float().mean()
        clean = (model01(x01).argmax(1) == y).float().mean()
    assert robust < clean  # AutoAttack at 16 grey levels breaks this model
    with pytest.raises(ValueError, match="APGD-DLR needs >= 3 classes"):
        apgd(model01, x01, y, eps, loss="dlr")


def test_dlr_used_for_three_classes(blob_task):
    model01 = normalized_model(blob_task.cnn(n_classes=3), blob_task.mean, blob_task.std).eval()
    x01, y = blob_task.pixels(8, seed=3, n_classes=3)
    x_adv = apgd(model01, x01, y, 8 / 255, loss="dlr", steps=5)
    check_perturbation(x_adv, x01, 8 / 255)
    check_perturbation(apgd_square(model01, x01, y, 8 / 255, apgd_steps=5, square_queries=10), x01, 8 / 255)


# ------------------------------------------------------------------------ run_audit
def test_eps_zero_equals_clean_metrics_exactly(blob_task, trained, loader):
    res = run_audit(
        trained,
        loader,
        classes=blob_task.classes,
        mean=blob_task.mean,
        std=blob_task.std,
        attacks=("fgsm", "pgd_linf"),
        eps=(0.0, 2 / 255),
        corruptions=(),
        n_bootstrap=50,
        seed=3,
        progress=False,
    )
    y, probs, _ = predict(trained, loader)
    ref = compute_metrics(y, probs, blob_task.classes, n_bootstrap=50, seed=3)
    for attack in ("fgsm", "pgd_linf"):
        row = res.attacks[attack][0.0]
        for key in ("accuracy", "auroc", "sensitivity/normal", "specificity/pneumonia"):
            assert row[key] == ref.values[key]
            assert (row[f"{key}_ci_low"], row[f"{key}_ci_high"]) == ref.ci[key]
            assert res.metrics[f"audit/{attack}/eps_0.0000/{key}"] == ref.values[key]
        assert row["attack_success_rate"] == 0.0
    assert res.clean["accuracy"] == ref.values["accuracy"]


def test_pgd_not_weaker_than_fgsm_and_accuracy_falls_with_eps(pgd_vs_fgsm):
    res = pgd_vs_fgsm
    for eps in EPS:
        assert res.attacks["pgd_linf"][eps]["accuracy"] <= res.attacks["fgsm"][eps]["accuracy"]
    assert (
        res.attacks["pgd_linf"][16 / 255]["accuracy"] < res.attacks["fgsm"][16 / 255]["accuracy"]
        or res.attacks["fgsm"][16 / 255]["accuracy"] == 0.0
    )
    for attack, by_eps in res.attacks.items():
        accs = [by_eps[e]["accuracy"] for e in EPS]
        for prev, e, cur in zip(accs, EPS[1:], accs[1:]):
            # non-increasing up to bootstrap noise: never above the previous budget's CI
            assert cur <= max(prev, by_eps[EPS[EPS.index(e) - 1]]["accuracy_ci_high"]) + 1e-12, (attack, e, accs)
        assert accs[-1] < accs[0]  # and the attack does bite
        rates = [by_eps[e]["attack_success_rate"] for e in EPS]
        assert rates[0] == 0.0 and rates[-1] > 0.5
    assert res.config["max_perturbation_norm"]["pgd_linf/0.0627"] <= 16 / 255 + 1e-6


def test_metric_keys_are_mlflow_safe_and_complete(pgd_vs_fgsm):
    keys = pgd_vs_fgsm.metrics
    assert all(MLFLOW_SAFE.match(k) and "=" not in k for k in keys)
    for metric in ("accuracy", "auroc", "attack_success_rate", "sensitivity/normal", "specificity/pneumonia"):
        for suffix in ("", "_ci_low", "_ci_high"):
            assert f"audit/pgd_linf/eps_0.0157/{metric}{suffix}" in keys
    assert "audit/pgd_l2/eps_0.0314/accuracy" in keys


def test_class_names_made_mlflow_safe(blob_task, trained, loader):
    res = run_audit(
        trained,
        loader,
        classes=["normal", "viral (covid/sars)=1"],
        mean=blob_task.mean,
        std=blob_task.std,
        attacks=("fgsm",),
        eps=(0, 1 / 255),
        corruptions=(),
        n=32,
        n_bootstrap=0,
        target_class=1,
        progress=False,
    )
    assert all(MLFLOW_SAFE.match(k) for k in res.metrics)
    assert "audit/fgsm_to_viral _covid_sars__1/eps_0.0039/sensitivity/viral _covid_sars__1" in res.metrics


def test_corruptions_summary_and_truncation(blob_task, trained, loader):
    res = run_audit(
        trained,
        loader,
        classes=blob_task.classes,
        mean=blob_task.mean,
        std=blob_task.std,
        attacks=(),
        corruptions=("gaussian_noise", "contrast"),
        severities=(0, 3, 5),
        n=40,
        n_bootstrap=30,
        progress=False,
    )
    assert res.config["n_images"] == 40 and not res.attacks
    m = res.metrics
    for name in ("gaussian_noise", "contrast"):
        for sev in (0, 3, 5):
            assert 0 <= m[f"audit/corrupt/{name}/{sev}/accuracy"] <= 1
        assert m[f"audit/corrupt/{name}/0/accuracy"] == res.clean["accuracy"]  # severity 0 = clean
    cells = [m[f"audit/corrupt/{c}/{s}/accuracy"] for c in ("gaussian_noise", "contrast") for s in (0, 3, 5)]
    assert m["audit/corrupt/mean/accuracy"] == pytest.approx(np.mean(cells))
    drop = (res.clean["accuracy"] - np.mean(cells)) / res.clean["accuracy"]
    assert m["audit/corrupt/relative_drop/accuracy"] == pytest.approx(drop)
    assert (
        m["audit/corrupt/mean/accuracy_ci_low"]
        <= m["audit/corrupt/mean/accuracy"]
        <= m["audit/corrupt/mean/accuracy_ci_high"]
    )
    assert "audit/corrupt/mean/auroc" in m
    # ImageNet-C corruption error: 1 against itself; against a worse baseline it is the error ratio
    assert corruption_error(res, res)["audit/corrupt/mce"] == pytest.approx(1.0)
    worse = AuditResult.from_json(res.to_json())
    for rows in worse.corruptions.values():
        for row in rows.values():
            row["accuracy"] = 1.0 - 2.0 * (1.0 - row["accuracy"]) - 0.1  # more errors everywhere
    ce = corruption_error(res, worse)
    err = {c: sum(1 - v["accuracy"] for v in res.corruptions[c].values()) for c in res.corruptions}
    base = {c: sum(1 - v["accuracy"] for v in worse.corruptions[c].values()) for c in res.corruptions}
    assert ce["audit/corrupt/ce/contrast"] == pytest.approx(err["contrast"] / base["contrast"])
    assert (
        ce["audit/corrupt/mce"] == pytest.approx(np.mean([err[c] / base[c] for c in err]))
        and ce["audit/corrupt/mce"] < 1
    )


def test_targeted_and_transfer(blob_task, trained, loader):
    surrogate = blob_task.train(seed=1)
    res = run_audit(
        trained,
        loader,
        classes=blob_task.classes,
        mean=blob_task.mean,
        std=blob_task.std,
        attacks=("pgd_linf", "transfer"),
        eps=(0.0, 16 / 255),
        corruptions=(),
        surrogate=surrogate,
        target_class="pneumonia",
        n_bootstrap=20,
        progress=False,
    )
    assert set(res.attacks) == {"pgd_linf_to_pneumonia", "transfer_to_pneumonia", "worst_case_to_pneumonia"}
    worst = res.attacks["worst_case_to_pneumonia"][16 / 255]["attack_success_rate"]
    assert worst >= max(
        res.attacks[a][16 / 255]["attack_success_rate"] for a in ("pgd_linf_to_pneumonia", "transfer_to_pneumonia")
    )  # per image: any attack
    white = res.attacks["pgd_linf_to_pneumonia"][16 / 255]
    assert white["attack_success_rate"] > 0.5  # normals pushed to pneumonia
    # pushing towards "pneumonia" cannot hurt pneumonia images: their sensitivity stays high
    assert white["sensitivity/pneumonia"] >= 0.9
    transfer = res.attacks["transfer_to_pneumonia"][16 / 255]
    assert 0.0 <= transfer["attack_success_rate"] <= 1.0
    assert res.config["target_class"] == "pneumonia"


def test_apgd_apgd_square_square_in_run_audit(blob_task, trained, loader, monkeypatch):
    import medtricks.audit.sweep as sweep

    monkeypatch.setattr(sweep, "APGD_STEPS", 5)
    res = run_audit(
        trained,
        loader,
        classes=blob_task.classes,
        mean=blob_task.mean,
        std=blob_task.std,
        attacks="apgd_ce,apgd_square,square",
        eps=(0.0, 16 / 255),
        corruptions=(),
        n=32,
        n_bootstrap=0,
        progress=False,
        square_queries=20,
    )
    assert res.config["square_queries"] == 20
    assert any("no APGD-T, no FAB-T" in note for note in res.config["notes"])  # says what it leaves out
    for attack in ("apgd_ce", "apgd_square", "square", "worst_case"):
        row = res.attacks[attack][16 / 255]
        assert row["accuracy"] <= res.clean["accuracy"]
        assert math.isnan(row["accuracy_ci_low"])  # n_bootstrap=0: no interval, key still present


def test_run_audit_restores_model_state(blob_task, loader):
    model = blob_task.train(0).train()
    model[0].bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    bn_mean = model[1].running_mean.clone()
    run_audit(
        model,
        loader,
        classes=blob_task.classes,
        mean=blob_task.mean,
        std=blob_task.std,
        attacks=("pgd_linf",),
        eps=(0, 4 / 255),
        corruptions=("jpeg",),
        severities=(2,),
        n=32,
        n_bootstrap=0,
        progress=False,
    )
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model[1].running_mean, bn_mean)  # eval mode during the audit: BN stats frozen


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attacks": ("pgd_linf", "deepfool")}, "unknown attack 'deepfool'"),
        ({"attacks": ("autoattack",)}, "renamed 'apgd_square'.*FAB-T"),
        ({"attacks": ("transfer",)}, "needs a surrogate"),
        ({"target_class": 2}, "class index 0..1"),
        ({"eps": (1 / 255, 1.0001 / 255)}, "collide"),
        ({"eps": (-0.1,)}, r"numbers in \[0, 1\]"),
        ({"corruptions": ("fog",)}, "unknown corruption"),
        ({"severities": (6,)}, "0..5"),
        ({"mean": (0.0,), "std": (1.0,)}, "de-normalizes to"),
        ({"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}, "1 channel"),
        ({"classes": ["normal", "pneumonia", "covid"]}, "expected \\(32, 3\\)"),
    ],
)
def test_bad_arguments_are_named(blob_task, trained, loader, kwargs, message):
    args = dict(
        classes=blob_task.classes,
        mean=blob_task.mean,
        std=blob_task.std,
        attacks=("fgsm",),
        eps=(0, 1 / 255),
        corruptions=(),
        n=32,
        n_bootstrap=0,
        progress=False,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        run_audit(trained, loader, **args)


# ------------------------------------------------------------------------ report
def test_report_json_table_and_figures(blob_task, pgd_vs_fgsm, trained, loader):
    res = run_audit(
        trained,
        loader,
        classes=blob_task.classes,
        mean=blob_task.mean,
        std=blob_task.std,
        attacks=("pgd_linf",),
        eps=(0, 16 / 255),
        corruptions=("gaussian_blur", "brightness"),
        severities=(1, 5),
        n=32,
        n_bootstrap=20,
        progress=False,
    )
    text = res.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = AuditResult.from_json(text)
    assert back.metrics.keys() == res.metrics.keys()
    for k, v in res.metrics.items():
        assert (math.isnan(v) and math.isnan(back.metrics[k])) or back.metrics[k] == pytest.approx(v)

    table = res.table()
    assert "pgd_linf" in table and "gaussian_blur" in table and "relative drop" in table
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", table)

    figs = res.figures()
    assert set(figs) == {
        "audit/accuracy_vs_eps.png",
        "audit/auroc_vs_eps.png",
        "audit/corruption_heatmap.png",
        "audit/examples.png",
    }
    for fig in figs.values():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=50)
        assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n" and len(buf.getvalue()) > 2000
    assert res.examples is not None and res.examples.adversarial.shape == (4, 1, blob_task.size, blob_task.size)
    assert set(back.figures()) == {
        "audit/accuracy_vs_eps.png",
        "audit/auroc_vs_eps.png",
        "audit/corruption_heatmap.png",
    }
    assert set(pgd_vs_fgsm.figures()) == {"audit/accuracy_vs_eps.png", "audit/auroc_vs_eps.png", "audit/examples.png"}


def test_metrics_accepted_by_mlflow(pgd_vs_fgsm):
    from medtricks.tracking import create_store

    tracker = create_store("mlflow")  # conftest points MLFLOW_TRACKING_URI at a temporary sqlite store
    tracker.start(experiment="audit-test", run_name="audit", tags={})
    tracker.log_metrics(pgd_vs_fgsm.metrics)
    logged = tracker.client.get_run(tracker.run_id).data.metrics
    tracker.end()
    finite = {k: v for k, v in pgd_vs_fgsm.metrics.items() if math.isfinite(v)}
    assert set(finite) <= set(logged)
    assert logged["audit/pgd_linf/eps_0.0314/accuracy"] == pytest.approx(finite["audit/pgd_linf/eps_0.0314/accuracy"])


def test_same_seed_same_audit(blob_task, trained, loader):
    args = dict(
        classes=blob_task.classes,
        mean=blob_task.mean,
        std=blob_task.std,
        attacks=("pgd_linf",),
        eps=(0, 8 / 255),
        corruptions=("poisson_noise",),
        severities=(4,),
        n=32,
        n_bootstrap=20,
        progress=False,
    )
    a, b = run_audit(trained, loader, seed=7, **args), run_audit(trained, loader, seed=7, **args)
    assert a.to_json() == b.to_json()
    assert np.array_equal(a.examples.adversarial, b.examples.adversarial)
